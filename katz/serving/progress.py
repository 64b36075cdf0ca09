"""Step progress from a loop in another model's process to the ``katz_stream`` instance reporting it.

A request's loop runs in the ``unet`` model's process (the UNet's, or a FLUX transformer's; see
:mod:`katz.diffusion.loop`), where ``katz_stream`` cannot see its steps. So ``katz_stream`` binds a
:class:`ProgressListener` (a Linux abstract Unix datagram socket of its own for the request) and puts
its name in the loop request (``loop_progress``); the loop sends one datagram per step through
:class:`ProgressSender`.
Cancellation travels back the same way: a client that cancels makes ``katz_stream`` close its
socket, the loop's next send is refused, and the loop stops at that step boundary
(:class:`ListenerGone`), as the per-step path stops at its next BLS call.

Datagrams on one host are delivered in order and as they are sent, so every step the loop finished
is in the listener's queue by the time the loop's response arrives.
"""

from __future__ import annotations

import socket
import uuid

from katz.errors import InvalidArgument, RequestGone

# a send to a full queue waits at most this long (the listener reads as fast as it streams)
SEND_TIMEOUT_S = 5.0


def _address(name: str) -> bytes:
    return b"\0katz-progress-" + name.encode()


class ListenerGone(RequestGone):
    """The ``katz_stream`` request that asked for progress has ended (its client cancelled)."""


class ProgressListener:
    """A request's progress socket: ``name`` goes in the loop request; :meth:`get` returns the next
    ``(step, steps)`` (``step`` 0-based, as ``on_step`` gets it) or None after ``timeout`` seconds."""

    def __init__(self):
        self.name = uuid.uuid4().hex
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(_address(self.name))

    def get(self, timeout: float | None) -> tuple[int, int] | None:
        """The next step report; None when none came within ``timeout`` (0: only one already queued)."""
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(64)
        except (TimeoutError, BlockingIOError):
            return None
        step, steps = data.split()
        return int(step), int(steps)

    def close(self) -> None:
        self._sock.close()


class ProgressSender:
    """The loop's side: ``on_step(i, n)`` sends step ``i`` of ``n`` to the listener ``name``; raises
    :class:`ListenerGone` once the listener is closed (the stream was cancelled)."""

    def __init__(self, name: str):
        if not name or len(name) > 64 or not name.isalnum():
            raise ValueError(f"not a progress channel name: {name!r}")
        self._address = _address(name)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.settimeout(SEND_TIMEOUT_S)

    def __call__(self, step: int, steps: int) -> None:
        try:
            self._sock.sendto(f"{step} {steps}".encode(), self._address)
        except (ConnectionRefusedError, FileNotFoundError):
            raise ListenerGone(f"the stream asking for progress ended (cancelled) at step {step + 1}/{steps}") from None
        except TimeoutError:
            pass  # a listener this far behind loses a report, not the request

    def close(self) -> None:
        self._sock.close()


def loop_progress(inputs: dict) -> ProgressSender | None:
    """The :class:`ProgressSender` a loop request asks for (its ``loop_progress`` input, a channel name
    as BYTES ``[1, 1]``), or None; a malformed one is an :class:`InvalidArgument` naming the input."""
    value = inputs.get("loop_progress")
    if value is None:
        return None
    try:
        raw = value.reshape(-1)[0]
        return ProgressSender(raw.decode() if isinstance(raw, bytes) else str(raw))
    except (ValueError, IndexError, UnicodeDecodeError, AttributeError) as exc:
        raise InvalidArgument("loop_progress", f"not a progress channel ({exc})") from None
