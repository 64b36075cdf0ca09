"""LoRA refit map: from a LoRA's target modules to the engine's weight names.

TensorRT names refittable weights after the ONNX initializers they were parsed from, so the map
is built from the ONNX graph. For every Linear / Conv2d weight of the PyTorch component it gives
the initializer's name, its shape, and whether it holds the *transpose* of the PyTorch weight
(a Linear on a 3-D input is exported as ``MatMul(x, W.T)``). The module an initializer belongs
to is found

* from its name when it is the PyTorch parameter name (Katz's own exports), or
* by tracing the graph to the MatMul / Gemm / Conv that consumes it, through ``Transpose`` /
  ``Cast`` / ``Identity`` nodes, and reading that node's module scope
  (``/down_blocks.1/attentions.0/.../to_q/MatMul``): exports that let the exporter fold
  constants name such weights ``onnx::MatMul_1234``.

Whether the initializer is transposed is decided by the graph too (MatMul's second operand,
Gemm's ``transB``, the parity of Transposes on the way), never by comparing shapes, so square
weights come out right. :meth:`RefitMap.merged_weight` computes LoRA-merged weights in the
engine's layout with exactly the arithmetic of :class:`katz.lora.patch.LoraPatcher`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from katz.errors import LoraError
from katz.lora.weights import LoraLayer, LoraWeights, PathIndex, lora_delta, lora_fits

REFIT_MAP_VERSION = 1
_PASS_THROUGH = ("Transpose", "Cast", "Identity")
_WRAPPER_SCOPES = ("net",)  # the export wrappers' attribute holding the component


@dataclass(frozen=True)
class RefitEntry:
    module: str  # PyTorch module path, e.g. down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q
    onnx_name: str  # ONNX initializer = TensorRT weight name
    kind: str  # "linear" or "conv"
    transposed: bool  # the initializer holds weight.T (PyTorch [out, in] -> [in, out])
    shape: tuple[int, ...]  # the initializer's shape
    torch_shape: tuple[int, ...]  # the PyTorch weight's shape

    def to_engine_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """A tensor in PyTorch layout -> the engine weight's layout (contiguous)."""
        return (weight.t() if self.transposed else weight).contiguous()

    def to_torch_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight.t() if self.transposed else weight).contiguous()


@dataclass
class RefitMap:
    component: str
    entries: dict[str, RefitEntry] = field(default_factory=dict)  # by module path
    unmapped: list[str] = field(default_factory=list)  # Linear/Conv2d modules in the graph without a weight
    unused: list[str] = field(default_factory=list)  # Linear/Conv2d modules the graph does not use at all
    problems: list[str] = field(default_factory=list)  # initializers that looked like weights but did not fit

    # -------------------------------------------------------------- storage
    def to_json(self) -> dict:
        return {
            "version": REFIT_MAP_VERSION,
            "component": self.component,
            "entries": [asdict(e) for e in self.entries.values()],
            "unmapped": self.unmapped,
            "unused": self.unused,
            "problems": self.problems,
        }

    @classmethod
    def from_json(cls, data: dict) -> "RefitMap":
        if data.get("version") != REFIT_MAP_VERSION:
            raise ValueError(f"refit map version {data.get('version')} is not {REFIT_MAP_VERSION}; export again")
        entries = {}
        for e in data["entries"]:
            e = dict(e, shape=tuple(e["shape"]), torch_shape=tuple(e["torch_shape"]))
            entries[e["module"]] = RefitEntry(**e)
        return cls(component=data["component"], entries=entries, unmapped=list(data.get("unmapped", [])),
                   unused=list(data.get("unused", [])), problems=list(data.get("problems", [])))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: Path) -> "RefitMap":
        return cls.from_json(json.loads(Path(path).read_text()))

    # ------------------------------------------------------------- queries
    @property
    def weight_names(self) -> dict[str, RefitEntry]:
        return {e.onnx_name: e for e in self.entries.values()}

    def coverage(self, targets: Iterable[str]) -> tuple[list[str], list[str], list[str]]:
        """(mapped, unused, missing) of ``targets`` (LoRA-style names are resolved): mapped to an
        engine weight; not used by this graph at all (a LoRA on them changes nothing here);
        neither (not refittable)."""
        index, unused_index = PathIndex(self.entries), PathIndex(self.unused)
        mapped, unused, missing = [], [], []
        for t in targets:
            if index.resolve(t) is not None:
                mapped.append(t)
            elif unused_index.resolve(t) is not None:
                unused.append(t)
            else:
                missing.append(t)
        return mapped, unused, missing

    def plan(self, lora: LoraWeights, what: str = "TensorRT engine") -> list[tuple[RefitEntry, LoraLayer]]:
        """The engine weights ``lora`` changes; raises LoraError naming every target that the
        engine cannot refit (no weight for it, or a LoRA shape that does not fit)."""
        return plan_lora([(self, None)], lora, what)[0]

    def check_lora(self, lora: LoraWeights, what: str = "TensorRT engine") -> None:
        self.plan(lora, what)

    @staticmethod
    @torch.no_grad()
    def merged_weight(entry: RefitEntry, base: torch.Tensor, items: Sequence[tuple[float, LoraLayer]]) -> torch.Tensor:
        """``base`` (engine layout) + the LoRAs ``items`` = [(scale, layer)], in the engine layout and
        ``base``'s dtype: the sum :class:`katz.lora.patch.LoraPatcher` forms (in float32, rounded once to
        ``base``'s dtype), equal to its result up to the BLAS's summation order (a bit or two)."""
        cdt = torch.float64 if base.dtype == torch.float64 else torch.float32
        delta = entry.to_engine_layout(lora_delta(items, entry.torch_shape, cdt, base.device))
        return (base.to(cdt) + delta).to(base.dtype)


