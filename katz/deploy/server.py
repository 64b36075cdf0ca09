"""Find and run ``tritonserver`` for a rendered model repository.

Where no ``tritonserver`` is on ``PATH`` (or in ``/opt/tritonserver``), the one
bundled in the ``nvidia-pytriton`` wheel is used. The backend folder handed to
the server holds the Python backend (``python/``: ``libtriton_python.so`` and
the stub for this interpreter) and Katz's Python-based backend
(``python_katz/model.py``). The stub imports packages from the virtual
environment whose ``bin/`` comes first on ``PATH`` (it ignores ``PYTHONPATH``),
so this interpreter's ``bin/`` is put first.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from katz.deploy.repository import BACKEND_SOURCE
from katz.deploy.watchdog import ADMIN_HEADER

PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


class ServerError(RuntimeError):
    pass


@dataclass
class TritonInstall:
    binary: Path
    python_backend: Path  # folder with libtriton_python.so
    stub: Path  # triton_python_backend_stub for this Python
    other_backends: Path | None  # e.g. /opt/tritonserver/backends (tensorrt, onnxruntime)
    lib_dirs: list[Path]

    @classmethod
    def find(cls) -> "TritonInstall":
        system = shutil.which("tritonserver") or (
            "/opt/tritonserver/bin/tritonserver" if Path("/opt/tritonserver/bin/tritonserver").exists() else None
        )
        if system:
            root = Path(system).resolve().parent.parent
            backends = root / "backends"
            return cls(Path(system), backends / "python", backends / "python" / "triton_python_backend_stub",
                       backends, [])
        try:
            import pytriton
        except ImportError:
            raise ServerError(
                "no tritonserver found: install the NGC tritonserver image, or `pip install nvidia-pytriton`"
            ) from None
        root = Path(pytriton.__file__).parent / "tritonserver"
        stub = root / "python_backend_stubs" / PY_VERSION / "triton_python_backend_stub"
        if not stub.exists():
            raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {PY_VERSION}")
        libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
        return cls(root / "bin" / "tritonserver", root / "backends" / "python", stub, None, [libs])


def prepare_backends(install: TritonInstall, out: Path) -> Path:
    """Build the ``--backend-directory`` folder: ``python/``, ``python_katz/`` and any system backends."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if install.other_backends is not None:
        for sub in install.other_backends.iterdir():
            if sub.name not in ("python", "python_katz"):
                (out / sub.name).symlink_to(sub)
    py = out / "python"
    py.mkdir()
    for f in install.python_backend.iterdir():
        if f.is_file():
            shutil.copy2(f, py / f.name)
    shutil.copy2(install.stub, py / "triton_python_backend_stub")
    katz_backend = out / "python_katz"
    katz_backend.mkdir()
    shutil.copy2(BACKEND_SOURCE / "model.py", katz_backend / "model.py")
    return out


def server_env(install: TritonInstall) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    lib_dirs = [str(d) for d in install.lib_dirs]
    libpython = sysconfig.get_config_var("LIBDIR")
    if libpython:
        lib_dirs.append(libpython)
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs)
    # numeric libraries: one model process per core is enough on CPU hosts
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def cuda_pool_bytes(controlnet_mode: str) -> int:
    """Triton's CUDA memory pool per GPU (``--cuda-memory-pool-byte-size``, reserved at start) for
    the GPU tensors that cross between model processes. In ControlNet modes service and inline the
    ControlNet residuals do, 107 MB per SDXL 1024² CFG step (beyond the pool each costs a cudaMalloc:
    4.3 ms on the H100 host): 1 GiB. Otherwise (local, remote) the largest is the decoded image
    (6 MB at 1024², float16): 256 MiB, which leaves 768 MiB to the models."""
    return (1 << 30) if controlnet_mode in ("service", "inline") else (256 << 20)


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    cuda_pool_bytes: int = 1 << 30
    gpus: tuple[int, ...] = ()
    log_verbose: int = 0
    exit_timeout: int = 30
    # restart model instances whose process died (katz.deploy.watchdog); needs explicit model control
    watchdog: bool = True
    # the model-repository and shared-memory APIs answer only requests carrying this token
    admin_token: str = field(default_factory=lambda: secrets.token_hex(16))

    @property
    def local_http_url(self) -> str:
        """HOST:PORT at which this machine reaches the HTTP endpoint."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"[{host}]:{self.http_port}" if ":" in host else f"{host}:{self.http_port}"


def command(install: TritonInstall, repository: Path, backends: Path, opts: ServerOptions) -> list[str]:
    cmd = [
        str(install.binary),
        f"--model-repository={repository}",
        f"--backend-directory={backends}",
        f"--http-address={opts.host}",
        f"--grpc-address={opts.host}",
        f"--metrics-address={opts.host}",
        f"--http-port={opts.http_port}",
        f"--grpc-port={opts.grpc_port}",
        f"--metrics-port={opts.metrics_port}",
        "--exit-on-error=true",
        "--strict-readiness=true",
        # Katz writes complete configs: without this the Python backend starts one more stub per
        # model (importing torch, diffusers, katz) only to ask model.py for a config completion
        "--disable-auto-complete-config",
        f"--log-verbose={opts.log_verbose}",
        f"--exit-timeout-secs={opts.exit_timeout}",
    ]
    # Loading models and registering shared memory over the network are admin operations
    # (the load API writes into the model repository); only katz's watchdog holds the token.
    restricted = f"model-repository,shared-memory:{ADMIN_HEADER}={opts.admin_token}"
    cmd += [f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
    if opts.watchdog:
        cmd += ["--model-control-mode=explicit", "--load-model=*"]
    for g in opts.gpus:
        cmd.append(f"--cuda-memory-pool-byte-size={g}:{opts.cuda_pool_bytes}")
    return cmd


def run_foreground(cmd: list[str], env: dict[str, str], opts: ServerOptions | None = None) -> int:
    """Run tritonserver until it exits; SIGINT/SIGTERM stop it cleanly (SIGTERM, then SIGKILL once
    its exit timeout and 10 s more have passed).

    With ``opts.watchdog``, a :class:`katz.deploy.watchdog.Watchdog` reloads models whose instance process died.
    """
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    stopping = {"at": None}
    kill_after = (opts.exit_timeout if opts is not None else 30) + 10
    dog = None
    if opts is not None and opts.watchdog:
        from katz.deploy.watchdog import Watchdog

        dog = Watchdog(proc.pid, opts.local_http_url, opts.admin_token)
        dog.start()

    def stop(signum, frame):
        if dog is not None:
            dog.stop()
        if stopping["at"] is None:
            stopping["at"] = time.monotonic()
            print("\nkatz: stopping tritonserver ...", file=sys.stderr, flush=True)
            proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if stopping["at"] is not None and time.monotonic() - stopping["at"] > kill_after:
                    os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if dog is not None:
            dog.stop()
        for s, h in old.items():
            signal.signal(s, h)
