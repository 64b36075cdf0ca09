"""``unet``: UNet evaluations with bounded asynchronous LoRA loading (BAL).

Inputs (batch dimension ``B`` first; 2 with classifier-free guidance):
``sample [B, C, h, w]``, ``timestep [B, 1]``, ``encoder_hidden_states [B, 77, D]``,
SDXL ``text_embeds [B, P]`` and ``time_ids [B, 6]``, optional ControlNet
``down_residual_0..N-1`` and ``mid_residual``; optional ``loras [B, m]``,
``lora_scales [B, m]`` (rows repeat; row 0 is read), ``lora_wait [B, 1]`` and
``lora_skip [B, 1]`` (run on base weights this step, only start the load).
Outputs: ``noise_pred [B, C, h, w]``, ``lora_applied [B, 1]`` and ``lora_ready [B, 1]``
(the LoRAs are on this instance's device now).

A *loop request* (``loop_params`` and the other ``loop_*`` inputs, see
:mod:`katz.diffusion.loop`) runs a whole request's denoising loop here instead and returns
``latents [1, C, h, w]`` and ``lora_applied_step [1, 1]``; BAL then decides at each step of it
(the LoRAs go in at the first step they are on the device, at step *k* at the latest).

BAL: a call that names LoRAs runs *with* them when they are on the device
already or when ``lora_wait`` is set (the caller's step has reached *k*, or
the LoRA was applied at an earlier step); otherwise it starts their load and
runs on the base weights. Triton hands one ``execute`` every queued call; they
are run grouped by weight set, the set in place first, so the instance
switches weights as rarely as the queue allows.
"""

from __future__ import annotations

import time

import torch

from katz.controlnet.transports import BlsControlNets, ControlJob, LocalControlNets, RemoteControlNets
from katz.diffusion.loop import added_cond, bls_controlnet, is_loop_request, read_loop_request, run_loop, step_tensors
from katz.engines import engine_class
from katz.errors import InvalidArgument
from katz.lora.manager import LoraManager
from katz.serving.metrics import graph_metrics
from katz.serving.preprocessing import read_params


def lora_request(inputs: dict) -> tuple[tuple[str, float], ...]:
    """The ``(name, scale)`` list a call asks for (row 0 of ``loras`` / ``lora_scales``)."""
    names = inputs.get("loras")
    if names is None or names.size == 0:
        return ()
    names = names.reshape(names.shape[0], -1)[0] if names.ndim > 1 else names.reshape(-1)
    scales = inputs.get("lora_scales")
    if scales is None:
        values = [1.0] * len(names)
    else:
        values = (scales.reshape(scales.shape[0], -1)[0] if scales.ndim > 1 else scales.reshape(-1)).tolist()
    return tuple((bytes(n).decode(), float(s)) for n, s in zip(names, values))


def control_jobs(inputs: dict) -> list[ControlJob]:
    """The ControlNet calls a step asks for (row 0 of ``controlnets`` etc.; images ``[B, 3n, H, W]``)."""
    names = inputs["controlnets"].reshape(inputs["controlnets"].shape[0], -1)[0]
    scales = inputs["controlnet_scales"].reshape(inputs["controlnet_scales"].shape[0], -1)[0].tolist()
    keys = inputs["control_image_keys"].reshape(inputs["control_image_keys"].shape[0], -1)[0]
    images = inputs["control_images"]
    return [
        ControlJob(bytes(n).decode(), images[:, 3 * j : 3 * j + 3], float(s), bytes(k).decode())
        for j, (n, s, k) in enumerate(zip(names, scales, keys))
    ]


