"""``unet``: UNet evaluations with bounded asynchronous LoRA loading (BAL).

Inputs (batch dimension ``B`` first; 2 with classifier-free guidance):
``sample [B, C, h, w]``, ``timestep [B, 1]``, ``encoder_hidden_states [B, 77, D]``,
SDXL ``text_embeds [B, P]`` and ``time_ids [B, 6]``, optional ControlNet
``down_residual_0..N-1`` and ``mid_residual``; optional ``loras [B, m]``,
``lora_scales [B, m]`` (rows repeat; row 0 is read), ``lora_wait [B, 1]``,
``lora_skip [B, 1]`` (run on base weights this step, only start the load) and ``lora_step [B, 1]``
(the request's step: at 0 its LoRAs are counted, and go in at once if hot).
Outputs: ``noise_pred [B, C, h, w]``, ``lora_applied [B, 1]`` and ``lora_ready [B, 1]``
(the LoRAs are on this instance's device now).

A *loop request* (``loop_params`` and the other ``loop_*`` inputs, see
:mod:`katz.diffusion.loop`) runs a whole request's denoising loop here instead and returns
``latents [1, C, h, w]`` and ``lora_applied_step [1, 1]``; BAL then decides at each step of it
(the LoRAs go in at the first step they are on the device, at step *k* at the latest).

BAL (:mod:`katz.lora.bal`): a call that names LoRAs runs *with* them when they are on the
device already or when ``lora_wait`` is set; otherwise it starts their load and runs on the base
weights. Triton hands one ``execute`` every queued call; they run grouped by weight set, the set
in place first. ControlNets (modes service, local, remote) run beside the UNet's down path
(:class:`katz.controlnet.step.ControlNetStep`).
"""

from __future__ import annotations

import time

import torch

from katz.controlnet.step import ControlNetStep, control_jobs, jobs_of
from katz.controlnet.transports import LocalControlNets, controlnet_client, inline_controlnet
from katz.diffusion.loop import added_cond, is_loop_request, read_loop_request, run_loop, step_tensors
from katz.engines import engine_class
from katz.errors import InvalidArgument
from katz.lora.bal import device_ahead, instance_loras, queued_loop_order, requested_loras
from katz.serving.metrics import GcPauses, graph_metrics
from katz.serving.progress import loop_progress


