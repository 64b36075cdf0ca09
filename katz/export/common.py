"""What every exported graph shares: shape ranges, tensor specs, the export itself, ONNX clean-up.

Each component module (:mod:`katz.export.unet`, ``controlnet``, ``vae``,
``text_encoder``) defines :class:`Graph` subclasses that own their wrapper
module, input/output names, dynamic axes and shape profiles; this module runs
``torch.onnx.export`` on them and post-processes the ONNX file so that

* every weight initializer is named after the PyTorch parameter it came from
  (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight``): the
  TorchScript exporter is used (``dynamo=False``) with
  ``keep_initializers_as_inputs=True`` because in eval mode it otherwise merges
  parameters that happen to hold equal values into one initializer, which would
  make a refit of one change the other;
* a Linear's ``Transpose(weight) -> MatMul`` is folded into one initializer
  that keeps the parameter's name and holds ``weight.T`` (TensorRT refits an
  initializer consumed by MatMul; :mod:`katz.lora.refit_map` records the
  transposition by tracing the graph);
* nothing else is constant-folded at export (TensorRT folds at build time).
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

DEFAULT_OPSET = 17
TEXT_LEN = 77  # CLIP's model_max_length; prompts are always padded to it (katz.diffusion.text_encoding.tokenize)
# Above this many bytes of weights an ONNX file keeps them in ``<name>.onnx.data`` (protobuf's limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class ExportError(RuntimeError):
    """An export or an export folder is unusable; the message says why."""


# --------------------------------------------------------------------------- #
# Shape ranges
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class ShapeRanges:
    """Batch and image-size ranges (pixels, both sides) the graphs and engines are built for.

    ``batch`` counts UNet/ControlNet rows: 2 with classifier-free guidance, 1 without
    (and 1 per GPU when latent parallelism splits the CFG pair). TensorRT
    optimization profiles are built from ``min``/``opt``/``max`` of each.
    """

    min_batch: int = 1
    opt_batch: int = 2
    max_batch: int = 2
    min_size: int = 256
    opt_size: int = 1024
    max_size: int = 1024

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"batch range must satisfy 1 <= min <= opt <= max, got {self.batch}")
        if not 8 <= self.min_size <= self.opt_size <= self.max_size:
            raise ValueError(f"size range must satisfy 8 <= min <= opt <= max, got {self.size}")
        for s in self.size:
            if s % 8:
                raise ValueError(f"sizes must be multiples of 8, got {s}")

    @property
    def batch(self) -> tuple[int, int, int]:
        return (self.min_batch, self.opt_batch, self.max_batch)

    @property
    def size(self) -> tuple[int, int, int]:
        return (self.min_size, self.opt_size, self.max_size)

    @classmethod
    def for_folder(
        cls,
        folder,
        min_size: int | None = None,
        opt_size: int | None = None,
        max_size: int | None = None,
        max_batch: int = 2,
    ) -> "ShapeRanges":
        """Defaults from the model: opt = its native size, min = native / 4, max = native × 2."""
        native = folder.default_size
        opt = opt_size or native
        lo = min_size or max(8, (native // 4) // 8 * 8)
        hi = max_size or native * 2
        lo, hi = min(lo, opt), max(hi, opt)
        return cls(min_batch=1, opt_batch=min(2, max_batch), max_batch=max_batch,
                   min_size=lo, opt_size=opt, max_size=hi)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ShapeRanges":
        return cls(**{k: int(v) for k, v in data.items() if k in cls.__dataclass_fields__})

    def missing_from(self, other: "ShapeRanges") -> list[str]:
        """What of ``self`` lies outside ``other`` (empty when ``other`` covers it)."""
        out = []
        if self.min_batch < other.min_batch or self.max_batch > other.max_batch:
            out.append(f"batch {self.min_batch}..{self.max_batch} (engine: {other.min_batch}..{other.max_batch})")
        if self.min_size < other.min_size or self.max_size > other.max_size:
            out.append(f"size {self.min_size}..{self.max_size} px (engine: {other.min_size}..{other.max_size} px)")
        return out


def down_sizes(size: int, times: int) -> list[int]:
    """``size`` after 0..times stride-2 convs (3x3, padding 1): each halves, rounding up."""
    out = [size]
    for _ in range(times):
        out.append(math.ceil(out[-1] / 2))
    return out


# --------------------------------------------------------------------------- #
# Graph specs
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``dtype``: "float" (the export's dtype), "float32" or "int64".
    ``dims``: ints are fixed, strings are dynamic axes (their ONNX dim_param)."""

    name: str
    dtype: str
    dims: tuple

    def onnx_dtype(self, float_dtype: str) -> str:
        return float_dtype if self.dtype == "float" else self.dtype


@dataclass
class Shape:
    """Concrete sizes one set of sample inputs or one profile point is made for."""

    batch: int
    height: int  # pixels
    width: int


