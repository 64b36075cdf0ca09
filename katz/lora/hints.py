"""LoRA hints: arriving requests' LoRA names, from ``preprocessing`` to every UNet instance's loader.

BAL's loader (:class:`katz.lora.manager.LoraManager`) lives in the UNet model's process and
learns of a request's LoRAs at its first denoising step, after text encoding and after any wait
in ``katz_pipeline``'s queue. ``preprocessing`` (another process) sees the request as it
arrives, so it sends the names on: one datagram per valid request with LoRAs, to every UNet
instance of this server, which hands them to ``LoraManager.prefetch``. The LoRA then loads while
the request is text-encoded or queued, and comes in at step 0 when that was long enough.

Transport: Linux abstract Unix datagram sockets named after the server's channel (a random
token ``katz serve`` puts in the deployment) and a slot number; each UNet instance binds the
first free slot, the sender tries every slot. Best effort and never blocking: a hint to a slot
nobody holds, or to a full socket, is dropped (the step-0 load still happens).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from typing import Callable, Iterable

SLOTS = 16  # UNet instances one server can hint (shards x instances)
MAX_NAMES = 64


def _address(channel: str, slot: int) -> bytes:
    return f"\0katz-lora-hints-{channel}-{slot}".encode()


class HintSender:
    """``send(names)``: one datagram to every slot of ``channel``; counts what was delivered."""

    def __init__(self, channel: str):
        self._addresses = [_address(channel, slot) for slot in range(SLOTS)]
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self.sent = 0  # datagrams delivered to a listening slot
        self.dropped = 0  # to a listening slot whose socket was full

    def send(self, names: Iterable[str]) -> None:
        payload = json.dumps(list(names)[:MAX_NAMES]).encode()
        for address in self._addresses:
            try:
                self._sock.sendto(payload, address)
                self.sent += 1
            except (ConnectionRefusedError, FileNotFoundError):
                continue  # nobody holds this slot
            except BlockingIOError:
                self.dropped += 1
            except OSError:
                continue

    def close(self) -> None:
        self._sock.close()


class HintListener:
    """Binds the first free slot of ``channel`` and calls ``on_names(list[str])`` from its own thread
    for every hint received; ``slot`` is None when every slot was taken (then it hears nothing)."""

    def __init__(self, channel: str, on_names: Callable[[list[str]], None]):
        self._on_names = on_names
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.slot: int | None = None
        for slot in range(SLOTS):
            try:
                self._sock.bind(_address(channel, slot))
            except OSError:
                continue
            self.slot = slot
            break
        self.received = 0
        self._closed = False
        self._sock.settimeout(0.5)  # so close() is seen
        if self.slot is None:
            self._sock.close()
            print(f"katz: no free LoRA hint slot on channel {channel}; this UNet loads LoRAs at step 0",
                  file=sys.stderr)
            return
        self._thread = threading.Thread(target=self._loop, name="katz-lora-hints", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            try:
                names = json.loads(data)
            except ValueError:
                continue
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                continue
            self.received += 1
            try:
                self._on_names(names)
            except Exception as exc:  # a hint must never take the listener down
                print(f"katz: LoRA hint {names!r} not taken: {exc}", file=sys.stderr)

    def close(self) -> None:
        if self.slot is None or self._closed:
            return
        self._closed = True
        self._thread.join(timeout=2)
        self._sock.close()
