"""ONNX post-processing after ``torch.onnx.export``: parameter names on initializers, folded weight
transposes (what a TensorRT refit needs), external data for large files, content digests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

# Above this many bytes of weights an ONNX file keeps them in ``<name>.onnx.data`` (protobuf's limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30

def rename_initializers(model, prefix: str) -> None:
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


def drop_initializer_inputs(model) -> None:
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
