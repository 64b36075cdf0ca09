"""Triton configs for engines served by Triton's own TensorRT backend (``platform: "tensorrt_plan"``).

With ``engine: tensorrt`` the VAE decoder needs no Python at all: its engine takes the scaled
latents and returns the image (the unscaling is in the graph), so it is rendered as a
``tensorrt_plan`` model whose ``1/model.plan`` links to the engine folder's
``vae_decoder/1/model.plan``. The UNet and ControlNet engines stay behind the Python backend
(``python_katz``), which owns the LoRA refitter and the ControlNet registry and reads the
engine folder from the deployment parameters.
"""

from __future__ import annotations

import os
from pathlib import Path

TENSORRT_PLAN_MODELS = ("vae_decoder",)
_TRITON_DTYPE = {"float16": "TYPE_FP16", "float32": "TYPE_FP32", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64"}


def _dims(dims) -> str:
    return ", ".join(str(d) if isinstance(d, int) else "-1" for d in dims)


def tensorrt_plan_config(model: str, record, instance_group: str) -> str:
    """config.pbtxt of a ``tensorrt_plan`` model from its engine record (katz.export.tensorrt_build)."""
    lines = [f'name: "{model}"', 'platform: "tensorrt_plan"', "max_batch_size: 0"]
    for kind, specs in (("input", record.inputs), ("output", record.outputs)):
        body = ",\n".join(
            f'  {{ name: "{s["name"]}" data_type: {_TRITON_DTYPE[s["dtype"]]} dims: [ {_dims(s["dims"])} ] }}'
            for s in specs
        )
        lines.append(f"{kind} [\n{body}\n]")
    lines.append(f"instance_group [ {instance_group} ]")
    lines.append('default_model_filename: "model.plan"')
    return "\n".join(lines) + "\n"


def render_tensorrt_plans(deployment, out: Path, placement, models=TENSORRT_PLAN_MODELS) -> list[str]:
    """Re-render the rendered repository ``out``'s ``tensorrt_plan`` models for an ``engine:
    tensorrt`` deployment and link their plans; returns the models it changed."""
    from katz.engines.tensorrt.manifest import EngineManifest, EngineMismatch

    if not deployment.device.startswith("cuda"):
        raise EngineMismatch(f"engine tensorrt runs on CUDA devices, not {deployment.device!r}; use --device cuda")
    engine_dir = Path(deployment.engine_dir)
    manifest = EngineManifest.load(engine_dir)
    changed = []
    for model in models:
        if model not in TENSORRT_PLAN_MODELS or not (Path(out) / model).is_dir():
            continue
        record = manifest.engines.get(model)
        if record is None:
            raise EngineMismatch(f"{engine_dir} has no {model} engine; {manifest.rebuild_hint(engine_dir)}")
        if record.io_dtype != deployment.dtype:
            raise EngineMismatch(
                f"the {model} engine takes {record.io_dtype} tensors but the deployment uses {deployment.dtype}; "
                f"serve with --dtype {record.io_dtype}, or export and build again with --dtype {deployment.dtype}"
            )
        plan = engine_dir / record.file
        if not plan.exists():
            raise EngineMismatch(f"engine file {plan} is missing; {manifest.rebuild_hint(engine_dir)}")
        text = tensorrt_plan_config(model, record, placement.instance_group(model))
        queue = getattr(placement, "queue_policy", None)  # the bounded queue the python model had
        (Path(out) / model / "config.pbtxt").write_text(text + (queue(model) if queue else ""))
        link = Path(out) / model / "1" / "model.plan"
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(plan.resolve(), link)
        changed.append(model)
    return changed
