"""``katz serve``'s foreground runner (katz.deploy.server.run_foreground): a stop signal goes to
tritonserver, which gets its whole exit timeout before it is killed."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from katz.deploy.server import ServerOptions, run_foreground

# stands in for tritonserver: ignores SIGTERM, so only the runner's SIGKILL ends it
STUBBORN = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"]


def _sigterm_self_after(seconds: float) -> None:
    """SIGTERM this process ``seconds`` after run_foreground has put its handler in place (never
    before: the default action would end the test run)."""
    before = signal.getsignal(signal.SIGTERM)

    def send():
        deadline = time.monotonic() + 60
        while signal.getsignal(signal.SIGTERM) is before:
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        time.sleep(seconds)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send, daemon=True).start()


def test_stop_signal_is_forwarded_and_the_server_exits_on_it():
    cmd = [sys.executable, "-c", "import time; time.sleep(600)"]  # dies of the forwarded SIGTERM
    _sigterm_self_after(0.5)
    start = time.monotonic()
    rc = run_foreground(cmd, dict(os.environ), ServerOptions(exit_timeout=5, watchdog=False))
    assert rc == -signal.SIGTERM and time.monotonic() - start < 5


def test_a_server_that_ignores_the_stop_is_killed_after_its_exit_timeout():
    _sigterm_self_after(0.5)
    start = time.monotonic()
    rc = run_foreground(STUBBORN, dict(os.environ), ServerOptions(exit_timeout=2, watchdog=False))
    took = time.monotonic() - start
    assert rc == -signal.SIGKILL
    assert 0.5 + 2 + 10 - 1 <= took <= 0.5 + 2 + 10 + 5, took  # exit timeout + 10 s, not a fixed 30 s
