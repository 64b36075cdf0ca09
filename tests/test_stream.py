"""katz_stream: one gRPC streaming response per denoising step, then the image; client
cancellation stops the loop and frees the instance."""

from __future__ import annotations

import queue
import subprocess
import sys
import time

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from katz.client import Generation, infer, make_client
from katz.client.streaming import StreamCancelled, stream_generate

import tooling_support
from conftest import control_png

integration = pytest.mark.integration


def _config(repo, model):
    cfg = model_config_pb2.ModelConfig()
    text_format.Parse((repo / model / "config.pbtxt").read_text(), cfg)
    return cfg


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_katz_stream_config_is_decoupled_with_the_ensembles_inputs(preset_dir, tmp_path, device):
    from dataclasses import replace

    from katz.deploy.repository import Placement, render_repository
    from katz.deployment import Deployment
    from katz.models.folder import ModelFolder, discover_controlnets
    from katz.request import Limits

    path = preset_dir("tiny-sdxl")
    folder = ModelFolder(path, discover_controlnets(path / "controlnets"))
    dep = Deployment(folder.path, folder.controlnets, path / "loras", Limits(), controlnet_mode="inline")
    placement = Placement(device=device, counts={"katz_stream": 3}, gpus={"katz_stream": [1]})
    repo = render_repository(dep, tmp_path / "repo", placement)
    stream, katz = _config(repo, "katz_stream"), _config(repo, "katz")
    assert stream.model_transaction_policy.decoupled
    assert stream.backend == "python_katz" and stream.parameters["role"].string_value == "stream"
    as_tuples = lambda ts: [(t.name, t.data_type, list(t.dims), t.optional) for t in ts]  # noqa: E731
    assert as_tuples(stream.input) == as_tuples(katz.input)
    assert {o.name for o in stream.output} == {"step", "steps", "elapsed_s"} | {o.name for o in katz.output}
    group = stream.instance_group[0]
    assert group.count == 3
    if device == "cuda":
        # the loop runs in the unet model (one shard): katz_stream only relays it, on the host
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        looping = render_repository(replace(dep, loop="pipeline"), tmp_path / "looping", placement)
        group = _config(looping, "katz_stream").instance_group[0]  # runs the loop itself
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and list(group.gpus) == [1]


@pytest.fixture(scope="module")
def server(start_server):
    return tooling_support.tiny_server(start_server)


def _gen(**kw) -> Generation:
    kw.setdefault("prompt", "a photo of a cat")
    kw.setdefault("seed", 21)
    kw.setdefault("steps", 4)
    return Generation(**kw)