def plan_lora(
    maps: Sequence[tuple[RefitMap, set[str] | None]], lora: LoraWeights, what: str = "TensorRT engine"
) -> list[list[tuple[RefitEntry, LoraLayer]]]:
    """Per refit map, the (entry, layer) pairs of ``lora``'s layers for the maps' component.

    ``maps`` holds the refit maps of one component's engines (the UNet's down and up halves, say)
    with the weight names each engine really exposes as refittable (None: all of its map). A target
    is fine when some engine maps it, or when no engine uses its module at all (a LoRA on it changes
    nothing). Raises :class:`LoraError` naming every other target, and every shape that does not fit.
    """
    component = maps[0][0].component if maps else ""
    usable = []
    for refit, names in maps:
        entries = {k: e for k, e in refit.entries.items() if names is None or e.onnx_name in names}
        usable.append((PathIndex(entries), PathIndex(refit.unused), entries))
    plans: list[list[tuple[RefitEntry, LoraLayer]]] = [[] for _ in maps]
    missing, misfit, seen = [], [], {}
    for target, layer in lora.layers.get(component, {}).items():
        key = layer.key or target
        hit, unused_everywhere = False, True
        for i, (index, unused, entries) in enumerate(usable):
            path = index.resolve(target)
            if path is None:
                unused_everywhere = unused_everywhere and unused.resolve(target) is not None
                continue
            hit = True
            if (i, path) in seen:
                raise LoraError(
                    f"lora {lora.name!r}: tensors {seen[(i, path)]!r} and {key!r} both target "
                    f"{component} module {path!r}"
                )
            seen[(i, path)] = key
            entry = entries[path]
            if not _fits(entry, layer):
                misfit.append(
                    f"{path} (up {list(layer.up.shape)} @ down {list(layer.down.shape)} "
                    f"vs weight {list(entry.torch_shape)})"
                )
                continue
            plans[i].append((entry, layer))
        if not hit and not unused_everywhere:
            missing.append(target)
    if missing or misfit:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} target(s) of the {component} are not refittable in the {what}: "
                + ", ".join(sorted(missing))
            )
        if misfit:
            parts.append("shape mismatch for " + ", ".join(sorted(set(misfit))))
        raise LoraError(f"lora {lora.name!r}: " + "; ".join(parts))
    return plans


def _fits(entry: RefitEntry, layer: LoraLayer) -> bool:
    return lora_fits(layer.down, layer.up, entry.torch_shape)


