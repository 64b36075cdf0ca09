"""Prompt tokenization and encoding, as diffusers' SD 1.5 / SDXL / FLUX.1 pipelines do it.

Split in two so each half can live in its own Triton model: tokenization is
cheap CPU work (``preprocessing``); encoding runs the CLIP text encoders
(``text_encoder``, later a TensorRT engine taking ``input_ids``).

Batch layout throughout: row 0 is the negative (unconditional) prompt and row 1
the prompt when classifier-free guidance is on; a single row otherwise (always, for FLUX).
"""

from __future__ import annotations

import numpy as np
import torch


def tokenize(tokenizers: dict, prompt: str, negative_prompt: str | None, do_cfg: bool) -> dict[str, np.ndarray]:
    """Token ids per tokenizer: ``{"input_ids": int64 [B, 77], "input_ids_2": ...}`` (each padded to
    its tokenizer's ``model_max_length``: FLUX's T5 to 512).

    ``B`` is 2 (negative, prompt) with CFG, else 1. An absent negative prompt is
    tokenized as ``""``; whether it is zeroed instead is the encoder's choice.
    """
    texts = [negative_prompt or "", prompt] if do_cfg else [prompt]
    out = {}
    for i, part in enumerate(sorted(tokenizers)):
        tok = tokenizers[part]
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="np")
        out["input_ids" if i == 0 else f"input_ids_{i + 1}"] = ids["input_ids"].astype(np.int64)
    return out


class PromptEncoder:
    """Runs the text encoder(s) on token ids.

    SD 1.5: ``prompt_embeds`` is the last hidden state ``[B, 77, 768]``.
    SDXL: ``prompt_embeds`` concatenates the penultimate hidden states of both
    encoders ``[B, 77, 768 + 1280]``; ``pooled_prompt_embeds`` ``[B, 1280]`` is
    the second encoder's projected output.
    FLUX: ``prompt_embeds`` is the T5 encoder's last hidden state ``[1, 512, 4096]``;
    ``pooled_prompt_embeds`` ``[1, 768]`` the CLIP encoder's pooled output.
    """

    def __init__(self, encoders: dict[str, torch.nn.Module], family: str):
        self.encoders = encoders
        self.family = family

    @torch.no_grad()
    def encode(
        self, input_ids: dict[str, torch.Tensor], zero_negative: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns ``(prompt_embeds, pooled_prompt_embeds or None)``.

        ``zero_negative`` (SDXL's ``force_zeros_for_empty_prompt`` with no
        negative prompt) replaces row 0 of both outputs with zeros.
        """
        if self.family == "flux":
            clip, t5 = self.encoders["text_encoder"], self.encoders["text_encoder_2"]
            pooled = clip(input_ids["input_ids"].to(clip.device), output_hidden_states=False).pooler_output
            embeds = t5(input_ids["input_ids_2"].to(t5.device), output_hidden_states=False)[0]
            return embeds, pooled
        if self.family == "sd15":
            te = self.encoders["text_encoder"]
            ids = input_ids["input_ids"].to(te.device)
            embeds = te(ids, attention_mask=None)[0]
            return embeds, None
        hidden, pooled = [], None
        for key, part in (("input_ids", "text_encoder"), ("input_ids_2", "text_encoder_2")):
            te = self.encoders[part]
            out = te(input_ids[key].to(te.device), output_hidden_states=True)
            if out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        embeds = torch.cat(hidden, dim=-1)
        if zero_negative:
            if embeds.shape[0] != 2:
                raise ValueError("zero_negative needs a [negative, prompt] batch")
            embeds = torch.cat([torch.zeros_like(embeds[:1]), embeds[1:]])
            pooled = torch.cat([torch.zeros_like(pooled[:1]), pooled[1:]])
        return embeds, pooled