class Graph:
    """One exported network. Subclasses set the class attributes and implement the methods."""

    name: str = ""  # file stem: unet, controlnet_<name>, vae_decoder, text_encoder[_2], unet_down, unet_up
    model: str = ""  # the Triton model it serves
    component: str = ""  # the PyTorch component whose parameter names the initializers keep
    lora_component: str | None = None  # the LoRA component that targets its weights (refit)
    refit: bool = False  # built weights-refittable
    wrapped_attr: str = "net"  # attribute of the wrapper that holds the component (stripped from names)

    def __init__(self, folder):
        self.folder = folder

    # -- what subclasses define --------------------------------------------- #
    @property
    def inputs(self) -> list[TensorSpec]:
        raise NotImplementedError

    @property
    def outputs(self) -> list[TensorSpec]:
        raise NotImplementedError

    def shapes(self, shape: Shape) -> dict[str, tuple[int, ...]]:
        """Concrete input shapes for ``shape``."""
        raise NotImplementedError

    def load(self, dtype: torch.dtype) -> torch.nn.Module:
        """The PyTorch component (CPU, eval)."""
        raise NotImplementedError

    def wrapper(self, component: torch.nn.Module) -> torch.nn.Module:
        """A module whose ``forward(*inputs)`` returns the outputs in order; it holds the component
        as ``self.<wrapped_attr>``."""
        raise NotImplementedError

    def reference(self, component: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What Katz's PyTorch engine computes for ``inputs`` (the ORT check compares against this)."""
        out = self.wrapper(component)(*[inputs[s.name] for s in self.inputs])
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {s.name: t for s, t in zip(self.outputs, out)}

    def sample_value(self, spec: TensorSpec, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator):
        return torch.randn(shape, generator=gen).to(dtype)

    # -- shared ------------------------------------------------------------- #
    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for spec in self.inputs + self.outputs:
            dyn = {i: d for i, d in enumerate(spec.dims) if isinstance(d, str)}
            if dyn:
                axes[spec.name] = dyn
        return axes

    def trace_shape(self, ranges: ShapeRanges) -> Shape:
        """Shape the export traces at: batch 2 and a latent side that is *not* a multiple of the
        UNet's up-sampling factor, so diffusers forwards explicit up-sampling sizes (taken from the
        skip connections) and the graph serves every size, not only multiples of 64 px."""
        vae = self.folder.vae_scale_factor
        blocks = len(self.folder.unet_config["down_block_types"])
        factor = 2 ** (blocks - 1)
        latent = 2 * factor + 2
        return Shape(batch=2, height=latent * vae, width=(latent + 2) * vae)

    def profile(self, ranges: ShapeRanges) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimization profile: input -> (min, opt, max) shapes."""
        points = [
            self.shapes(Shape(b, s, s)) for b, s in zip(ranges.batch, ranges.size)
        ]
        return {name: (points[0][name], points[1][name], points[2][name]) for name in self.input_names}

    def sample_inputs(self, shape: Shape, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        shapes = self.shapes(shape)
        out = {}
        for spec in self.inputs:
            t = {"float": dtype, "float32": torch.float32, "int64": torch.int64}[spec.dtype]
            out[spec.name] = self.sample_value(spec, shapes[spec.name], t, gen)
        return out


# --------------------------------------------------------------------------- #
# ONNX post-processing
# --------------------------------------------------------------------------- #
def _rename_initializers(model, prefix: str) -> None:
    """Strip ``prefix`` (the wrapper's attribute) from initializer names, everywhere they are used."""
    renames = {}
    for init in model.graph.initializer:
        if init.name.startswith(prefix):
            renames[init.name] = init.name[len(prefix):]
            init.name = renames[init.name]
    if not renames:
        return
    for node in _all_nodes(model.graph):
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for value in model.graph.value_info:
        if value.name in renames:
            value.name = renames[value.name]


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def _drop_initializer_inputs(model) -> None:
    """``keep_initializers_as_inputs=True`` lists every weight as a graph input too; undo that."""
    names = {i.name for i in model.graph.initializer}
    for i in reversed(range(len(model.graph.input))):
        if model.graph.input[i].name in names:
            del model.graph.input[i]


def fold_weight_transposes(model) -> list[str]:
    """Replace ``Transpose(W) -> MatMul`` by a MatMul on an initializer holding ``W.T`` (same name).

    Only 2-D initializers whose every consumer is such a Transpose are folded (then the original
    layout is needed nowhere). Returns the folded names; each gets a ``doc_string`` saying so.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name in inits:
                consumers.setdefault(name, []).append((index, node))
    graph_outputs = {o.name for o in graph.output}
    folded, replace, dropped = [], {}, set()
    for name, entries in consumers.items():
        init = inits[name]
        nodes = [n for _, n in entries]
        if len(init.dims) != 2 or not all(n.op_type == "Transpose" for n in nodes):
            continue
        perms = [next((list(a.ints) for a in n.attribute if a.name == "perm"), [1, 0]) for n in nodes]
        if any(p != [1, 0] for p in perms):
            continue
        if any(n.output[0] in graph_outputs for n in nodes):
            continue
        arr = numpy_helper.to_array(init)
        new = numpy_helper.from_array(np.ascontiguousarray(arr.T), name)
        new.doc_string = "katz: transposed from the PyTorch layout [out, in] to [in, out] (MatMul operand)"
        init.CopyFrom(new)
        for index, node in entries:
            replace[node.output[0]] = name
            dropped.add(index)
        folded.append(name)
    if folded:
        for node in graph.node:
            for i, inp in enumerate(node.input):
                if inp in replace:
                    node.input[i] = replace[inp]
        for i in sorted(dropped, reverse=True):
            del graph.node[i]
    return folded


def save_onnx(model, path: Path) -> None:
    """Write ``model``; weights go to ``<name>.data`` next to it when the file would be too large."""
    import onnx

    path = Path(path)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    weight_bytes = sum(_init_bytes(i) for i in model.graph.initializer)
    if weight_bytes > EXTERNAL_DATA_BYTES:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=data.name, size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


def _init_bytes(init) -> int:
    if init.raw_data:
        return len(init.raw_data)
    for loc in init.external_data:
        if loc.key == "length":
            return int(loc.value)
    return 4 * int(np.prod(init.dims)) if init.dims else 4


def file_digest(path: Path) -> str:
    """sha256 of an ONNX file and its external data file, if any."""
    h = hashlib.sha256()
    for p in (Path(path), Path(str(path) + ".data")):
        if p.exists():
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- #
# Export
# --------------------------------------------------------------------------- #
@dataclass
class ExportedGraph:
    """What the export manifest records of one graph."""

    name: str
    model: str
    component: str
    file: str
    dtype: str
    opset: int
    inputs: list[dict]
    outputs: list[dict]
    profile: dict[str, list[list[int]]]
    refit: bool
    lora_component: str | None
    transposed_weights: int = 0
    sha256: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ExportedGraph":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def export_graph(
    graph: Graph,
    out_dir: Path,
    dtype: str = "float16",
    ranges: ShapeRanges | None = None,
    opset: int = DEFAULT_OPSET,
    constant_folding: bool = False,
    component: torch.nn.Module | None = None,
    fold_transposes: bool = True,
) -> ExportedGraph:
    """Export ``graph`` to ``out_dir/<name>.onnx`` and return its manifest entry.

    ``constant_folding=True`` lets the exporter fold constants (Linear weights then become
    anonymous ``onnx::MatMul_N`` initializers); it exists to show that the refit map copes.
    """
    import onnx

    if opset < 17:
        raise ExportError(f"opset {opset} < 17: LayerNormalization needs opset 17")
    if dtype not in TORCH_DTYPES:
        raise ExportError(f"unknown export dtype {dtype!r}; choose float32 or float16")
    ranges = ranges or ShapeRanges.for_folder(graph.folder)
    tdtype = TORCH_DTYPES[dtype]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    component = component if component is not None else graph.load(tdtype)
    wrapper = graph.wrapper(component).eval()
    inputs = graph.sample_inputs(graph.trace_shape(ranges), tdtype)
    args = tuple(inputs[n] for n in graph.input_names)
    tmp = Path(tempfile.mkdtemp(prefix=f".{graph.name}-", dir=out_dir))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                args,
                str(tmp / "graph.onnx"),
                dynamo=False,
                input_names=graph.input_names,
                output_names=graph.output_names,
                dynamic_axes=graph.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=constant_folding,
                keep_initializers_as_inputs=True,
            )
        model = onnx.load(str(tmp / "graph.onnx"), load_external_data=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _drop_initializer_inputs(model)
    _rename_initializers(model, graph.wrapped_attr + ".")
    folded = fold_weight_transposes(model) if fold_transposes else []
    _set_metadata(model, {"katz.graph": graph.name, "katz.component": graph.component, "katz.dtype": dtype})
    path = out_dir / f"{graph.name}.onnx"
    save_onnx(model, path)
    onnx_dtype = {"float32": "float32", "float16": "float16"}[dtype]
    return ExportedGraph(
        name=graph.name,
        model=graph.model,
        component=graph.component,
        file=path.name,
        dtype=dtype,
        opset=opset,
        inputs=[{"name": s.name, "dtype": s.onnx_dtype(onnx_dtype), "dims": list(s.dims)} for s in graph.inputs],
        outputs=[{"name": s.name, "dtype": s.onnx_dtype(onnx_dtype), "dims": list(s.dims)} for s in graph.outputs],
        profile={k: [list(v) for v in p] for k, p in graph.profile(ranges).items()},
        refit=graph.refit,
        lora_component=graph.lora_component,
        transposed_weights=len(folded),
        sha256=file_digest(path),
    )


def _set_metadata(model, values: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for k, v in values.items():
        if k in existing:
            existing[k].value = v
        else:
            p = model.metadata_props.add()
            p.key, p.value = k, v


class preloaded:
    """A stand-in for a ModelFolder whose ``load_*`` return components already in memory, so
    the checks can run Katz's own PyTorch engine classes on the very modules that were exported."""

    def __init__(self, folder, **components):
        self._folder, self._components = folder, components

    def __getattr__(self, name):
        return getattr(self._folder, name)

    def load_unet(self, device="cpu", dtype=None):
        return self._components["unet"]

    def load_vae(self, device="cpu", dtype=None):
        return self._components["vae"]
