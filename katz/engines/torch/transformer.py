"""The PyTorch FLUX.1 engines: the transformer (LoRAs merged in place, as the UNet engine does) and
the folder's FLUX ControlNets.

On a GPU, with the deployment's :class:`~katz.engines.torch.cuda_graphs.Acceleration`:

* ``compile``: *regional* compilation. A FLUX.1-dev step at 1024² (4096 image + 512 text tokens,
  12 B parameters) is GPU-bound (hundreds of ms), not launch-bound, and ControlNet residuals are
  read block by block while the ControlNets run beside it (:mod:`katz.controlnet.blocks`), so the
  step is not captured whole. Instead each ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock``
  runs ``torch.compile``'d code (inductor fuses the AdaLN modulation, norms, RoPE, GELU, gates and
  residual adds around the GEMMs and attention). One compiled function per block class serves all
  of its instances (19 double, 38 single; the ControlNets' blocks too), so compiling costs two
  blocks, not 57. Compilation happens at load (:meth:`FluxTransformerEngine.warm_up`) for the sizes
  the deployment names; a call of another shape runs the blocks eagerly, never compiling on a request.
* ``fp8``: the blocks' linears multiply in float8 e4m3 (:data:`~katz.engines.torch.experimental.fp8.FLUX_TARGETS`);
  a LoRA merge re-quantizes the float8 copies of the weights it rewrote.

CUDA graphs are not used for FLUX (``cuda_graphs`` is ignored here). On the CPU the engines are eager.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Sequence

import torch

from katz.engines.torch.cuda_graphs import Acceleration
from katz.lora.patch import LoraPatcher, apply_loras
from katz.lora.weights import LoraWeights
from katz.models.folder import ModelFolder

FLUX_TEXT_LEN = 512  # T5 tokens FLUX.1 pads prompts to (FluxPipeline's max_sequence_length)


class RegionalCompile:
    """``torch.compile`` per transformer-block class, shared by every block of that class it is
    :meth:`attach`\\ ed to (the transformer's and the ControlNets' of one process and device).

    A block runs its compiled code for the shapes compiled at warm-up (:meth:`warming`), else its
    eager ``forward``: a request of a size not warmed up runs eagerly instead of compiling for
    minutes on the request. Forward hooks stay outside the compiled code (only ``forward`` is
    compiled), so the ControlNets' per-block residual hooks do not recompile it."""

    def __init__(self, accel: Acceleration):
        self.accel = accel
        self._compiled: dict[type, Callable] = {}
        self.shapes: set[tuple] = set()  # (image tokens shape, text tokens shape, dtype) compiled at warm-up
        self.eager_calls = 0  # block calls of a shape not warmed up (run eagerly): a benchmark's check
        self._warming = 0
        self._lock = threading.Lock()

    @staticmethod
    def _key(args, kwargs) -> tuple:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        return tuple(hidden.shape), tuple(text.shape), hidden.dtype, hidden.device

    def attach(self, blocks: Sequence[torch.nn.Module]) -> None:
        for block in blocks:
            block.forward = _RegionalForward(self, block)

    @staticmethod
    def detach(blocks: Sequence[torch.nn.Module]) -> None:
        """The blocks' own ``forward`` again."""
        for block in blocks:
            if isinstance(block.__dict__.get("forward"), _RegionalForward):
                del block.forward

    @contextlib.contextmanager
    def warming(self):
        """Within this context every block call compiles (once per class and shape) and its shape is
        recorded as warmed up."""
        with self._lock:
            self._warming += 1
        try:
            yield
        finally:
            with self._lock:
                self._warming -= 1

    def run(self, block: torch.nn.Module, args, kwargs):
        cls = type(block)
        key = self._key(args, kwargs)
        if self._warming:
            self.shapes.add(key)
        elif key not in self.shapes:
            self.eager_calls += 1
            return cls.forward(block, *args, **kwargs)
        fn = self._compiled.get(cls)
        if fn is None:
            with self._lock:
                fn = self._compiled.setdefault(cls, self.accel.compiled(cls.forward, on=True))
        # contiguous token tensors: a single block's outputs are slices of one tensor, and compiled code
        # guards on strides, so the first single block (contiguous input), the others (slices) and a
        # ControlNet's (either) would each need code of their own (one more compile, maybe on a request);
        # the copy is one read and write of the tokens, small beside a block's GEMMs
        kwargs = {k: _dense(v) if k in ("hidden_states", "encoder_hidden_states") else v for k, v in kwargs.items()}
        args = tuple(_dense(a) if i < 2 else a for i, a in enumerate(args))
        return fn(block, *args, **kwargs)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` with row-major strides, the batch dimension's included (``contiguous()`` keeps a slice's
    stride on a dimension of size 1, which compiled code still guards on)."""
    stride, expected = x.stride(), []
    step = 1
    for size in reversed(x.shape):
        expected.append(step)
        step *= size
    if stride == tuple(reversed(expected)):
        return x
    return x.clone(memory_format=torch.contiguous_format)


class _RegionalForward:
    """A block's ``forward`` through :class:`RegionalCompile` (an instance attribute shadowing the class's)."""

    def __init__(self, regions: RegionalCompile, block: torch.nn.Module):
        self.regions = regions
        self.block = block

    def __call__(self, *args, **kwargs):
        return self.regions.run(self.block, args, kwargs)


_REGIONS: dict[tuple[str, int | None], RegionalCompile] = {}
_REGIONS_LOCK = threading.Lock()


def process_regions(device: torch.device, accel: Acceleration) -> RegionalCompile:
    """The process's :class:`RegionalCompile` for ``device``: the transformer and the ControlNets beside it
    share it, so the ControlNets' blocks run the code compiled at the transformer's warm-up. ``cuda`` and
    ``cuda:<current device>`` are one device: the transformer's is read off its weights (indexed), a
    ControlNet engine's is the deployment's string (maybe not), and two keys would leave the ControlNets
    with shapes never warmed up, hence eager."""
    device = torch.device(device)
    index = device.index
    if index is None and device.type == "cuda":
        index = torch.cuda.current_device()
    key = (device.type, index)
    with _REGIONS_LOCK:
        if key not in _REGIONS:
            _REGIONS[key] = RegionalCompile(accel)
        return _REGIONS[key]


def flux_text_len(folder: ModelFolder) -> int:
    """The T5 tokens a FLUX folder's prompts are padded to (its ``tokenizer_2``'s ``model_max_length``,
    :func:`katz.diffusion.text_encoding.tokenize`): the text shape the blocks are compiled for."""
    import json

    config = folder.path / "tokenizer_2" / "tokenizer_config.json"
    try:
        length = int(json.loads(config.read_text()).get("model_max_length", FLUX_TEXT_LEN))
    except (OSError, ValueError):
        return FLUX_TEXT_LEN
    return length if 0 < length <= 4096 else FLUX_TEXT_LEN


def _blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [*module.transformer_blocks, *module.single_transformer_blocks]


def flux_example_inputs(config, height: int, width: int, device, dtype, text_len: int = FLUX_TEXT_LEN,
                        vae_scale_factor: int = 8) -> dict:
    """Inputs of one FLUX transformer (or ControlNet) evaluation for an image of ``height x width`` pixels:
    packed latents ``[1, (h/2)(w/2), in_channels]``, ``text_len`` T5 tokens, the dev flavour's guidance."""
    tokens = (height // (vae_scale_factor * 2)) * (width // (vae_scale_factor * 2))
    return dict(
        hidden_states=torch.zeros(1, tokens, config.in_channels, device=device, dtype=dtype),
        timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
        guidance=torch.full((1,), 3.5, device=device, dtype=torch.float32) if config.guidance_embeds else None,
        pooled_projections=torch.zeros(1, config.pooled_projection_dim, device=device, dtype=dtype),
        encoder_hidden_states=torch.zeros(1, text_len, config.joint_attention_dim, device=device, dtype=dtype),
        txt_ids=torch.zeros(text_len, 3, device=device, dtype=dtype),
        img_ids=torch.zeros(tokens, 3, device=device, dtype=dtype),
    )


class FluxTransformerEngine:
    """``FluxTransformer2DModel``: one step's evaluation (:class:`katz.diffusion.flux.TransformerFn`).
    ``lora`` is its :class:`LoraPatcher` (component ``transformer``), for the LoRA manager and BAL.

    ``accel`` (on a CUDA device): compiled blocks and/or float8 linears, see the module's docstring."""

    def __init__(self, folder: ModelFolder, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 accel: Acceleration | None = None):
        self._setup(folder.load_transformer(device, dtype), accel)

    @classmethod
    def from_module(cls, transformer: torch.nn.Module, accel: Acceleration | None = None) -> "FluxTransformerEngine":
        """The engine around a ``FluxTransformer2DModel`` built elsewhere (on its device, in its dtype).

        The module is changed in place and may be shared (a benchmark runs diffusers' pipeline on the
        same one): ``fp8`` swaps its block linears for float8 ones sharing the weights, ``compile``
        shadows its blocks' ``forward`` (:meth:`release` undoes that), LoRAs are merged into its weights."""
        engine = cls.__new__(cls)
        engine._setup(transformer, accel)
        return engine

    def _setup(self, transformer: torch.nn.Module, accel: Acceleration | None) -> None:
        from katz.engines.torch.experimental.fp8 import FLUX_TARGETS, has_fp8, requantize

        param = next(transformer.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.transformer = transformer.eval()
        self.accel = accel if accel is not None and accel.active(self.device) else None
        # float8 block linears before the patcher indexes the modules
        if self.accel is not None:
            self.accel.quantize(transformer, self.device, FLUX_TARGETS)
        self.fp8 = has_fp8(transformer)  # also where an earlier engine on this module quantized it
        # a LoRA merge re-quantizes the float8 copies of the weights it rewrote
        self.lora = LoraPatcher(transformer, "transformer", on_change=requantize if self.fp8 else None)
        self.regions = None
        if self.accel is not None and self.accel.compile:
            self.regions = process_regions(self.device, self.accel)
            self.regions.attach(_blocks(transformer))
        self.warmup_s = 0.0  # compilation at load

    def release(self) -> None:
        """Give the blocks their eager ``forward`` back (the module stays float8 where it was quantized)."""
        RegionalCompile.detach(_blocks(self.transformer))
        self.regions = None

    @torch.no_grad()
    def warm_up(self, sizes: Sequence[tuple[int, int]], text_len: int = FLUX_TEXT_LEN, vae_scale_factor: int = 8) -> float:
        """Compile the blocks for every ``(height, width)`` in pixels (with ``text_len`` T5 tokens), so no
        request compiles; returns the seconds taken (0.0 without ``compile``)."""
        if self.regions is None:
            return 0.0
        start = time.perf_counter()
        with self.regions.warming():
            for height, width in sizes:
                x = flux_example_inputs(self.transformer.config, height, width, self.device, self.dtype, text_len,
                                        vae_scale_factor)
                self(**x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        self.warmup_s += seconds
        return seconds

    def set_loras(self, loras: Sequence[tuple[LoraWeights, float]]) -> None:
        """Make the weights base + exactly these LoRAs (an empty list restores the base)."""
        apply_loras(self.lora, loras)

    @torch.no_grad()
    def __call__(self, hidden_states, timestep, guidance, pooled_projections, encoder_hidden_states, txt_ids,
                 img_ids, block_residuals=None, single_block_residuals=None, attention_kwargs=None) -> torch.Tensor:
        """``attention_kwargs``: passed to the attention processors (a sequence shard's place,
        :mod:`katz.parallel.sequence`)."""
        return self.transformer(
            hidden_states=hidden_states, timestep=timestep, guidance=guidance,
            pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
            txt_ids=txt_ids, img_ids=img_ids,
            controlnet_block_samples=block_residuals, controlnet_single_block_samples=single_block_residuals,
            joint_attention_kwargs=attention_kwargs, return_dict=False,
        )[0]


class FluxControlNetEngine:
    """The folder's ``FluxControlNetModel``s by name, loaded on first use
    (:class:`katz.diffusion.flux.FluxControlNetFn`). Only the InstantX layout (control image as
    packed VAE latents, no ``input_hint_block``) is served; another is refused at load.

    ``accel`` (on a CUDA device): as the transformer's; the blocks share the process's compiled code
    (:func:`process_regions`), warmed up by the transformer in its process or by :meth:`warm_up`."""

    def __init__(self, folder: ModelFolder, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 accel: Acceleration | None = None):
        self.folder, self.device, self.dtype = folder, device, dtype
        self.nets: dict[str, torch.nn.Module] = {}
        dev = torch.device(device)
        self.accel = accel if accel is not None and accel.active(dev) else None
        self.regions = process_regions(dev, self.accel) if self.accel is not None and self.accel.compile else None
        self._lock = threading.Lock()

    def net(self, name: str) -> torch.nn.Module:
        with self._lock:
            if name not in self.nets:
                net = self.folder.load_controlnet(name, self.device, self.dtype)
                if net.input_hint_block is not None:
                    raise ValueError(f"ControlNet {name!r} has an input_hint_block (XLabs layout); "
                                     "only InstantX-layout FLUX ControlNets are served")
                self.nets[name] = self.accelerate(net)
            return self.nets[name]

    def accelerate(self, net: torch.nn.Module) -> torch.nn.Module:
        """``net`` with float8 block linears and compiled blocks, as ``accel`` asks (in place)."""
        if self.accel is not None:
            from katz.engines.torch.experimental.fp8 import FLUX_TARGETS

            self.accel.quantize(net, torch.device(self.device), FLUX_TARGETS)
        if self.regions is not None:
            self.regions.attach(_blocks(net))
        return net

    @torch.no_grad()
    def warm_up(self, names: Sequence[str], sizes: Sequence[tuple[int, int]], text_len: int = FLUX_TEXT_LEN,
                vae_scale_factor: int = 8) -> float:
        """Load the ControlNets ``names`` and compile their blocks for every ``(height, width)`` (a process
        without the transformer: mode ``service``); returns the seconds taken (0.0 without ``compile``)."""
        if self.regions is None:
            return 0.0
        start = time.perf_counter()
        with self.regions.warming():
            for name in names:
                net = self.net(name)
                for height, width in sizes:
                    x = flux_example_inputs(net.config, height, width, self.device, self.dtype, text_len,
                                            vae_scale_factor)
                    cond = torch.zeros_like(x["hidden_states"])
                    self(name, x["hidden_states"], cond, 1.0, x["timestep"], x["guidance"], x["pooled_projections"],
                         x["encoder_hidden_states"], x["txt_ids"], x["img_ids"])
        return time.perf_counter() - start

    @torch.no_grad()
    def __call__(self, name, hidden_states, cond, scale, timestep, guidance, pooled_projections,
                 encoder_hidden_states, txt_ids, img_ids) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        net = self.net(name)
        blocks, singles = net(
            hidden_states=hidden_states, controlnet_cond=cond, conditioning_scale=scale, timestep=timestep,
            guidance=guidance if net.config.guidance_embeds else None,
            pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )
        return (list(blocks) if blocks else None), (list(singles) if singles else None)
