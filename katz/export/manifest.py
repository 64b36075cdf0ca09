"""Exporting a whole model folder, and the export folder's manifest (``export.json``).

An export folder holds ``<graph>.onnx`` (+ ``<graph>.onnx.data`` for large ones), a refit map
``<graph>.refit.json`` for every weights-refittable graph, and ``export.json`` recording the
model, dtype, opset, shape ranges and, per graph, its tensors, TensorRT profile and sha256.
``katz build-engines`` reads only this folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from katz.errors import ExportError
from katz.export.graph import DEFAULT_OPSET, ExportedGraph, Graph, export_graph
from katz.models.shapes import ShapeRanges

MANIFEST = "export.json"
MANIFEST_VERSION = 1
# what `katz export --components` accepts
COMPONENTS = ("unet", "controlnet", "vae_decoder", "text_encoder")


def graphs_for(folder, components=None, unet_split: bool = False) -> list[Graph]:
    """The graphs of ``folder`` (a ModelFolder): UNet, each ControlNet, VAE decoder, text encoders."""
    from katz.export.controlnet import ControlNetGraph
    from katz.export.text_encoder import TextEncoderGraph
    from katz.export.unet import UNetDownGraph, UNetGraph, UNetUpGraph
    from katz.export.vae import VaeDecoderGraph

    components = tuple(components or COMPONENTS)
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ExportError(f"unknown component(s) {', '.join(sorted(unknown))}; choose from {', '.join(COMPONENTS)}")
    graphs: list[Graph] = []
    if "unet" in components:
        graphs.append(UNetGraph(folder))
        if unet_split:
            graphs += [UNetDownGraph(folder), UNetUpGraph(folder)]
    if "controlnet" in components:
        graphs += [ControlNetGraph(folder, name) for name in folder.controlnets]
    if "vae_decoder" in components:
        graphs.append(VaeDecoderGraph(folder))
    if "text_encoder" in components:
        graphs += [TextEncoderGraph(folder, part) for part in folder.text_encoder_parts]
    return graphs


@dataclass
class ExportManifest:
    model_dir: str
    family: str
    dtype: str
    opset: int
    ranges: ShapeRanges
    graphs: dict[str, ExportedGraph] = field(default_factory=dict)
    controlnets: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    version: int = MANIFEST_VERSION
    checkpoint: str = ""  # a single-file model: model_dir is its architecture's config folder
    variant: str = ""  # --variant as exported ("": the dtype's where present)

    def folder(self):
        """The model this export was made from (:class:`katz.models.folder.ModelFolder`)."""
        from katz.models.folder import ModelFolder

        return ModelFolder(Path(self.model_dir), {k: Path(v) for k, v in self.controlnets.items()},
                           self.variant or None, self.dtype, Path(self.checkpoint) if self.checkpoint else None)

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "model_dir": self.model_dir,
            "family": self.family,
            "dtype": self.dtype,
            "opset": self.opset,
            "ranges": self.ranges.to_json(),
            "controlnets": self.controlnets,
            "checkpoint": self.checkpoint,
            "variant": self.variant,
            "created": self.created,
            "graphs": {k: g.to_json() for k, g in self.graphs.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> "ExportManifest":
        if data.get("version") != MANIFEST_VERSION:
            raise ExportError(f"export manifest version {data.get('version')} is not {MANIFEST_VERSION}; export again")
        return cls(
            model_dir=data["model_dir"],
            family=data["family"],
            dtype=data["dtype"],
            opset=int(data["opset"]),
            ranges=ShapeRanges.from_json(data["ranges"]),
            graphs={k: ExportedGraph.from_json(v) for k, v in data["graphs"].items()},
            controlnets=data.get("controlnets", {}),
            checkpoint=data.get("checkpoint", ""),
            variant=data.get("variant", ""),
            created=float(data.get("created", 0.0)),
        )

    def save(self, out_dir: Path) -> Path:
        path = Path(out_dir) / MANIFEST
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, out_dir: Path) -> "ExportManifest":
        path = Path(out_dir) / MANIFEST
        if not path.exists():
            raise ExportError(
                f"{out_dir} is not a Katz export folder (no {MANIFEST}); run `katz export --out {out_dir}`"
            )
        return cls.from_json(json.loads(path.read_text()))


def export_folder(
    folder,
    out_dir: Path,
    dtype: str = "float16",
    ranges: ShapeRanges | None = None,
    opset: int = DEFAULT_OPSET,
    components=None,
    unet_split: bool = False,
    log: Callable[[str], None] = lambda msg: None,
) -> ExportManifest:
    """Export every graph of ``folder`` into ``out_dir`` with refit maps and ``export.json``."""
    from katz.lora.refit_map import build_refit_map
    from katz.models.shapes import TORCH_DTYPES

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranges = ranges or ShapeRanges.for_folder(folder)
    manifest = ExportManifest(
        model_dir=str(folder.path),
        family=folder.family,
        dtype=dtype,
        opset=opset,
        ranges=ranges,
        controlnets={k: str(v) for k, v in folder.controlnets.items()},
        checkpoint=str(folder.checkpoint or ""),
        variant=folder.variant or "",
        created=time.time(),
    )
    for graph in graphs_for(folder, components, unet_split):
        start = time.perf_counter()
        component = graph.load(TORCH_DTYPES[dtype])
        record = export_graph(graph, out_dir, dtype, ranges, opset, component=component)
        if graph.refit:
            import onnx

            model = onnx.load(str(out_dir / record.file), load_external_data=False)
            refit = build_refit_map(model, component, graph.component)
            refit.save(out_dir / f"{graph.name}.refit.json")
            record.extra["refit_map"] = f"{graph.name}.refit.json"
            record.extra["refittable_modules"] = len(refit.entries)
        manifest.graphs[graph.name] = record
        del component
        log(f"exported {record.file} ({time.perf_counter() - start:.1f}s)")
    manifest.save(out_dir)
    return manifest
