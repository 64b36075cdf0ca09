#!/usr/bin/env bash
# Make a Python environment for Katz's server and benchmarks on the GPU host (no network there)
# from carried files; prints its python. Made by bench/make_gpu_carry.sh; carry `.whl` and `.e2e`
# (about 50 MB together).
#   .whl/diffusers-*.whl        diffusers (not in the image)
#   .whl/peft-*.whl             peft as tested with that diffusers here (the image has its own version;
#                               the diffusers peer, bench/peer, loads LoRAs through it)
#   .e2e/numpy-1.26*.whl        the Triton python stub's numpy tensors break with numpy 2
#   .e2e/triton_slim.tar.xz     tritonserver 2.51, the Python backend, the 3.12 stub and their libraries,
#                               from the nvidia-pytriton wheel (53 MB; trimmed to what one Python needs)
#   .e2e/tritonclient.tgz       the pure-Python tritonclient package (gRPC/HTTP clients)
#   .e2e/python_rapidjson-*.whl what tritonclient's clients import
# The stub takes its packages from the environment first on PATH (it ignores PYTHONPATH), so the
# environment is a venv: the image's packages linked in one by one, except numpy and what was
# built against numpy 2 (scipy, scikit-learn, pandas: transformers imports scikit-learn when it
# is there), and numpy 1.26 installed in their place.
set -euo pipefail
BASE=${PYTHON:-python3}
VENV=${KATZ_VENV:-/tmp/kv}
if [ -f "$VENV/.katz-ready" ]; then  # made by an earlier call on this (still warm) machine
  SITE=$("$VENV/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$PWD" > "$SITE/katz-dev.pth"  # this call's checkout
  echo "$VENV/bin/python3"
  exit 0
fi
rm -rf "$VENV"  # a set-up cut off half way is made again
IMAGE_SITE=$($BASE -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
$BASE -m venv --without-pip "$VENV" >&2
SITE=$("$VENV/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for entry in "$IMAGE_SITE"/*; do
  name=$(basename "$entry")
  case "${name,,}" in
    numpy|numpy-*|numpy.libs|scipy|scipy-*|scipy.libs|sklearn|scikit_learn*|pandas|pandas-*|peft|peft-*|_distutils_hack|distutils-precedence.pth) ;;
    *) ln -s "$entry" "$SITE/$name" ;;
  esac
done
$BASE -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
  .whl/diffusers-*.whl .whl/peft-*.whl .e2e/*.whl >&2
tar -xzf .e2e/tritonclient.tgz -C "$SITE"
tmp=$(mktemp -d)
tar -xJf .e2e/triton_slim.tar.xz -C "$tmp"
mkdir -p "$SITE/pytriton"
touch "$SITE/pytriton/__init__.py"
mv "$tmp/pytriton_slim/tritonserver" "$SITE/pytriton/"
mv "$tmp/pytriton_slim/libs" "$SITE/nvidia_pytriton.libs"
echo "$PWD" > "$SITE/katz-dev.pth"  # this checkout on sys.path, also for the stub
"$VENV/bin/python3" - >&2 <<'PY'
import os, sysconfig
import numpy, torch, transformers, diffusers, peft
d, so = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
print("numpy", numpy.__version__, "torch", torch.__version__, "transformers", transformers.__version__,
      "diffusers", diffusers.__version__, "peft", peft.__version__, "| libpython for the stub:", os.path.join(d, so or "?"),
      "present" if so and os.path.exists(os.path.join(d, so)) else "MISSING")
PY
touch "$VENV/.katz-ready"
echo "$VENV/bin/python3"
