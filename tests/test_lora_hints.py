"""katz.lora.hints: preprocessing's LoRA names reach every UNet instance's loader, best effort."""

from __future__ import annotations

import secrets
import socket
import time

from katz.lora.hints import SLOTS, HintListener, HintSender, _address


def _wait(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_every_listener_gets_each_hint_and_close_frees_the_slot():
    channel = secrets.token_hex(4)
    got_a, got_b = [], []
    a, b = HintListener(channel, got_a.append), HintListener(channel, got_b.append)
    try:
        assert {a.slot, b.slot} == {0, 1}
        sender = HintSender(channel)
        sender.send(["style", "detail"])
        assert _wait(lambda: got_a and got_b)
        assert got_a == [["style", "detail"]] and got_b == [["style", "detail"]]
        assert sender.sent == 2 and sender.dropped == 0 and a.received == 1
    finally:
        a.close()
        b.close()
    again = HintListener(channel, lambda names: None)
    assert again.slot == 0
    again.close()


def test_no_listener_bad_datagrams_and_a_failing_callback_are_harmless():
    channel = secrets.token_hex(4)
    HintSender(channel).send(["style"])  # nobody listens: dropped silently
    calls = []

    def boom(names):
        calls.append(names)
        raise RuntimeError("loader gone")

    listener = HintListener(channel, boom)
    try:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        for junk in (b"not json", b'{"a": 1}', b"[1, 2]"):
            raw.sendto(junk, _address(channel, listener.slot))
        HintSender(channel).send(["x"])
        HintSender(channel).send(["y"])  # still listening after the callback raised
        assert _wait(lambda: len(calls) == 2)
        assert calls == [["x"], ["y"]] and listener.received == 2
    finally:
        listener.close()


def test_all_slots_taken_leaves_a_listener_deaf_not_failing():
    channel = secrets.token_hex(4)
    held = [HintListener(channel, lambda n: None) for _ in range(SLOTS)]
    try:
        extra = HintListener(channel, lambda n: None)
        assert extra.slot is None
        extra.close()
    finally:
        for h in held:
            h.close()


def test_manager_hint_starts_loads_but_not_behind_a_long_queue(preset_dir, tmp_path):
    import shutil

    from katz.engines.torch.unet import UNetEngine
    from katz.lora.manager import LoraManager
    from katz.lora.store import LoraStore
    from katz.models.folder import ModelFolder

    preset = preset_dir("tiny-sd15")
    folder = ModelFolder(preset)
    for f in (preset / "loras").iterdir():
        shutil.copy(f, tmp_path / f.name)
    engine = UNetEngine(folder, "cpu")
    manager = LoraManager(LoraStore(tmp_path, folder.family), [engine.lora], "cpu", load_delay_s=0.3)
    try:
        assert manager.hint(["style", "no_such_lora"])  # an unknown name is left for the request
        assert manager.hint(["detail"])
        assert not manager.hint(["style"])  # two loads queued: a third hint is not taken
        manager.wait_idle(10)
        assert manager.ready(["style", "detail"]) and manager.stats.loads == 2
    finally:
        manager.close()
