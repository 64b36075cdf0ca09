"""The CLIP text encoders: ``text_encoder`` and (SDXL) ``text_encoder_2``, one graph each.

``input_ids [B, 77]`` (int64, as the ``preprocessing`` model makes them) -> ``hidden_states
[B, 77, D]``: the last hidden state for SD 1.5, the penultimate one for SDXL (what
:class:`katz.diffusion.text_encoding.PromptEncoder` takes), plus ``text_embeds [B, P]`` (the projected
pooled output) from SDXL's second encoder. The SDXL prompt embedding is the concatenation of the
two ``hidden_states`` along the last axis; zeroing a negative prompt stays outside the graph.
"""

from __future__ import annotations

import torch

from katz.export.graph import Graph
from katz.models.shapes import TEXT_LEN, TensorSpec


class _TextEncoderWrapper(torch.nn.Module):
    def __init__(self, encoder, penultimate: bool, pooled: bool):
        super().__init__()
        self.net, self.penultimate, self.pooled = encoder, penultimate, pooled

    def forward(self, input_ids):
        if not self.penultimate:
            return self.net(input_ids, attention_mask=None)[0]
        out = self.net(input_ids, output_hidden_states=True)
        if self.pooled:
            return out.hidden_states[-2], out[0]
        return out.hidden_states[-2]


class TextEncoderGraph(Graph):
    model = "text_encoder"
    refit = True  # LoRAs target the text encoders too (kohya lora_te*)

    def __init__(self, folder, part: str):
        super().__init__(folder)
        self.name = self.component = self.lora_component = part
        self.sdxl = folder.family == "sdxl"
        self.pooled = self.sdxl and part == "text_encoder_2"

    @property
    def config(self) -> dict:
        import json

        return json.loads((self.folder.path / self.name / "config.json").read_text())

    @property
    def inputs(self):
        return [TensorSpec("input_ids", "int64", ("batch", TEXT_LEN))]

    @property
    def outputs(self):
        cfg = self.config
        out = [TensorSpec("hidden_states", "float", ("batch", TEXT_LEN, cfg["hidden_size"]))]
        if self.pooled:
            out.append(TensorSpec("text_embeds", "float", ("batch", cfg.get("projection_dim", cfg["hidden_size"]))))
        return out

    def shapes(self, shape):
        return {"input_ids": (shape.batch, TEXT_LEN)}

    def load(self, dtype):
        # eager attention: the TorchScript exporter's SDPA with is_causal=True builds a float32 mask
        # and upcasts the scores, which leaves float16 graphs with mixed-type LayerNormalizations
        return self.folder.load_text_encoder(self.name, dtype, attn_implementation="eager")

    def wrapper(self, component):
        return _TextEncoderWrapper(component, penultimate=self.sdxl, pooled=self.pooled)

    def sample_value(self, spec, shape, dtype, gen):
        return torch.randint(0, self.config.get("vocab_size", 49408), shape, generator=gen)

    def reference(self, component, inputs):
        # what katz.diffusion.text_encoding.PromptEncoder takes from each encoder
        ids = inputs["input_ids"]
        with torch.no_grad():
            if not self.sdxl:
                return {"hidden_states": component(ids, attention_mask=None)[0]}
            out = component(ids, output_hidden_states=True)
            result = {"hidden_states": out.hidden_states[-2]}
            if self.pooled:
                result["text_embeds"] = out[0]
            return result