def _raw_stream(url, gen: Generation, timeout=120.0):
    """Every response of one request, with the final flag, using tritonclient directly."""
    import tritonclient.grpc as grpc
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, arr in gen.tensors().items():
        inp = grpc.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    responses = queue.Queue()
    client = grpc.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    got = []
    try:
        client.async_stream_infer("katz_stream", inputs, enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                got.append((None, error, True))
                break
            final = result.get_response().parameters["triton_final_response"].bool_param
            got.append((result, None, final))
            if final:
                break
        time.sleep(0.3)  # nothing may follow the final response
        while not responses.empty():
            got.append(responses.get() + (None,))
    finally:
        client.stop_stream()
        client.close()
    return got


@integration
def test_stream_sends_exactly_one_message_per_step_then_the_image(server):
    gen = _gen(steps=5, controlnets=["canny"], control_images=[control_png()], loras=["style"], lora_k=0)
    got = _raw_stream(server.grpc_url, gen)
    assert len(got) == 6 and all(e is None for _, e, _ in got)
    progress, (last, _, final) = got[:-1], got[-1]
    assert [int(r.as_numpy("step")[0]) for r, _, _ in progress] == [1, 2, 3, 4, 5]
    assert all(int(r.as_numpy("steps")[0]) == 5 for r, _, _ in progress)
    elapsed = [float(r.as_numpy("elapsed_s")[0]) for r, _, _ in progress]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert not any(f for _, _, f in progress) and final
    assert all(r.as_numpy("png") is None for r, _, _ in progress)
    assert last.as_numpy("step") is None and last.as_numpy("image").shape == (64, 64, 3)
    assert int(last.as_numpy("seed")[0]) == 21 and int(last.as_numpy("lora_applied_step")[0]) == 0
    # the same image as the katz ensemble
    ref = infer(make_client(server.http_url), gen)
    assert np.array_equal(last.as_numpy("image"), ref.image)


@integration
def test_stream_client_and_bad_input(server):
    seen = []
    r = stream_generate(server.grpc_url, _gen(steps=3), seen.append, timeout=120)
    assert [p.step for p in seen] == [1, 2, 3] and r.seed == 21 and r.png.startswith(b"\x89PNG")
    with pytest.raises(InferenceServerException) as info:
        stream_generate(server.grpc_url, _gen(steps=0), timeout=120)
    # a stream's error carries no gRPC status, only the message: the field's, not an internal error's
    assert info.value.message().startswith("steps: 0 is outside"), info.value.message()
    with pytest.raises(InferenceServerException) as info:
        stream_generate(server.grpc_url, _gen(loras=["nope"]), timeout=120)
    assert info.value.message().startswith("loras"), info.value.message()


@integration
def test_cancel_stops_the_loop_and_frees_the_instance(server):
    """katz_stream has one instance: a following request is served promptly only if the
    cancelled 150-step request stopped at its next step."""
    seen = []

    def progress(p):
        seen.append((p, time.monotonic()))
        return p.step < 2  # False: cancel

    with pytest.raises(StreamCancelled):
        stream_generate(server.grpc_url, _gen(steps=150, width=512, height=512), progress, timeout=120)
    cancelled_at = time.monotonic()
    per_step = seen[1][0].elapsed_s - seen[0][0].elapsed_s
    remaining = per_step * (150 - 2)
    assert remaining > 4.0, f"the long request is too short to tell ({per_step:.3f}s per step)"

    start = time.monotonic()
    steps = []
    r = stream_generate(server.grpc_url, _gen(steps=2), steps.append, timeout=120)
    took = time.monotonic() - start
    print(f"cancelled at step 2/150 ({per_step:.3f}s per step, ~{remaining:.1f}s left); next request {took:.2f}s")
    assert r.image.shape == (64, 64, 3) and [p.step for p in steps] == [1, 2]
    assert took < min(remaining / 2, 20.0), (
        f"next request took {took:.1f}s; the cancelled one had ~{remaining:.1f}s left "
        f"(cancelled {start - cancelled_at:.2f}s before)")


@integration
def test_generate_cli_shows_a_progress_bar(server, tmp_path):
    out = tmp_path / "x.png"
    proc = subprocess.run(
        [sys.executable, "-m", "katz.cli", "generate", "--url", server.grpc_url, "--protocol", "grpc",
         "--prompt", "a cat", "--seed", "4", "--steps", "3", "--lora", "style:0.5", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "3/3 steps" in proc.stderr and "[" in proc.stderr and "seed 4" in proc.stdout
    assert out.read_bytes().startswith(b"\x89PNG")


def test_progress_channel_reports_steps_and_tells_the_loop_when_the_stream_is_gone():
    """katz.serving.progress: what a FLUX loop in the transformer's process reports to katz_stream."""
    from katz.errors import InvalidArgument, error_kind
    from katz.serving.progress import ListenerGone, ProgressListener, loop_progress

    listener = ProgressListener()
    send = loop_progress({"loop_progress": np.array([[listener.name.encode()]], dtype=np.object_)})
    try:
        assert listener.get(timeout=0) is None
        for i in range(3):
            send(i, 3)
        assert [listener.get(timeout=1) for _ in range(3)] == [(0, 3), (1, 3), (2, 3)]
        assert listener.get(timeout=0.01) is None
        listener.close()  # the client cancelled
        with pytest.raises(ListenerGone) as gone:
            send(1, 3)
        assert error_kind(gone.value) == "gone" and "2/3" in str(gone.value)
    finally:
        send.close()
        listener.close()
    assert loop_progress({}) is None
    for bad in (np.array([[b"../x"]], dtype=np.object_), np.array([[b""]], dtype=np.object_)):
        with pytest.raises(InvalidArgument, match="^loop_progress: "):
            loop_progress({"loop_progress": bad})