# --------------------------------------------------------------------------- #
# Building
# --------------------------------------------------------------------------- #
def lora_targets(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every module a LoRA can adapt: Linear and (non-grouped) Conv2d, by the path its weight's
    state-dict name gives (wrappers added later, e.g. by caches, do not change it)."""
    out = {}
    for pname, _ in module.named_parameters():
        if not pname.endswith(".weight"):
            continue
        path = pname[: -len(".weight")]
        m = module.get_submodule(path)
        if isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.groups == 1):
            out[path] = m
    return out


def _scope_module(node_name: str) -> str | None:
    """'/net/down_blocks.1/attentions.0/to_q/MatMul' -> 'down_blocks.1.attentions.0.to_q'."""
    if not node_name.startswith("/"):
        return None
    parts = [p for p in node_name.split("/")[1:-1] if p]
    if parts and parts[0] in _WRAPPER_SCOPES:
        parts = parts[1:]
    return ".".join(parts) if parts else None


def _trace(name: str, consumers: Mapping[str, list], max_hops: int = 4):
    """Follow ``name`` through pass-through nodes to the layers using it.

    Yields (node, input index, number of 2-D transposes on the way)."""
    frontier = [(name, 0)]
    for _ in range(max_hops + 1):
        nxt = []
        for value, flips in frontier:
            for node, idx in consumers.get(value, []):
                if node.op_type in _PASS_THROUGH:
                    f = flips
                    if node.op_type == "Transpose":
                        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                        if perm not in (None, [1, 0]):
                            continue
                        f += 1
                    nxt.append((node.output[0], f))
                else:
                    yield node, idx, flips
        if not nxt:
            return
        frontier = nxt


def build_refit_map(model, component: torch.nn.Module | None, component_name: str) -> RefitMap:
    """Map every Linear/Conv2d weight of ``component`` to its initializer in ``model`` (an
    onnx.ModelProto; external data need not be loaded)."""
    graph = model.graph
    inits = {i.name: tuple(int(d) for d in i.dims) for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for idx, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, idx))
    modules = lora_targets(component) if component is not None else None
    result = RefitMap(component=component_name)

    for name, dims in inits.items():
        if len(dims) not in (2, 4):
            continue
        uses = list(_trace(name, consumers))
        if not uses:
            continue
        layer_uses = [(n, i, f) for n, i, f in uses if n.op_type in ("MatMul", "Gemm", "Conv") and i == 1]
        if not layer_uses or len(layer_uses) != len(uses):
            continue  # not (only) a layer weight: a constant of some other op
        layouts = set()
        for node, _idx, flips in layer_uses:
            if node.op_type == "MatMul":
                consumer_transposed = True  # MatMul(x, W) computes x @ W = x @ weight.T
            elif node.op_type == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                consumer_transposed = not trans_b
            else:
                consumer_transposed = False
            layouts.add(consumer_transposed ^ (flips % 2 == 1))
        if len(layouts) != 1:
            result.problems.append(f"{name}: used in both layouts")
            continue
        transposed = layouts.pop()
        kind = "conv" if layer_uses[0][0].op_type == "Conv" else "linear"
        # which module: the parameter name, else the consuming layer's scope
        module = None
        if name.endswith(".weight"):
            module = name[: -len(".weight")]
            for w in _WRAPPER_SCOPES:
                if module.startswith(w + ".") and modules is not None and module not in modules:
                    module = module[len(w) + 1 :]
        if module is None or (modules is not None and module not in modules):
            scopes = {_scope_module(n.name) for n, _, _ in layer_uses}
            module = scopes.pop() if len(scopes) == 1 else None
        if module is None:
            result.problems.append(f"{name}: no module scope")
            continue
        torch_shape = tuple(reversed(dims)) if transposed else dims
        if modules is not None:
            mod = modules.get(module)
            if mod is None:
                result.problems.append(f"{name}: module {module!r} is not a Linear/Conv2d of the {component_name}")
                continue
            if tuple(mod.weight.shape) != torch_shape:
                result.problems.append(
                    f"{name}: shape {list(dims)} (transposed={transposed}) does not fit "
                    f"{module} {list(mod.weight.shape)}"
                )
                continue
            if (kind == "conv") != isinstance(mod, torch.nn.Conv2d):
                result.problems.append(f"{name}: {kind} initializer for a {type(mod).__name__}")
                continue
        if module in result.entries:
            result.problems.append(f"{name}: second initializer for {module} ({result.entries[module].onnx_name})")
            continue
        result.entries[module] = RefitEntry(module, name, kind, transposed, dims, torch_shape)
    if modules is not None:
        scopes = set()
        for node in graph.node:
            scope = _scope_module(node.name)
            parts = scope.split(".") if scope else []
            for i in range(1, len(parts) + 1):
                scopes.add(".".join(parts[:i]))
        left = sorted(set(modules) - set(result.entries))
        result.unused = [m for m in left if m not in scopes and f"{m}.weight" not in inits]
        result.unmapped = [m for m in left if m not in result.unused]
    return result


def verify_values(refit: RefitMap, model, component: torch.nn.Module) -> list[str]:
    """Modules whose initializer does not hold the PyTorch weight (in the recorded layout);
    ``model`` must have its weights loaded."""
    from onnx import numpy_helper

    arrays = {i.name: i for i in model.graph.initializer}
    modules = dict(component.named_modules())
    bad = []
    for path, entry in refit.entries.items():
        value = torch.from_numpy(numpy_helper.to_array(arrays[entry.onnx_name]).copy())
        expect = entry.to_engine_layout(modules[path].weight.detach())
        if value.shape != expect.shape or not torch.equal(value.to(expect.dtype), expect):
            bad.append(path)
    return bad
