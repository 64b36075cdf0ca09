"""The PyTorch text-encoder engine: token ids -> prompt embeddings (LoRAs merged into the encoders).
"""

from __future__ import annotations

from typing import Sequence

import torch

from katz.diffusion.text_encoding import PromptEncoder
from katz.lora.patch import LoraPatcher, apply_loras
from katz.lora.weights import LoraWeights
from katz.models.folder import ModelFolder


class TextEncoderEngine:
    """CLIP text encoder(s) with LoRAs merged on demand; see :class:`katz.diffusion.text_encoding.PromptEncoder`."""

    def __init__(self, folder: ModelFolder, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.encoders = folder.load_text_encoders(device, dtype)
        self.encoder = PromptEncoder(self.encoders, folder.family)
        self.lora = [LoraPatcher(m, part) for part, m in self.encoders.items()]

    def set_loras(self, loras: Sequence[tuple[LoraWeights, float]]) -> None:
        for patcher in self.lora:
            apply_loras(patcher, loras)

    def __call__(self, input_ids: dict[str, torch.Tensor], zero_negative: bool):
        return self.encoder.encode(input_ids, zero_negative)
