"""The PyTorch UNet engine: one step whole, or its down and up halves (ControlNet-as-a-Service), as
CUDA graphs captured at load where the deployment asks for them. LoRAs are merged into its weights
in place (:class:`katz.lora.patch.LoraPatcher`), so a step costs the same with or without them.
"""

from __future__ import annotations

import time
from types import MappingProxyType
from typing import Mapping, Sequence

import torch

from katz.engines.torch.cuda_graphs import Acceleration, CudaGraphs, process_pool
from katz.engines.torch.experimental.fp8 import requantize
from katz.lora.patch import LoraPatcher, apply_loras
from katz.lora.weights import LoraWeights
from katz.models.folder import ModelFolder
from katz.models.unet import unet_down, unet_example_inputs, unet_up


def _latent_key(x: torch.Tensor) -> tuple[int, int, int]:
    """``(batch, h, w)`` of a latent-resolution tensor ``[B, C, h, w]``."""
    return (x.shape[0], x.shape[-2], x.shape[-1])


class UNetEngine:
    """The denoising UNet, with LoRAs merged on demand.

    With ``accel`` on a CUDA device, :meth:`warm_up` captures the step (whole, or split
    into :meth:`down` / :meth:`up`) as CUDA graphs for the given sizes; calls of other
    shapes run eagerly.
    """

    def __init__(
        self,
        folder: ModelFolder,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        accel: Acceleration | None = None,
    ):
        self.folder = folder
        self.device, self.dtype = torch.device(device), dtype
        self.unet = folder.load_unet(device, dtype)
        self.accel = accel if accel is not None and accel.active(self.device) else None
        # float8 transformer linears (before the patcher indexes the modules); a LoRA merge
        # re-quantizes the float8 copies of the weights it rewrote
        self.fp8 = self.accel is not None and self.accel.quantize(self.unet, self.device)
        self.lora = LoraPatcher(self.unet, "unet", on_change=requantize if self.fp8 else None)
        self._graphs: dict[str, CudaGraphs] = {}
        # (batch, h, w) of the latent -> how a step without ControlNets replays the captured
        # residual signature: ("step" | "split", (zero down residuals, zero mid residual))
        self._zero_residuals: dict[tuple[int, int, int], tuple[str, tuple[list[torch.Tensor], torch.Tensor]]] = {}
        self.warmup_s = 0.0  # graph capture (and compilation) at load
        if self.accel is not None and self.accel.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if self.accel is not None:
            pool, lock = process_pool(self.device)
            for part, eager in (("step", self.eager_step), ("down", self._down), ("up", self._up)):
                fn = self.accel.compiled(eager)
                if self.accel.cuda_graphs:
                    self._graphs[part] = CudaGraphs(fn, f"unet.{part}", pool, lock, eager=eager)
                else:
                    self._graphs[part] = fn


    @property
    def graphs(self) -> Mapping[str, object]:
        """The per-part callables the engine runs (:class:`CudaGraphs` where graphs are on), by part."""
        return MappingProxyType(self._graphs)

    def warm_up(self, sizes: Sequence[tuple[int, int]], batches: Sequence[int] = (2,), residuals: bool = False,
                split: bool = False, compile_batches: Sequence[int] | None = None) -> float:
        """Capture (and compile) the step for every ``(height, width)`` in pixels and batch size.

        One signature per size and batch is captured, so compile time and the graphs' memory do not
        double for ControlNet requests:

        * ``residuals`` (ControlNets in this process: modes inline, local): the whole step with
          ControlNet residuals; a step without ControlNets replays it with zero residuals
          (``x + 0`` is exact).
        * ``split`` (ControlNet-as-a-Service): :meth:`down` and :meth:`up` with residuals; a step
          without ControlNets runs them with zero residuals.
        * neither: the step without residuals.

        ``compile_batches``: the batch sizes compiled when ``accel.compile`` is on (None: all);
        the others are captured uncompiled (without graphs every batch is compiled, so that no
        request compiles). Returns the seconds taken.
        """
        if self.accel is None:
            return 0.0
        start = time.perf_counter()
        for height, width in sizes:
            for batch in batches:
                compiled = compile_batches is None or batch in compile_batches
                x = unet_example_inputs(self.folder, batch, height, width, self.device, self.dtype)
                args = (x["sample"], x["timestep"], x["encoder_hidden_states"], x["added_cond"])
                if not (residuals or split):
                    self._warm("step", compiled, *args, None, None)
                    continue
                state = self._down(*args)
                zeros = ([torch.zeros_like(s) for s in state["skips"]], torch.zeros_like(state["sample"]))
                if residuals:
                    self._warm("step", compiled, *args, *zeros)
                if split:
                    self._warm("down", compiled, *args)
                    self._warm("up", compiled, state, *zeros)
                self._zero_residuals[_latent_key(x["sample"])] = ("step" if residuals else "split", zeros)
        self.warmup_s += time.perf_counter() - start
        return time.perf_counter() - start

    def _warm(self, part, compiled, *args):
        fn = self._graphs[part]
        if isinstance(fn, CudaGraphs):
            fn.capture(*args, compiled=compiled)
        else:  # compiled, no graphs: compile now (every batch: a request must never compile)
            fn(*args)

    def set_loras(self, loras: Sequence[tuple[LoraWeights, float]]) -> None:
        """Make the weights base + exactly these LoRAs (an empty list restores the base)."""
        apply_loras(self.lora, loras)

    @torch.no_grad()
    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond: dict[str, torch.Tensor] | None = None,
        down_residuals: Sequence[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``sample [B, C, h, w]``, ``timestep [B]`` (or a scalar), ``encoder_hidden_states [B, 77, D]``,
        SDXL ``added_cond = {text_embeds [B, P], time_ids [B, 6]}`` -> noise prediction ``[B, C, h, w]``."""
        down = list(down_residuals) if down_residuals is not None else None
        if self._graphs:
            zero = self._zero_residuals.get(_latent_key(sample)) if down is None and mid_residual is None else None
            if zero is not None and zero[0] == "split":
                return self.up(self.down(sample, timestep, encoder_hidden_states, added_cond), *zero[1])
            if zero is not None:
                down, mid_residual = zero[1]
            out = self._graphs["step"](sample, timestep, encoder_hidden_states, added_cond, down, mid_residual)
            return out.clone(memory_format=torch.contiguous_format)
        return self.eager_step(sample, timestep, encoder_hidden_states, added_cond, down, mid_residual)

    def eager_step(self, sample, timestep, encoder_hidden_states, added_cond, down, mid):
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_cond,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]

    # ---- split forward (katz.models.unet): down + mid, then the up path -----
    @torch.no_grad()
    def down(self, sample, timestep, encoder_hidden_states, added_cond=None) -> dict:
        """Time embedding, ``conv_in``, down blocks and mid block; returns the state :meth:`up` needs
        (with CUDA graphs: the graph's buffers, valid until the next :meth:`down`)."""
        if self._graphs:
            return self._graphs["down"](sample, timestep, encoder_hidden_states, added_cond)
        return self._down(sample, timestep, encoder_hidden_states, added_cond)

    def _down(self, sample, timestep, encoder_hidden_states, added_cond=None) -> dict:
        skips, mid, emb = unet_down(self.unet, sample, timestep, encoder_hidden_states, added_cond)
        return {"skips": skips, "sample": mid, "emb": emb, "hidden": encoder_hidden_states}

    @torch.no_grad()
    def up(self, state: dict, down_residuals=None, mid_residual=None) -> torch.Tensor:
        """Add the ControlNet residuals (if any), run the up blocks and the output head."""
        down = list(down_residuals) if down_residuals is not None else None
        if self._graphs:
            zero = self._zero_residuals.get(_latent_key(state["skips"][0])) if down is None and mid_residual is None \
                else None
            if zero is not None:
                down, mid_residual = zero[1]
            return self._graphs["up"](state, down, mid_residual).clone(memory_format=torch.contiguous_format)
        return self._up(state, down, mid_residual)

    def _up(self, state: dict, down_residuals=None, mid_residual=None) -> torch.Tensor:
        return unet_up(self.unet, state["skips"], down_residuals, state["sample"], mid_residual, state["emb"],
                       state["hidden"])
