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

import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from katz.errors import ExportError
from katz.export.onnx_cleanup import (
    drop_initializer_inputs,
    file_digest,
    fold_weight_transposes,
    rename_initializers,
    save_onnx,
)
from katz.models.shapes import TORCH_DTYPES, Shape, ShapeRanges, TensorSpec

DEFAULT_OPSET = 17


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
    drop_initializer_inputs(model)
    rename_initializers(model, graph.wrapped_attr + ".")
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
