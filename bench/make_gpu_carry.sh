#!/usr/bin/env bash
# Build the folders bench/gpu_host_setup.sh installs from (run here, in the repo root, with the
# dev venv made by `make install`); both folders are git-ignored (.gitignore).
set -euo pipefail
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
DL="python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp"
mkdir -p .whl .e2e
$DL -d .whl diffusers==0.42.1
# the diffusers peer's LoRA backend (bench/peer): the version tested here, not the image's own
$DL -d .whl "peft==$(.venv/bin/python -c 'import peft; print(peft.__version__)')"
$DL --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .e2e numpy==1.26.4 python-rapidjson==1.20
tmp=$(mktemp -d)
mkdir -p "$tmp/pytriton_slim/libs"
cp -r "$SITE/pytriton/tritonserver" "$tmp/pytriton_slim/"
find "$tmp/pytriton_slim/tritonserver/python_backend_stubs" -mindepth 1 -maxdepth 1 ! -name 3.12 -exec rm -rf {} +
cp "$SITE"/nvidia_pytriton.libs/* "$tmp/pytriton_slim/libs/"
rm -f "$tmp"/pytriton_slim/libs/libpython3-*  # the stub uses the host's own libpython
tar -C "$tmp" -cJf .e2e/triton_slim.tar.xz pytriton_slim
(cd "$SITE" && tar --exclude=__pycache__ -czf "$OLDPWD/.e2e/tritonclient.tgz" tritonclient)
du -sh .whl .e2e
