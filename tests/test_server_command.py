"""The ``tritonserver`` command line ``katz serve`` builds (katz.deploy.server), without starting it."""

from __future__ import annotations

from pathlib import Path

from katz.deploy.server import ServerOptions, TritonInstall, command, cuda_pool_bytes


def test_cuda_pool_sized_for_what_crosses_processes():
    assert cuda_pool_bytes("service") == cuda_pool_bytes("inline") == 1 << 30  # 107 MB residuals per step
    assert cuda_pool_bytes("local") == cuda_pool_bytes("remote") == 256 << 20
    install = TritonInstall(Path("tritonserver"), Path("python"), Path("stub"), None, [])
    opts = ServerOptions(gpus=(0, 1), cuda_pool_bytes=cuda_pool_bytes("local"))
    cmd = command(install, Path("repo"), Path("backends"), opts)
    assert [c for c in cmd if c.startswith("--cuda-memory-pool")] == [
        f"--cuda-memory-pool-byte-size={g}:{256 << 20}" for g in (0, 1)]
    assert not any(c.startswith("--cuda-memory-pool") for c in command(install, Path("r"), Path("b"), ServerOptions()))