class UNet:
    def __init__(self, deployment, call=None):
        self.deployment = deployment
        self.controlnets = None
        names = deployment.folder.residual_names
        if deployment.controlnet_mode == "service":
            self.controlnets = BlsControlNets(call, names)
        elif deployment.controlnet_mode == "local":
            from katz.serving.controlnet import ControlNet

            self.controlnets = LocalControlNets(ControlNet(deployment), names)
        elif deployment.controlnet_mode == "remote":
            self.controlnets = RemoteControlNets(
                deployment.controlnet_url, deployment.controlnet_timeout_s, names,
                deployment.device, deployment.torch_dtype,
            )
        self.engine = engine_class(deployment, "unet")(
            deployment.folder, deployment.device, deployment.torch_dtype
        )
        self.num_residuals = deployment.folder.num_down_residuals
        # inline mode, loop requests: the controlnet model over BLS before each step
        self._inline_controlnet = (
            bls_controlnet(call, deployment.folder.residual_names, deployment.device)
            if deployment.controlnet_mode == "inline" and call is not None else None
        )
        module = getattr(self.engine, "unet", None)  # a torch engine's module (TensorRT engines: none)
        # parameters and buffers (with --fp8: the float8 copies of the transformer linears)
        self._weight_bytes = sum(t.numel() * t.element_size()
                                 for t in (*module.parameters(), *module.buffers())) if module else 0
        if hasattr(self.engine, "warm_up"):  # CUDA graphs / compile: at load, never on a request
            self.engine.warm_up(
                deployment.accel.sizes, batches=(1, 2),
                residuals=deployment.controlnet_mode in ("inline", "local") and bool(deployment.folder.controlnets),
                split=deployment.controlnet_mode in ("service", "remote"),
                compile_batches=deployment.compile_batches,
            )
        self.loras = LoraManager(
            deployment.loras,
            [self.engine.lora],
            deployment.device,
            host_budget_bytes=deployment.lora_host_cache_bytes,
            device_budget_bytes=deployment.lora_device_cache_bytes,
            load_delay_s=deployment.lora_load_delay_s,
        )
        self.hints = None  # preprocessing names arriving requests' LoRAs (katz.lora.hints)
        if deployment.lora_hints and deployment.lora_dir:
            from katz.lora.hints import HintListener

            self.hints = HintListener(deployment.lora_hints, self.loras.hint)
        self.applied: tuple[tuple[str, float], ...] = ()
        self.runs, self.run_seconds = 0, 0.0  # UNet evaluations and their time on the device
        self._timing: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._on_gpu = torch.device(deployment.device).type == "cuda"

    def _collect_timing(self) -> None:
        """Add the device time of finished evaluations (CUDA events; never waits for the GPU)."""
        while self._timing and self._timing[0][1].query():
            start, end = self._timing.pop(0)
            self.run_seconds += start.elapsed_time(end) / 1e3

    # ---------------------------------------------------------------- BAL
    def _weight_set(self, inputs: dict) -> tuple[tuple[str, float], ...]:
        """Which LoRAs this call runs with: its own if ready or it must wait, else none (base)."""
        want = lora_request(inputs)
        wait, skip = inputs.get("lora_wait"), inputs.get("lora_skip")
        if skip is not None and bool(skip.reshape(-1)[0]):
            return self._bal_choice(want, must=False, may=False)  # the caller keeps base weights this step
        return self._bal_choice(want, must=wait is not None and bool(wait.reshape(-1)[0]))

    def _bal_choice(self, want: tuple[tuple[str, float], ...], must: bool, may: bool = True):
        """BAL for one step: the base weights, with the load started, when the caller keeps them
        (``may`` False: sharded UNets wait until every shard has the LoRAs); else ``want`` if it is in
        place, if the step ``must`` have it (step k reached, or applied at an earlier step) or if the
        LoRAs are on the device."""
        if not want:
            return ()
        names = [n for n, _ in want]
        if may and (want == self.applied or must or self.loras.ready(names)):
            return want
        self.loras.prefetch(names)
        self.loras.stats.steps_before_patch += 1
        return ()

    def _switch_to(self, weight_set: tuple[tuple[str, float], ...]) -> None:
        if weight_set == self.applied:
            return
        weights = self.loras.get([n for n, _ in weight_set]) if weight_set else []
        start = time.perf_counter()
        try:
            self.engine.set_loras([(w, s) for w, (_, s) in zip(weights, weight_set)])
        except BaseException:
            self.applied = ()
            raise
        finally:
            self.loras.stats.switch_seconds += time.perf_counter() - start
        self.applied = weight_set
        if weight_set:
            self.loras.stats.patches += 1

    # ---------------------------------------------------------------- run
    def _run(self, inputs: dict, applied: bool) -> dict:
        return self._timed(lambda: self._evaluate(inputs, applied))

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
            self.run_seconds += time.perf_counter() - t0
        self.runs += 1
        return out

    def _evaluate(self, inputs: dict, applied: bool) -> dict:
        hidden, cond = inputs["encoder_hidden_states"], added_cond(inputs)
        jobs, down, mid = None, None, None
        if inputs.get("controlnets") is not None and self.controlnets is not None:
            jobs = control_jobs(inputs)
        elif inputs.get("mid_residual") is not None:
            down = [inputs[f"down_residual_{i}"] for i in range(self.num_residuals)]
            mid = inputs["mid_residual"]
        noise = self._step(inputs["sample"], inputs["timestep"], hidden, cond, jobs, down, mid)
        flag = torch.full((noise.shape[0], 1), applied, dtype=torch.bool)
        want = lora_request(inputs)
        ready = bool(want) and (applied or self.loras.ready([n for n, _ in want]))
        return {"noise_pred": noise, "lora_applied": flag, "lora_ready": torch.full_like(flag, ready)}

    def _step(self, sample, timestep, hidden, cond, jobs=None, down=None, mid=None) -> torch.Tensor:
        """One UNet evaluation: ``sample [B, C, h, w]``, ``timestep [B, 1]`` float32 -> noise ``[B, C, h, w]``.

        With ``jobs`` (modes service, remote, local: :mod:`katz.controlnet.transports`) the ControlNets are
        submitted, then this instance runs the down and mid blocks beside them; then the join and the
        up path. In mode local the ControlNets' work is queued on this stream first and the step runs
        whole. Otherwise ``down``/``mid`` are ControlNet residuals already computed (inline mode) or None."""
        if jobs:
            common = {"sample": sample, "timestep": timestep[:1].reshape(1), "encoder_hidden_states": hidden,
                      **(cond or {})}
            pending = self.controlnets.submit(jobs, common)
            if not self.controlnets.cross_process:  # local: queued on this stream already; one whole step
                down, mid = pending.result()
                return self.engine(sample, timestep.reshape(-1), hidden, cond, down, mid)
            state = self.engine.down(sample, timestep.reshape(-1), hidden, cond)
            down, mid = pending.result()
            return self.engine.up(state, down, mid)
        return self.engine(sample, timestep.reshape(-1), hidden, cond, down, mid)

    # ---------------------------------------------------------------- a whole request's loop
    def _loop_loras(self, params: dict) -> tuple[tuple[str, float], ...]:
        return tuple((n, float(s)) for n, s in zip(params["loras"], params["lora_scales"]))

    def _run_loop(self, inputs: dict) -> dict:
        """A loop request: the request's whole denoising loop in this process (no BLS per step).

        BAL as in the per-step mode: a step runs with the request's LoRAs once they are on the
        device, or waits for them at step ``lora_k``; from then on every step keeps them."""
        device = self.deployment.device
        params, embeds, pooled, images = read_loop_request(inputs, device, self.deployment.torch_dtype)
        want, k = self._loop_loras(params), params.get("lora_k", 0)
        step, applied_at = 0, None
        # a ControlNet in another process reads the sample over CUDA IPC: the work that made it
        # (queued on this stream) must be done first
        sync = torch.cuda.current_stream(device).synchronize if self._on_gpu else (lambda: None)

        def unet(sample, t, hidden, added, down, mid, controls=()):
            nonlocal step, applied_at
            weights = self._bal_choice(want, must=step >= k)
            self._switch_to(weights)
            if weights and applied_at is None:
                applied_at = step
            x = step_tensors(sample, t, hidden, added, batched=True, device=device)
            jobs = [ControlJob(c.name, image, scale, c.key) for c, image, scale in controls] if controls else None
            if jobs and self.controlnets.cross_process:
                sync()
            noise = self._timed(lambda: self._step(x["sample"], x["timestep"], hidden, added, jobs, down, mid))
            step += 1
            return noise

        inline = None
        if self._inline_controlnet is not None:

            def inline(*args, **kwargs):
                sync()
                return self._inline_controlnet(*args, **kwargs)

        latents = run_loop(params, embeds, pooled, images, self.deployment.folder, unet=unet, controlnet=inline,
                           controlnet_in_unet=self.controlnets is not None)
        applied = -1 if applied_at is None else applied_at
        return {"latents": latents, "lora_applied_step": torch.tensor([[applied]], dtype=torch.int32)}

    def metrics(self) -> list[tuple[str, str, dict, float]]:
        """Counters for Triton's metrics endpoint: ``(name, description, labels, total)``."""
        s = self.loras.stats
        self._collect_timing()
        return [
            ("katz_unet_runs_total", "UNet evaluations (one per step and CFG half or patch)", {}, self.runs),
            ("katz_unet_run_seconds_total", "time of the UNet evaluations on the device (s; GPU: CUDA events)", {},
             self.run_seconds),
            ("katz_lora_loads_total", "LoRAs loaded to the device", {}, s.loads),
            ("katz_lora_load_seconds_total", "time spent loading LoRAs (s)", {}, s.load_seconds),
            ("katz_lora_load_failures_total", "LoRA loads that failed", {}, s.load_failures),
            ("katz_lora_cache_hits_total", "LoRA cache hits", {"tier": "host"}, s.host_hits),
            ("katz_lora_cache_misses_total", "LoRA cache misses", {"tier": "host"}, s.host_misses),
            ("katz_lora_cache_hits_total", "LoRA cache hits", {"tier": "device"}, s.device_hits),
            ("katz_lora_cache_misses_total", "LoRA cache misses", {"tier": "device"}, s.device_misses),
            ("katz_lora_steps_before_patch_total", "UNet steps run on base weights while a LoRA loaded", {},
             s.steps_before_patch),
            ("katz_lora_patches_total", "LoRA sets patched into the UNet", {}, s.patches),
            ("katz_lora_wait_seconds_total", "time steps waited for a LoRA at the bound k (s)", {}, s.wait_seconds),
            ("katz_lora_hints_total", "LoRA name lists received from preprocessing for arriving requests", {},
             self.hints.received if self.hints is not None else 0),
            ("katz_lora_switch_seconds_total", "time switching the UNet weights: LoRA sets merged in, base restored (s)",
             {}, s.switch_seconds),
            ("katz_lora_load_phase_seconds_total", "LoRA load time by phase (s)", {"phase": "read"}, s.read_seconds),
            ("katz_lora_load_phase_seconds_total", "LoRA load time by phase (s)", {"phase": "parse"}, s.parse_seconds),
            ("katz_lora_load_phase_seconds_total", "LoRA load time by phase (s)", {"phase": "upload"},
             s.upload_seconds),
            ("katz_lora_load_phase_seconds_total", "LoRA load time by phase (s)", {"phase": "device_wait"},
             s.device_wait_seconds),
            *graph_metrics(self.engine),
            # controlnet_mode local: the ControlNets' counters come from this process
            *(self.controlnets.model.metrics() if isinstance(self.controlnets, LocalControlNets) else []),
        ]

    def gauges(self) -> list[tuple[str, str, dict, float]]:
        """Where the UNet instance's device memory goes (bytes, Triton gauges): the engine's weights,
        the pristine copies of LoRA-patched weights (exact restore) and the device LoRA cache."""
        description = "device memory the UNet instance holds, by part (bytes)"
        return [
            ("katz_unet_memory_bytes", description, {"part": "weights"}, float(self._weight_bytes)),
            ("katz_unet_memory_bytes", description, {"part": "pristine"},
             float(getattr(self.engine.lora, "pristine_bytes", 0))),
            ("katz_unet_memory_bytes", description, {"part": "lora_cache"}, float(self.loras.device_cache.used)),
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
                groups.setdefault(self._weight_set(inputs), []).append(i)
            except Exception as exc:
                results[i] = exc
        order = sorted(groups, key=lambda s: s != self.applied)  # the set in place first; stable otherwise
        for weight_set in order:
            try:
                self._switch_to(weight_set)
            except Exception as exc:
                for i in groups[weight_set]:
                    results[i] = exc
                continue
            for i in groups[weight_set]:
                try:
                    results[i] = self._run(batch[i], bool(weight_set))
                except Exception as exc:
                    results[i] = exc
        for i in sorted(loops, key=lambda i: self._queued_loras(batch[i]) != self.applied):
            try:
                results[i] = self._run_loop(batch[i])
            except Exception as exc:
                results[i] = exc
        return results

    def _queued_loras(self, inputs: dict) -> tuple | None:
        """The LoRA set a queued loop request asks for (None if its params do not parse: it fails when run)."""
        try:
            return self._loop_loras(read_params({"params": inputs["loop_params"]}))
        except Exception:
            return None

    def _check_step_call(self, inputs: dict) -> None:
        for name in ("sample", "timestep", "encoder_hidden_states"):
            if inputs.get(name) is None:
                raise InvalidArgument(name, "required in a step call (or send a loop request: loop_params, ...)")
