"""Calling the ControlNets from the UNet model, in parallel with the UNet's down path.

Three transports with one interface, :meth:`ControlNetClient.submit` (returns at
once) and :meth:`Pending.result`:

* :class:`LocalControlNets` — the ControlNets in the UNet model's own process
  (mode ``local``), queued on the UNet's CUDA stream before its down path: no
  process boundary, so no wait for the GPU before each step (the service's
  process must find the step's sample written) and no CUDA IPC.

* :class:`BlsControlNets` — the ``controlnet`` model of the same server (mode
  ``service``), over BLS; GPU tensors cross by CUDA IPC, no host round trip.
* :class:`RemoteControlNets` — the ``controlnet`` model of another server
  (mode ``remote``) over tritonclient gRPC. Tensors go through host memory:
  gRPC carries bytes, and CUDA shared memory only works on one host, so a
  remote service pays a device->host->network->host->device trip per step.

Each ControlNet of a request is its own call, sent concurrently, so several
ControlNets run on several service instances where there are several.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from katz.controlnet.step import ControlJob, job_inputs, sum_residuals
from katz.diffusion.loop import step_tensors
from katz.errors import ModelCallError


class Pending:
    def __init__(self, futures: list[Future], residual_names: list[str]):
        self.futures, self.names = futures, residual_names

    def result(self) -> tuple[list[torch.Tensor], torch.Tensor] | tuple[None, None]:
        """Residuals summed over the jobs, in job order."""
        outs = [fut.result() for fut in self.futures]
        return sum_residuals(([out[n] for n in self.names[:-1]], out[self.names[-1]]) for out in outs)


class ControlNetClient:
    # the ControlNets run in another process: it reads the step's sample, so the GPU work that
    # wrote it must be done before a step's jobs are sent
    cross_process = True

    def __init__(self, residual_names: list[str], max_parallel: int = 4):
        self.residual_names = residual_names  # ModelFolder.residual_names
        self.max_parallel = max_parallel
        self._pool: ThreadPoolExecutor | None = None

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The threads the calls run on (made at the first call)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.max_parallel, thread_name_prefix="katz-controlnet")
        return self._pool

    def _one(self, inputs: dict) -> dict:
        raise NotImplementedError

    def submit(self, jobs: list[ControlJob], common: dict) -> Pending:
        return Pending([self.pool.submit(self._one, job_inputs(j, common)) for j in jobs], self.residual_names)


class BlsControlNets(ControlNetClient):
    """The ``controlnet`` model of this server, called over BLS (``call`` from the Triton glue)."""

    def __init__(self, call, residual_names: list[str], max_parallel: int = 4):
        super().__init__(residual_names, max_parallel)
        self.call = call

    def _one(self, inputs: dict) -> dict:
        return self.call("controlnet", inputs, self.residual_names)


class RemoteControlNets(ControlNetClient):
    """The ``controlnet`` model of another Triton server, over gRPC."""

    def __init__(self, url: str, timeout_s: float, residual_names: list[str], device, dtype, max_parallel: int = 4):
        super().__init__(residual_names, max_parallel)
        self.url, self.timeout_s = url, timeout_s
        self.device, self.dtype = torch.device(device), dtype
        self._client = None

    def _grpc(self):
        import tritonclient.grpc as grpcclient

        if self._client is None:
            # A channel of its own (gRPC shares sub-channels, and their reconnect back-off,
            # between channels to one address in a process), with a short back-off, so the
            # first call after the remote server comes back connects.
            self._client = grpcclient.InferenceServerClient(self.url, channel_args=[
                ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
                ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
                ("grpc.use_local_subchannel_pool", 1),
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ])
        return grpcclient, self._client

    def _one(self, inputs: dict) -> dict:
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        grpcclient, client = self._grpc()
        tensors = []
        for name, value in inputs.items():
            arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
            t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
            t.set_data_from_numpy(arr)
            tensors.append(t)
        outputs = [grpcclient.InferRequestedOutput(n) for n in self.residual_names]
        try:
            res = client.infer("controlnet", tensors, outputs=outputs, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            status = str(exc.status() or "")
            if "INVALID_ARGUMENT" in status:
                raise ModelCallError("controlnet", exc.message(), "invalid_arg") from None
            # A fresh channel next time: gRPC's reconnect back-off would otherwise keep failing
            # calls for up to minutes after the remote server is back.
            self._client = None
            raise ModelCallError(
                "controlnet",
                f"remote ControlNet server {self.url} failed or timed out after {self.timeout_s:g}s "
                f"({status or 'no status'}: {exc.message()})",
                "unavailable",
            ) from None
        return {n: torch.from_numpy(res.as_numpy(n)).to(self.device, self.dtype) for n in self.residual_names}


class LocalControlNets(ControlNetClient):
    """The ControlNets in this process: ``model`` is a :class:`katz.serving.controlnet.ControlNet`
    (its engine, feature cache and checks), run on the calling thread. Its GPU work is queued on the
    caller's CUDA stream ahead of the UNet's, so :meth:`submit` returns once it is queued."""

    cross_process = False

    def __init__(self, model, residual_names: list[str]):
        super().__init__(residual_names)
        self.model = model

    def _one(self, inputs: dict) -> dict:
        return self.model.execute(inputs)

    def submit(self, jobs: list[ControlJob], common: dict) -> Pending:
        futures = []
        for job in jobs:
            done: Future = Future()
            done.set_result(self._one(job_inputs(job, common)))
            futures.append(done)
        return Pending(futures, self.residual_names)


def controlnet_client(deployment, call, local_model=None) -> ControlNetClient | None:
    """The transport the UNet model calls its ControlNets through in the deployment's
    ``controlnet_mode``: service (``call``: BLS), local (``local_model()``: the ``controlnet`` model
    class, built in this process), remote (gRPC); None for inline (the loop calls them itself)."""
    names = deployment.folder.residual_names
    mode = deployment.controlnet_mode
    if mode == "service":
        return BlsControlNets(call, names)
    if mode == "local":
        return LocalControlNets(local_model(), names)
    if mode == "remote":
        return RemoteControlNets(deployment.controlnet_url, deployment.controlnet_timeout_s, names,
                                 deployment.device, deployment.torch_dtype)
    return None


def inline_controlnet(call, residual_names: list[str], device):
    """The ``controlnet`` model over BLS as the loop's ``controlnet`` callable (mode *inline*: the loop
    runs a step's ControlNets one after the other before the UNet)."""

    def controlnet(name, sample, t, hidden, added, image, scale, cond_key=""):
        common = step_tensors(sample, t, hidden, added, batched=False, device=device)
        out = call("controlnet", job_inputs(ControlJob(name, image, scale, cond_key or ""), common), residual_names)
        return [out[n] for n in residual_names[:-1]], out["mid_residual"]

    return controlnet
