"""Render the Triton model repository from ``model_repository/`` templates.

The templates hold each model's config with ``${name}`` placeholders; this
module fills in what depends on the deployment: the model family's extra
tensors (the second tokenizer and pooled embeddings of SDXL and FLUX, SDXL's added
conditioning, the UNet's residual count), the dtype, instance groups and the deployment
parameters. A FLUX deployment's ``unet`` model is its transformer (loop requests only; ``katz_stream``
sends it loop requests that report their steps, :mod:`katz.serving.progress`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from katz.deployment import Deployment
from katz.parallel.shards import unet_model_names

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = PROJECT_ROOT / "model_repository"
BACKEND_SOURCE = PROJECT_ROOT / "backends" / "python_katz"

MODELS = (
    "katz",
    "preprocessing",
    "text_encoder",
    "katz_pipeline",
    "unet",
    "controlnet",
    "vae_decoder",
    "postprocessing",
    "png_encoder",
    "katz_stream",
)
# the ensemble's steps: each gets a bounded queue (Placement.queue_policy)
QUEUED_MODELS = ("preprocessing", "text_encoder", "katz_pipeline", "vae_decoder", "postprocessing", "png_encoder")
# models that run networks and take an instance group on GPU hosts
GPU_MODELS = ("text_encoder", "katz_pipeline", "katz_stream", "unet", "controlnet", "vae_decoder")


@dataclass
class Placement:
    """Where each model runs: device kind, instance count and GPU list per model."""

    device: str = "cpu"  # "cpu" or "cuda"
    counts: dict[str, int] = field(default_factory=dict)
    gpus: dict[str, list[int]] = field(default_factory=dict)
    # admission: requests waiting at each ensemble step (0: unbounded) and how long they may wait (0: no limit)
    max_queue_size: int = 0
    queue_timeout_s: float = 0.0

    def count(self, model: str) -> int:
        default = 2 if model == "katz_pipeline" else 1
        return self.counts.get(model, default)

    def instance_group(self, model: str, host: frozenset[str] = frozenset()) -> str:
        """``host``: models that run on the host on a GPU deployment too (:func:`host_models`)."""
        on_gpu = (model in GPU_MODELS or model.startswith("unet_")) and model not in host  # unet_1, ...: shards
        if self.device == "cpu" or not on_gpu:
            return f"{{ kind: KIND_CPU count: {self.count(model)} }}"
        gpus = ", ".join(str(g) for g in self.gpus.get(model, [0]))
        return f"{{ kind: KIND_GPU count: {self.count(model)} gpus: [ {gpus} ] }}"

    def queue_policy(self, model: str) -> str:
        """A bounded queue (Triton queue policy) for the ensemble's steps; requests beyond
        ``max_queue_size`` waiting, or waiting longer than ``queue_timeout_s``, fail at once
        with UNAVAILABLE. ``unet``/``controlnet`` are only called by the pipeline instances,
        so their queues are bounded by those; they keep their own settings."""
        if model not in QUEUED_MODELS or (self.max_queue_size <= 0 and self.queue_timeout_s <= 0):
            return ""
        return (
            "dynamic_batching { default_queue_policy { timeout_action: REJECT "
            f"default_timeout_microseconds: {int(self.queue_timeout_s * 1e6)} allow_timeout_override: true "
            f"max_queue_size: {max(self.max_queue_size, 0)} }} }}\n"
        )


def host_models(deployment: Deployment) -> frozenset[str]:
    """Models of :data:`GPU_MODELS` that need no GPU in this deployment: ``katz_pipeline`` when the
    denoising loop runs inside the ``unet`` model (:attr:`katz.deployment.Deployment.loop_place`),
    where it only forwards the text embeddings to the UNet and the latents to the VAE (a GPU instance
    would hold a CUDA context, ~0.55 GB per instance, for nothing), and ``katz_stream``, which then
    only relays that loop and its step reports (:mod:`katz.serving.progress`)."""
    return frozenset({"katz_pipeline", "katz_stream"}) if deployment.loop_place == "unet" else frozenset()


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _parameters(params: dict[str, str]) -> str:
    return "\n".join(f"parameters {{ key: {_quote(k)} value {{ string_value: {_quote(v)} }} }}" for k, v in params.items())


def _tensor(name: str, dtype: str, dims: str, optional: bool = False) -> str:
    opt = " optional: true" if optional else ""
    return f"  {{ name: {_quote(name)} data_type: {dtype} dims: [ {dims} ]{opt} }}"


def _ensemble_inputs() -> str:
    """The ``katz`` ensemble's input list (``katz_stream`` takes the same request tensors)."""
    text = (TEMPLATES / "katz" / "config.pbtxt").read_text()
    block = text[text.index("input [") + len("input [") :]
    return block[: block.index("\n]")].strip("\n")


