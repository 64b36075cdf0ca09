"""Generate over gRPC streaming from ``katz_stream``: progress per denoising step, then the image.

``stream_generate`` sends one request and calls ``on_progress(Progress)`` for
each step; returning ``False`` from it (or Ctrl-C) cancels the request, which
stops the server's denoising loop at the next step and frees its instance.
"""

from __future__ import annotations

import queue
import secrets
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable

from katz.client import Generation, Result

STREAM_MODEL = "katz_stream"


class StreamCancelled(RuntimeError):
    """The request was cancelled from the client side."""


@dataclass
class Progress:
    step: int  # 1-based
    steps: int
    elapsed_s: float  # server-side, since the request started


def _inputs(request: Generation):
    import tritonclient.grpc as grpc
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, arr in request.tensors().items():
        inp = grpc.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def stream_generate(
    url: str,
    request: Generation,
    on_progress: Callable[[Progress], bool | None] | None = None,
    timeout: float = 600.0,
    client=None,
) -> Result:
    """One generation from ``katz_stream`` at ``url`` (gRPC HOST:PORT).

    Raises ``tritonclient.utils.InferenceServerException`` for server errors,
    :class:`StreamCancelled` when ``on_progress`` returned ``False``, and
    ``TimeoutError`` when nothing arrived for ``timeout`` seconds.
    """
    import tritonclient.grpc as grpc

    if request.seed is None:
        request = replace(request, seed=secrets.randbelow(2**63))
    own = client is None
    client = client or grpc.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    cancel = True
    try:
        client.async_stream_infer(STREAM_MODEL, _inputs(request))
        while True:
            try:
                result, error = responses.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no response from {url} for {timeout:.0f}s") from None
            if error is not None:
                cancel = False
                raise error
            png = result.as_numpy("png")
            if png is not None:
                cancel = False
                return Result(
                    image=result.as_numpy("image"),
                    png=bytes(png.reshape(-1)[0]),
                    seed=int(result.as_numpy("seed").reshape(-1)[0]),
                    lora_applied_step=int(result.as_numpy("lora_applied_step").reshape(-1)[0]),
                )
            progress = Progress(
                step=int(result.as_numpy("step")[0]),
                steps=int(result.as_numpy("steps")[0]),
                elapsed_s=float(result.as_numpy("elapsed_s")[0]),
            )
            if on_progress is not None and on_progress(progress) is False:
                raise StreamCancelled(f"cancelled at step {progress.step}/{progress.steps}")
    finally:
        # cancel_requests: the server stops the loop at its next step (a finished one is unaffected)
        client.stop_stream(cancel_requests=cancel)
        if own:
            client.close()


class ProgressBar:
    """``[#####.....]  12/30 steps  3.4s`` on one stderr line."""

    def __init__(self, label: str = "", width: int = 30, stream=sys.stderr):
        self.label, self.width, self.stream = label, width, stream
        self.start = time.monotonic()
        self.last = None

    def __call__(self, p: Progress) -> None:
        done = int(self.width * p.step / max(p.steps, 1))
        bar = "#" * done + "." * (self.width - done)
        self.last = p
        print(f"\r{self.label}[{bar}] {p.step:>3}/{p.steps} steps {p.elapsed_s:6.1f}s", end="",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self.last is not None:
            print(f" (total {time.monotonic() - self.start:.1f}s)", file=self.stream, flush=True)