class UNet:
    def __init__(self, deployment, call=None):
        self.deployment = deployment

        def local_controlnets():
            from katz.serving.controlnet import ControlNet

            return ControlNet(deployment)

        self.controlnets = controlnet_client(deployment, call, local_controlnets)
        self.engine = engine_class(deployment, "unet")(deployment.folder, deployment.device, deployment.torch_dtype)
        self.step = ControlNetStep(self.engine, self.controlnets)
        self.num_residuals = deployment.folder.num_down_residuals
        # inline mode, loop requests: the controlnet model over BLS before each step
        self._inline_controlnet = (
            inline_controlnet(call, deployment.folder.residual_names, deployment.device)
            if deployment.controlnet_mode == "inline" and call is not None else None
        )
        module = getattr(self.engine, "unet", None)  # a torch engine's module (TensorRT engines: none)
        # parameters and buffers (with float8: the float8 copies of the transformer linears)
        self._weight_bytes = sum(t.numel() * t.element_size()
                                 for t in (*module.parameters(), *module.buffers())) if module else 0
        if hasattr(self.engine, "warm_up"):  # CUDA graphs / compile: at load, never on a request
            self.engine.warm_up(
                deployment.accel.sizes, batches=(1, 2),
                residuals=deployment.controlnet_mode in ("inline", "local") and bool(deployment.folder.controlnets),
                split=deployment.controlnet_mode in ("service", "remote"),
                compile_batches=deployment.compile_batches,
            )
        self.loras, self.bal, self.hints = instance_loras(deployment, self.engine)
        self.runs, self.run_seconds = 0, 0.0  # UNet evaluations and their time on the device
        self._timing: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._on_gpu = torch.device(deployment.device).type == "cuda"
        self.gc = GcPauses.watch()

    @property
    def applied(self):
        """The LoRA set in place on this instance (``()``: the base weights)."""
        return self.bal.applied

    def _collect_timing(self) -> None:
        """Add the device time of finished evaluations (CUDA events; never waits for the GPU)."""
        while self._timing and self._timing[0][1].query():
            start, end = self._timing.pop(0)
            seconds = start.elapsed_time(end) / 1e3
            self.run_seconds += seconds
            self.bal.observe_step(seconds)

    def _timed(self, evaluate):
        """``evaluate()`` (one UNet evaluation), counted in ``runs`` and ``run_seconds`` (GPU: CUDA events)."""
        if self._on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = evaluate()
            end.record()
            self._timing.append((start, end))
            self._collect_timing()
        else:
            t0 = time.perf_counter()
            out = evaluate()
            seconds = time.perf_counter() - t0
            self.run_seconds += seconds
            self.bal.observe_step(seconds)
        self.runs += 1
        return out

    # ---------------------------------------------------------------- one step (a step call)
    def _evaluate(self, inputs: dict, weights) -> dict:
        hidden, cond = inputs["encoder_hidden_states"], added_cond(inputs)
        jobs, down, mid = None, None, None
        if inputs.get("controlnets") is not None and self.controlnets is not None:
            jobs = control_jobs(inputs)
        elif inputs.get("mid_residual") is not None:
            down = [inputs[f"down_residual_{i}"] for i in range(self.num_residuals)]
            mid = inputs["mid_residual"]
        noise = self._timed(lambda: self.step(inputs["sample"], inputs["timestep"], hidden, cond, jobs, down, mid))
        applied = bool(weights)
        flag = torch.full((noise.shape[0], 1), applied, dtype=torch.bool)
        ready = applied or self.bal.ready(requested_loras(inputs))
        return {"noise_pred": noise, "lora_applied": flag, "lora_ready": torch.full_like(flag, ready)}

    # ---------------------------------------------------------------- a whole request's loop
    def _run_loop(self, inputs: dict) -> dict:
        """A loop request: the request's whole denoising loop in this process (no BLS per step).

        BAL (:class:`katz.lora.bal.LoopLoras`): a step runs with the request's LoRAs once they are on
        the device by the time the device gets to it (hot LoRAs from step 0), or waits for them at
        step ``lora_k``; from then on every step keeps them."""
        device = self.deployment.device
        params, embeds, pooled, images = read_loop_request(inputs, device, self.deployment.torch_dtype)
        bal = self.bal.begin(params.lora_set, params.lora_k)
        # a ControlNet in another process reads the sample over CUDA IPC: the work that made it
        # (queued on this stream) must be done first
        sync = torch.cuda.current_stream(device).synchronize if self._on_gpu else (lambda: None)

        def unet(sample, t, hidden, added, down, mid, controls=()):
            self._collect_timing()  # how far the device is behind the host: the steps still queued
            bal.before_step(device_ahead(len(self._timing), self.bal.step_seconds))
            x = step_tensors(sample, t, hidden, added, batched=True, device=device)
            jobs = jobs_of(controls) if controls else None
            if jobs and self.controlnets.cross_process:
                sync()
            return self._timed(lambda: self.step(x["sample"], x["timestep"], hidden, added, jobs, down, mid))

        def inline(*args, **kwargs):
            sync()
            return self._inline_controlnet(*args, **kwargs)

        # katz_stream's loop request: a report per step (when the host has queued it; a step with
        # ControlNets in another process waits for the device, so the report follows the GPU there)
        progress = loop_progress(inputs)
        try:
            latents = run_loop(params, embeds, pooled, images, self.deployment.folder, unet=unet,
                               controlnet=inline if self._inline_controlnet is not None else None,
                               controlnet_in_unet=self.controlnets is not None, on_step=progress)
        finally:
            if progress is not None:
                progress.close()
        bal.finish()  # the merged weights' finiteness check, read once the device is done with them
        return {"latents": latents, "lora_applied_step": torch.tensor([[bal.applied_step]], dtype=torch.int32)}

    def metrics(self) -> list[tuple[str, str, dict, float]]:
        """Counters for Triton's metrics endpoint: ``(name, description, labels, total)``."""
        self._collect_timing()
        return [
            ("katz_unet_runs_total", "UNet evaluations (one per step and CFG half or patch)", {}, self.runs),
            ("katz_unet_run_seconds_total", "time of the UNet evaluations on the device (s; GPU: CUDA events)", {},
             self.run_seconds),
            *self.loras.stats.metrics(),
            ("katz_lora_hints_total", "LoRA name lists received from preprocessing for arriving requests", {},
             self.hints.received if self.hints is not None else 0),
            *self.gc.metrics(),
            *graph_metrics(self.engine),
            # controlnet_mode local: the ControlNets' counters come from this process
            *(self.controlnets.model.metrics() if isinstance(self.controlnets, LocalControlNets) else []),
        ]

    def gauges(self) -> list[tuple[str, str, dict, float]]:
        """Triton gauges: where the UNet instance's device memory goes (bytes: the engine's weights, the
        pristine copies of LoRA-patched weights for exact restores, the device LoRA cache), and the LoRA
        manager's (the longest weight switch, its tiers' bytes, its load estimates)."""
        description = "device memory the UNet instance holds, by part (bytes)"
        return [
            ("katz_unet_memory_bytes", description, {"part": "weights"}, float(self._weight_bytes)),
            ("katz_unet_memory_bytes", description, {"part": "pristine"},
             float(getattr(self.engine.lora, "pristine_bytes", 0))),
            ("katz_unet_memory_bytes", description, {"part": "lora_cache"}, float(self.loras.device_cache.used)),
            *self.loras.gauges(),
            *self.gc.gauges(),
        ]

    def execute(self, inputs: dict) -> dict:
        result = self.execute_batch([inputs])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def execute_batch(self, batch: list[dict]) -> list:
        """Run every call of ``batch``, grouped by weight set; an error fails only its own calls.

        Step calls come first (each is one step of a loop waiting for it), then the loop requests,
        those wanting the weight set in place first."""
        results: list = [None] * len(batch)
        groups: dict[tuple, list[int]] = {}
        loops = []
        for i, inputs in enumerate(batch):
            if is_loop_request(inputs):
                loops.append(i)
                continue
            try:
                self._check_step_call(inputs)
                groups.setdefault(self.bal.choose_for_call(inputs), []).append(i)
            except Exception as exc:
                results[i] = exc
        sets = list(groups)
        for weight_set in (sets[j] for j in self.bal.order(sets)):
            try:
                self.bal.switch_to(weight_set)
            except Exception as exc:
                for i in groups[weight_set]:
                    results[i] = exc
                continue
            for i in groups[weight_set]:
                try:
                    results[i] = self._evaluate(batch[i], weight_set)
                except Exception as exc:
                    results[i] = exc
            try:
                self.bal.settle()  # a merge's finiteness, before its outputs leave
            except Exception as exc:
                for i in groups[weight_set]:
                    results[i] = exc
        for i in queued_loop_order(self.bal, batch, loops):
            try:
                results[i] = self._run_loop(batch[i])
            except Exception as exc:
                results[i] = exc
        return results

    def _check_step_call(self, inputs: dict) -> None:
        for name in ("sample", "timestep", "encoder_hidden_states"):
            if inputs.get(name) is None:
                raise InvalidArgument(name, "required in a step call (or send a loop request: loop_params, ...)")