def template_values(deployment: Deployment) -> dict[str, str]:
    """Placeholder values shared by all templates."""
    folder = deployment.folder
    dtype = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}[deployment.dtype]
    sdxl = folder.family == "sdxl"
    two = folder.family in ("sdxl", "flux")  # a second tokenizer and encoder, pooled embeddings
    residuals = folder.residual_names if folder.family != "flux" else []
    return {
        "dtype": dtype,
        "extra_outputs_preprocessing": _tensor("input_ids_2", "TYPE_INT64", "-1, -1") + "," if two else "",
        "extra_inputs_text_encoder": _tensor("input_ids_2", "TYPE_INT64", "-1, -1") + "," if two else "",
        "extra_outputs_text_encoder": ",\n" + _tensor("pooled_prompt_embeds", dtype, "-1, -1") if two else "",
        "extra_inputs_katz_pipeline": _tensor("pooled_prompt_embeds", dtype, "-1, -1") + "," if two else "",
        "added_cond_inputs": (
            _tensor("text_embeds", dtype, "-1, -1") + ",\n" + _tensor("time_ids", dtype, "-1, 6") + ","
            if sdxl
            else ""
        ),
        "unet_added_cond_inputs": (
            _tensor("text_embeds", dtype, "-1", optional=True) + ",\n"
            + _tensor("time_ids", dtype, "6", optional=True) + "," if sdxl else ""
        ),
        "unet_loop_pooled_input": _tensor("loop_pooled_prompt_embeds", dtype, "-1, -1", optional=True) + ","
        if two else "",
        # katz_stream's loop requests name a progress channel (katz.serving.progress)
        "unet_loop_progress_input": _tensor("loop_progress", "TYPE_STRING", "1", optional=True) + ",",
        "unet_residual_inputs": "".join(_tensor(r, dtype, "-1, -1, -1", optional=True) + ",\n" for r in residuals),
        "residual_outputs": ",\n".join(_tensor(r, dtype, "-1, -1, -1, -1") for r in residuals),
        "preprocessing_extra_outputs": (
            '      output_map { key: "input_ids_2" value: "_input_ids_2" }' if two else ""
        ),
        "text_encoder_extra_inputs": '      input_map { key: "input_ids_2" value: "_input_ids_2" }' if two else "",
        "text_encoder_extra_outputs": (
            '      output_map { key: "pooled_prompt_embeds" value: "_pooled_prompt_embeds" }' if two else ""
        ),
        "pipeline_extra_inputs": (
            '      input_map { key: "pooled_prompt_embeds" value: "_pooled_prompt_embeds" }' if two else ""
        ),
        "ensemble_inputs": _ensemble_inputs(),
    }


def render_repository(
    deployment: Deployment, out: Path, placement: Placement | None = None, models: tuple[str, ...] = MODELS
) -> Path:
    """Write ``out/<model>/config.pbtxt`` (+ an empty version folder ``1/``) for each of ``models``
    (all by default; ``("controlnet",)`` makes a stand-alone ControlNet server). With
    ``controlnet_mode`` local (FLUX: other than service) the UNet instances hold the ControlNets: no
    ``controlnet`` model."""
    placement = placement or Placement(device="cuda" if deployment.device.startswith("cuda") else "cpu")
    flux = deployment.folder.family == "flux"
    if deployment.controlnet_mode == "local" or (flux and deployment.controlnet_mode != "service"):
        # FLUX ControlNets run in the transformer's process unless they are a service
        models = tuple(m for m in models if m != "controlnet")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    common = template_values(deployment)
    params = _parameters(deployment.to_parameters())
    host = host_models(deployment)
    targets = []  # (template, model name): the UNet template renders one model per latent-parallel shard
    for model in models:
        names = unet_model_names(deployment.unet_shards) if model == "unet" else [model]
        targets += [(model, name) for name in names]
    for template, model in targets:
        if flux and template == "controlnet":  # one response per block residual (katz.controlnet.blocks)
            template = "flux_controlnet"
        text = (TEMPLATES / template / "config.pbtxt").read_text()
        values = dict(common)
        values.update(
            unet_name=model,
            parameters=params,
            instance_group=placement.instance_group(model, host),
            cpu_count=str(placement.count(model)),
            extra_inputs=common.get(f"extra_inputs_{model}", ""),
            extra_outputs=common.get(f"extra_outputs_{model}", ""),
        )
        if "KIND_GPU" in values["instance_group"]:
            # GPU tensors from other models (BLS, ensemble) stay on the GPU; the Python backend's
            # default copies every input to host memory (107 MB of ControlNet residuals per step)
            values["parameters"] += "\n" + _parameters({"FORCE_CPU_ONLY_INPUT_TENSORS": "no"})
        rendered = Template(text).substitute(values)
        rendered = "\n".join(line for line in rendered.splitlines() if line.strip()) + "\n"
        if "dynamic_batching" not in rendered:  # a template with its own batcher keeps its settings
            rendered += placement.queue_policy(model)
        (out / model / "1").mkdir(parents=True)
        (out / model / "config.pbtxt").write_text(rendered)
    if getattr(deployment, "engine", "torch") == "tensorrt":  # the VAE decoder as a tensorrt_plan model
        from katz.deploy.tensorrt_plans import render_tensorrt_plans

        render_tensorrt_plans(deployment, out, placement, models)
    return out
