"""Numerical check of exported graphs: onnxruntime (CPU) against PyTorch.

Every graph is run with onnxruntime on sample inputs at several shapes (the traced one, batch 1
at the optimal size, and the range's extremes with a non-square image, which exercises the
dynamic axes) and compared with what Katz's PyTorch engines compute for the same inputs, by
relative L2 error ``||ort - torch|| / ||torch||`` per output. In float32 the bound is 1e-3.
The UNet's down/up split is also checked composed (``unet_down`` -> ``unet_up``) against the
full PyTorch UNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from katz.export.graph import Graph
from katz.models.shapes import TORCH_DTYPES, Shape, ShapeRanges

DEFAULT_TOLERANCE = {"float32": 1e-3, "float16": 2e-2}


@dataclass
class CheckResult:
    graph: str
    shape: tuple[int, int, int]  # batch, height, width (pixels)
    output: str
    rel_l2: float

    def __str__(self) -> str:
        b, h, w = self.shape
        return f"{self.graph:<20} {self.output:<22} batch {b} {w}x{h}px  rel L2 {self.rel_l2:.2e}"


class ParityError(AssertionError):
    """An exported graph disagrees with PyTorch beyond the tolerance."""


def rel_l2(actual, expected) -> float:
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return float("inf")
    den = np.linalg.norm(e)
    num = np.linalg.norm(a - e)
    return float(num / den) if den > 0 else float(num)


def check_shapes(graph: Graph, ranges: ShapeRanges) -> list[Shape]:
    """The trace shape, (1, opt, opt) and (max batch, min height, max width)."""
    out = [graph.trace_shape(ranges), Shape(1, ranges.opt_size, ranges.opt_size)]
    out.append(Shape(ranges.max_batch, ranges.min_size, ranges.max_size))
    return out


def session(path: Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    # idle ORT threads must not spin: the PyTorch reference runs right after on the same cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(sess, names: list[str], inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    feeds = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, feeds)))


def check_graph(
    graph: Graph,
    onnx_path: Path,
    dtype: str = "float32",
    ranges: ShapeRanges | None = None,
    component: torch.nn.Module | None = None,
    shapes: list[Shape] | None = None,
    seed: int = 1,
) -> list[CheckResult]:
    """Relative L2 of every output of ``graph`` (ORT on ``onnx_path`` vs PyTorch) at ``shapes``."""
    tdtype = TORCH_DTYPES[dtype]
    ranges = ranges or ShapeRanges.for_folder(graph.folder)
    component = component if component is not None else graph.load(tdtype)
    sess = session(onnx_path)
    results = []
    for shape in shapes or check_shapes(graph, ranges):
        inputs = graph.sample_inputs(shape, tdtype, seed=seed)
        with torch.no_grad():
            expected = graph.reference(component, inputs)
        got = _run(sess, graph.output_names, inputs)
        for name in graph.output_names:
            results.append(
                CheckResult(graph.name, (shape.batch, shape.height, shape.width), name,
                            rel_l2(got[name], expected[name].float().numpy()))
            )
    return results


def check_unet_split(folder, export_dir: Path, dtype: str = "float32", ranges: ShapeRanges | None = None,
                     seed: int = 2) -> list[CheckResult]:
    """``unet_down`` then ``unet_up`` (ORT) against the full PyTorch UNet with residuals."""
    from katz.export.unet import UNetDownGraph, UNetGraph, UNetUpGraph

    full, down, up = UNetGraph(folder), UNetDownGraph(folder), UNetUpGraph(folder)
    tdtype = TORCH_DTYPES[dtype]
    ranges = ranges or ShapeRanges.for_folder(folder)
    unet = full.load(tdtype)
    s_down, s_up = session(Path(export_dir) / "unet_down.onnx"), session(Path(export_dir) / "unet_up.onnx")
    results = []
    for shape in check_shapes(full, ranges):
        inputs = full.sample_inputs(shape, tdtype, seed=seed)
        with torch.no_grad():
            expected = full.reference(unet, inputs)["noise_pred"]
        mid = _run(s_down, down.output_names, inputs)
        feeds = {k: torch.from_numpy(v) for k, v in mid.items()}
        feeds.update(inputs)
        got = _run(s_up, up.output_names, feeds)["noise_pred"]
        results.append(CheckResult("unet_down+unet_up", (shape.batch, shape.height, shape.width), "noise_pred",
                                   rel_l2(got, expected.float().numpy())))
    return results


def check_export(export_dir: Path, folder=None, tolerance: float | None = None, log=lambda msg: None,
                 raise_on_failure: bool = True) -> list[CheckResult]:
    """Check every graph of an export folder (its manifest says which and in what dtype)."""
    from katz.export.manifest import ExportManifest, graphs_for

    export_dir = Path(export_dir)
    manifest = ExportManifest.load(export_dir)
    if folder is None:
        folder = manifest.folder()
    tolerance = DEFAULT_TOLERANCE[manifest.dtype] if tolerance is None else tolerance
    graphs = {g.name: g for g in graphs_for(folder, unet_split=True)}
    results: list[CheckResult] = []
    for name, record in manifest.graphs.items():
        if name not in graphs:
            continue
        res = check_graph(graphs[name], export_dir / record.file, manifest.dtype, manifest.ranges)
        for r in res:
            log(str(r))
        results += res
    if "unet_down" in manifest.graphs and "unet_up" in manifest.graphs:
        res = check_unet_split(folder, export_dir, manifest.dtype, manifest.ranges)
        for r in res:
            log(str(r))
        results += res
    bad = [r for r in results if not r.rel_l2 <= tolerance]
    if bad and raise_on_failure:
        raise ParityError(
            f"{len(bad)} output(s) differ from PyTorch by more than {tolerance:g} (relative L2):\n"
            + "\n".join(str(r) for r in bad)
        )
    return results
