"""PyTorch engines for the UNet, the ControlNets, the VAE decoder and the text encoders.

Tensors in and out are on the engine's device in the engine's dtype; shapes are
documented on each ``__call__``. LoRAs are merged into the weights in place
(:class:`katz.lora.weights.LoraPatcher`), so a step costs the same with or without them.
"""

from __future__ import annotations

import functools
import threading
import time
import warnings
from collections import OrderedDict
from typing import Sequence

import torch

from katz.lora.weights import LoraPatcher, LoraWeights
from katz.models.folder import ModelFolder
from katz.engines.torch.cuda_graphs import Acceleration, CudaGraphs, process_pool
from katz.engines.torch.experimental.fp8 import requantize
from katz.models.unet import unet_down, unet_up
from katz.diffusion.text_encoding import PromptEncoder


def _apply_loras(patcher: LoraPatcher, loras: Sequence[tuple[LoraWeights, float]]) -> None:
    patcher.apply([(w, s) for w, s in loras if patcher.component in w.layers])


def unet_example_inputs(folder: ModelFolder, batch: int, height: int, width: int, device, dtype) -> dict:
    """Random inputs of one UNet step for an image of ``height x width`` pixels (for warm-up)."""
    cfg = folder.unet_config
    f = folder.vae_scale_factor
    x = {
        "sample": torch.randn(batch, cfg["in_channels"], height // f, width // f, device=device, dtype=dtype),
        "timestep": torch.full((batch,), 500.0, device=device),
        "encoder_hidden_states": torch.randn(batch, 77, cfg["cross_attention_dim"], device=device, dtype=dtype),
        "added_cond": None,
    }
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        x["added_cond"] = {
            "text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
            "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * batch, device=device, dtype=dtype),
        }
    return x


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
            for part, eager in (("step", self._step), ("down", self._down), ("up", self._up)):
                fn = self.accel.compiled(eager)
                if self.accel.cuda_graphs:
                    self._graphs[part] = CudaGraphs(fn, f"unet.{part}", pool, lock, eager=eager)
                else:
                    self._graphs[part] = fn

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
        _apply_loras(self.lora, loras)

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
        return self._step(sample, timestep, encoder_hidden_states, added_cond, down, mid_residual)

    def _step(self, sample, timestep, encoder_hidden_states, added_cond, down, mid):
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


class _CachedCondEmbedding(torch.nn.Module):
    """Wraps a ControlNet's ``controlnet_cond_embedding``: the features of a control image
    are computed once (on one row of the CFG batch) and reused while the cache holds them.

    Under a CUDA graph the features come in as a graph input instead (``graph_input``): they
    are computed (or taken from the cache) eagerly, outside the graph, by :meth:`features`.
    """

    def __init__(self, inner: torch.nn.Module, cache: "FeatureCache", net_name: str):
        super().__init__()
        self.inner, self.cache, self.net_name = inner, cache, net_name
        self.key: str | None = None  # set by ControlNetEngine before each forward
        self.graph_input: torch.Tensor | None = None  # set while a graph of the net is captured

    def features(self, cond: torch.Tensor) -> torch.Tensor:
        """``cond [B, 3, H, W]`` -> features ``[B, C, h, w]`` (computed once per image while cached)."""
        if self.key is None:
            return self.inner(cond)
        key = (self.net_name, self.key, tuple(cond.shape[1:]), cond.dtype, cond.device)
        feats = self.cache.get(key)
        if feats is None:
            feats = self.inner(cond[:1])
            self.cache.put(key, feats)
        return feats.expand(cond.shape[0], *feats.shape[1:])

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        if self.graph_input is not None:
            return self.graph_input
        return self.features(cond)


class FeatureCache:
    """LRU of ControlNet conditioning features by (net, image content hash, shape), bytes-bounded."""

    def __init__(self, budget_bytes: int):
        self.budget, self.used = budget_bytes, 0
        self.items: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key):
        t = self.items.get(key)
        if t is None:
            self.misses += 1
            return None
        self.items.move_to_end(key)
        self.hits += 1
        return t

    def put(self, key, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.budget:
            return
        self.items[key] = t
        self.used += size
        while self.used > self.budget:
            _, old = self.items.popitem(last=False)
            self.used -= old.numel() * old.element_size()


class ControlNetEngine:
    """The registered ControlNets of a deployment, by name.

    ``resident`` nets are loaded at start and never evicted; the others are
    loaded on first use into an LRU bounded by ``cache_bytes``. Control-image
    features are cached across requests (:class:`FeatureCache`).
    """

    def __init__(
        self,
        folder: ModelFolder,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        resident: Sequence[str] | None = None,
        cache_bytes: int = 8 << 30,
        feature_cache_bytes: int = 1 << 30,
        accel: Acceleration | None = None,
    ):
        self.folder, self.device, self.dtype = folder, torch.device(device), dtype
        self.accel = accel if accel is not None and accel.active(self.device) else None
        self._pool, self._pool_lock = process_pool(self.device) if self.accel is not None else (None, None)
        self._graphs: dict[str, CudaGraphs] = {}
        self.warmup_s = 0.0  # graph capture (and compilation) at load
        self.names = set(folder.controlnets)
        self.resident = set(folder.controlnets if resident is None else resident) & self.names
        self.cache_bytes = cache_bytes
        self.features = FeatureCache(feature_cache_bytes)
        self.nets: "OrderedDict[str, torch.nn.Module]" = OrderedDict()
        self.loads = 0
        # one evaluation at a time, like one Triton instance (the feature-cache key lives on the net)
        self._lock = threading.Lock()
        for name in sorted(self.resident):
            self._load(name)

    def _size(self, net) -> int:
        return sum(p.numel() * p.element_size() for p in net.parameters())

    def _load(self, name: str):
        net = self.folder.load_controlnet(name, self.device, self.dtype)
        net.controlnet_cond_embedding = _CachedCondEmbedding(net.controlnet_cond_embedding, self.features, name)
        if self.accel is not None:
            self.accel.quantize(net, self.device)
        if self.accel is not None and self.accel.channels_last:
            net.to(memory_format=torch.channels_last)
        self.nets[name] = net
        self.loads += 1
        if self.accel is not None and name in self.resident:  # nets loaded on demand run eagerly
            eager = functools.partial(self._graph_body, net)
            fn = self.accel.compiled(eager)
            self._graphs[name] = (CudaGraphs(fn, f"controlnet.{name}", self._pool, self._pool_lock, eager=eager)
                                  if self.accel.cuda_graphs else fn)
        evictable = [n for n in self.nets if n not in self.resident and n != name]
        while evictable and sum(self._size(n_) for n_ in self.nets.values()) > self.cache_bytes:
            self.nets.pop(evictable.pop(0))
        return net

    @staticmethod
    def _graph_body(net, sample, timestep, encoder_hidden_states, added_cond, features):
        """The net's forward at conditioning scale 1 with the image features as an input."""
        net.controlnet_cond_embedding.graph_input = features
        try:
            down, mid = net(
                sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=features,
                conditioning_scale=1.0, added_cond_kwargs=added_cond, return_dict=False,
            )
        finally:
            net.controlnet_cond_embedding.graph_input = None
        return list(down), mid

    def warm_up(self, sizes: Sequence[tuple[int, int]], batches: Sequence[int] = (2,),
                compile_batches: Sequence[int] | None = None) -> float:
        """Capture (and compile) every resident ControlNet for each ``(height, width)`` in pixels
        and batch size; ``compile_batches`` as :meth:`UNetEngine.warm_up`. Returns the seconds taken."""
        if self.accel is None:
            return 0.0
        start = time.perf_counter()
        for name, fn in self._graphs.items():
            emb = self.nets[name].controlnet_cond_embedding
            for height, width in sizes:
                for batch in batches:
                    x = unet_example_inputs(self.folder, batch, height, width, self.device, self.dtype)
                    cond = torch.rand(batch, 3, height, width, device=self.device, dtype=self.dtype)
                    with torch.no_grad():
                        feats = emb.inner(cond)
                    args = (x["sample"], x["timestep"], x["encoder_hidden_states"], x["added_cond"], feats)
                    if isinstance(fn, CudaGraphs):
                        fn.capture(*args, compiled=compile_batches is None or batch in compile_batches)
                    else:
                        with torch.no_grad():
                            fn(*args)
        self.warmup_s += time.perf_counter() - start
        return time.perf_counter() - start

    def get(self, name: str):
        net = self.nets.get(name)
        if net is None:
            net = self._load(name)
        self.nets.move_to_end(name)
        return net

    @torch.no_grad()
    def __call__(
        self,
        name: str,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond: dict[str, torch.Tensor] | None,
        cond_image: torch.Tensor,
        scale: float,
        cond_key: str | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``cond_image [B, 3, H, W]`` in ``[0, 1]`` -> (down residuals, mid residual), already scaled.

        ``cond_key`` (a content hash of the control image) lets the image's
        features come from the feature cache.
        """
        with self._lock:
            return self._run(name, sample, timestep, encoder_hidden_states, added_cond, cond_image, scale, cond_key)

    def _run(self, name, sample, timestep, encoder_hidden_states, added_cond, cond_image, scale, cond_key):
        net = self.get(name)
        net.controlnet_cond_embedding.key = cond_key
        graph = self._graphs.get(name)
        if graph is not None:
            try:
                feats = net.controlnet_cond_embedding.features(cond_image)
            finally:
                net.controlnet_cond_embedding.key = None
            # the graph's outputs are its own buffers: scaling makes the caller's copies
            # (diffusers multiplies by the scale too: x * 1.0 * s == x * s exactly)
            down, mid = graph(sample, timestep.reshape(-1).to(sample.device, torch.float32).expand(sample.shape[0]),
                              encoder_hidden_states, added_cond, feats.contiguous())
            return ([(d * scale).contiguous() for d in down], (mid * scale).contiguous())
        try:
            down, mid = net(
                sample,
                timestep,
                encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=cond_image,
                conditioning_scale=scale,
                added_cond_kwargs=added_cond,
                return_dict=False,
            )
        finally:
            net.controlnet_cond_embedding.key = None
        return list(down), mid


def vae_compute_dtype(vae_config: dict, dtype: torch.dtype) -> torch.dtype:
    """The dtype the VAE runs in: float32 where the model asks for it (``force_upcast`` in its config,
    :attr:`ModelFolder.vae_config`, as the SDXL VAE does: its activations overflow float16) and
    ``dtype`` is float16, as diffusers decodes; otherwise ``dtype``. A VAE fixed for float16 (e.g.
    "sdxl-vae-fp16-fix") says ``force_upcast: false`` and runs in float16."""
    return torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast", False) else dtype


class VaeDecoderEngine:
    """VAE decoder: scaled latents ``[B, 4, h, w]`` -> image ``[B, 3, H, W]`` in ``[-1, 1]``, in ``dtype``
    (computed in :func:`vae_compute_dtype`).

    With ``accel`` on a CUDA device, :meth:`warm_up` compiles (``accel.compile_vae``) and captures
    (``accel.cuda_graphs``) the decode of one latent of each given size; other shapes run eagerly.
    (Channels-last convolutions made the SDXL decode slower on an H200, 131 vs 86 ms: it stays NCHW.)
    """

    def __init__(self, folder: ModelFolder, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 accel: Acceleration | None = None):
        self.device, self.dtype = torch.device(device), dtype
        self.compute_dtype = vae_compute_dtype(folder.vae_config, dtype)
        self.vae = folder.load_vae(device, self.compute_dtype)
        self.scale = folder.vae_scale_factor
        cfg = self.vae.config
        self.scaling_factor = cfg.scaling_factor
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        stats = mean is not None and std is not None
        self.latents_mean = torch.tensor(mean).view(1, -1, 1, 1).to(device, self.compute_dtype) if stats else None
        self.latents_std = torch.tensor(std).view(1, -1, 1, 1).to(device, self.compute_dtype) if stats else None
        self.warmup_s = 0.0  # compilation and graph capture at load
        self._fast = None  # the compiled and/or captured decode, for the shapes warmed up
        self._warmed: set[tuple[int, ...]] = set()
        self.compiled = False
        on_gpu = accel is not None and self.device.type == "cuda"
        if on_gpu and (accel.cuda_graphs or accel.compile_vae):
            self._fast = self._fast_decode(accel.compiled(self._decode, on=accel.compile_vae), accel.cuda_graphs)
            self.compiled = accel.compile_vae

    def _fast_decode(self, fn, graphs: bool):
        return CudaGraphs(fn, "vae.decode", *process_pool(self.device), eager=self._decode) if graphs else fn

    @torch.no_grad()
    def warm_up(self, sizes: Sequence[tuple[int, int]]) -> float:
        """Compile and capture the decode of one latent for every ``(height, width)`` in pixels.

        Where compiling fails (inductor needs a C compiler and Triton on the host), the decode
        stays uncompiled (with a warning) instead of failing the model's load."""
        if self._fast is None:
            return 0.0
        start = time.perf_counter()
        try:
            self._warm(sizes)
        except Exception as exc:
            if not self.compiled:
                raise
            warnings.warn(f"katz: compiling the VAE decoder failed ({type(exc).__name__}: {exc}); "
                          "it decodes uncompiled", RuntimeWarning, stacklevel=2)
            graphs = isinstance(self._fast, CudaGraphs)
            self.compiled, self._warmed = False, set()
            self._fast = self._fast_decode(self._decode, graphs) if graphs else None
            if self._fast is not None:
                self._warm(sizes)
        self.warmup_s += time.perf_counter() - start
        return time.perf_counter() - start

    def _warm(self, sizes: Sequence[tuple[int, int]]) -> None:
        channels = self.vae.config.latent_channels
        for height, width in sizes:
            x = torch.zeros(1, channels, height // self.scale, width // self.scale, device=self.device,
                            dtype=self.compute_dtype)
            if isinstance(self._fast, CudaGraphs):
                self._fast.capture(x)
            else:
                self._fast(x)
            self._warmed.add(tuple(x.shape))

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.device, self.compute_dtype)
        if self._fast is not None and tuple(latents.shape) in self._warmed:
            return self._fast(latents).clone()  # a captured graph's output is overwritten by the next replay
        return self._decode(latents)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.latents_mean is not None:
            mean = self.latents_mean.to(latents)
            std = self.latents_std.to(latents)
            latents = latents * std / self.scaling_factor + mean
        else:
            latents = latents / self.scaling_factor
        return self.vae.decode(latents, return_dict=False)[0].to(self.dtype)


class TextEncoderEngine:
    """CLIP text encoder(s) with LoRAs merged on demand; see :class:`katz.diffusion.text_encoding.PromptEncoder`."""

    def __init__(self, folder: ModelFolder, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.encoders = folder.load_text_encoders(device, dtype)
        self.encoder = PromptEncoder(self.encoders, folder.family)
        self.lora = [LoraPatcher(m, part) for part, m in self.encoders.items()]

    def set_loras(self, loras: Sequence[tuple[LoraWeights, float]]) -> None:
        for patcher in self.lora:
            _apply_loras(patcher, loras)

    def __call__(self, input_ids: dict[str, torch.Tensor], zero_negative: bool):
        return self.encoder.encode(input_ids, zero_negative)
