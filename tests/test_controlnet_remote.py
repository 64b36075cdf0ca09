"""ControlNet on a separate Triton server (mode ``remote``), and its faults."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from katz.client import Generation, infer, make_client

from conftest import control_png

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def servers(start_server):
    cn = start_server("tiny-sdxl", ["--only", "controlnet"])
    base = start_server("tiny-sdxl", ["--controlnet-mode", "remote", "--controlnet-url", cn.grpc_url,
                                      "--controlnet-timeout", "5"])
    return cn, base


def _gen(**kw):
    kw.setdefault("prompt", "a photo of a house")
    kw.setdefault("seed", 3)
    kw.setdefault("steps", 5)
    return Generation(**kw)


def _local(preset_path, req: Generation):
    from katz.deployment import Deployment
    from katz.models.folder import ModelFolder, discover_controlnets
    from katz.request import Limits
    from katz.serving.local import LocalEnsemble

    folder = ModelFolder(preset_path, discover_controlnets(preset_path / "controlnets"))
    dep = Deployment(folder.path, folder.controlnets, preset_path / "loras",
                     Limits(default_width=64, default_height=64), controlnet_mode="inline")
    return LocalEnsemble(dep).generate(req.tensors())["image"]


def test_only_controlnet_serves_just_the_controlnet(servers):
    cn, _ = servers
    client = make_client(cn.http_url)
    assert client.is_model_ready("controlnet")
    assert not client.is_model_ready("katz") and not client.is_model_ready("unet")


def test_remote_equals_inline(servers, preset_dir):
    _, base = servers
    req = _gen(controlnets=["canny", "canny"], control_images=[control_png(0), control_png(1)],
               controlnet_scales=[0.8, 0.5], control_guidance_start=[0.0, 0.2], control_guidance_end=[0.6, 1.0])
    remote = infer(make_client(base.grpc_url, "grpc"), req, "grpc").image
    inline = _local(preset_dir("tiny-sdxl"), req)
    assert np.abs(remote.astype(int) - inline.astype(int)).max() <= 1


def test_feature_cache_metrics_on_the_controlnet_server(servers):
    import urllib.request

    cn, base = servers
    infer(make_client(base.http_url), _gen(controlnets=["canny"], control_images=[control_png(7)]))
    text = urllib.request.urlopen(f"http://127.0.0.1:{cn.metrics_port}/metrics", timeout=10).read().decode()
    hits = [l for l in text.splitlines() if l.startswith("katz_controlnet_feature_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) >= 4


def test_remote_down_fails_with_unavailable_then_recovers(servers, start_server):
    cn, base = servers
    client = make_client(base.http_url)
    with_cn = _gen(steps=150, controlnets=["canny"], control_images=[control_png(2)])
    errors = []

    def long_request():
        try:
            infer(make_client(base.http_url), with_cn)
        except InferenceServerException as exc:
            errors.append(exc)

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(1.0)
    cn.kill()  # killed mid-run
    t.join(timeout=60)
    assert errors and errors[0].status() == "503" and "remote ControlNet server" in errors[0].message()

    start = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        infer(client, _gen(controlnets=["canny"], control_images=[control_png(2)]))
    assert info.value.status() == "503" and time.monotonic() - start < 30
    plain = infer(client, _gen())  # requests without ControlNet are still served
    assert plain.image.shape == (64, 64, 3) and client.is_server_ready()

    ports = (cn.http_port, cn.grpc_port, cn.metrics_port)
    try:
        start_server("tiny-sdxl", ["--only", "controlnet"], ports=ports, ready_timeout=150)
    except RuntimeError as exc:
        # Seen once in CI (2 cores): the restarted server's controlnet instance never finished
        # initializing. Its stacks are in the message (SIGUSR1 dump); the recovery is what this
        # test checks, so one more start is allowed, and a second hang fails it.
        warnings.warn(f"the restarted ControlNet server hung in start-up; starting it again:\n{exc}")
        start_server("tiny-sdxl", ["--only", "controlnet"], ports=ports, ready_timeout=150)
    again = infer(client, _gen(controlnets=["canny"], control_images=[control_png(2)]))
    assert again.image.shape == (64, 64, 3)
