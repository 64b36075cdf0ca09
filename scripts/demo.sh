#!/usr/bin/env bash
# `make demo`: serve the built-in tiny-sdxl preset, generate one image with a
# ControlNet and a LoRA over HTTP, write it to out/demo.png, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p out
PORT=${KATZ_DEMO_PORT:-8000}

katz serve --preset tiny-sdxl --http-port "$PORT" --grpc-port $((PORT + 1)) --metrics-port $((PORT + 2)) \
    > out/demo-server.log 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT

echo "waiting for the server on localhost:$PORT (log: out/demo-server.log) ..."
python - "$PORT" <<'PY'
import sys, time
import tritonclient.http as http
client = http.InferenceServerClient(f"localhost:{sys.argv[1]}")
for _ in range(300):
    try:
        if client.is_server_ready():
            sys.exit(0)
    except Exception:
        pass
    time.sleep(1)
sys.exit("server did not become ready; see out/demo-server.log")
PY

# a control image: concentric rings, as an edge map would look
python - <<'PY'
import numpy as np
from PIL import Image
y, x = np.mgrid[:64, :64]
rings = ((np.hypot(x - 32, y - 32) // 6) % 2 * 255).astype(np.uint8)
Image.fromarray(np.stack([rings] * 3, -1)).save("out/control.png")
PY

katz generate --url "localhost:$PORT" --protocol http \
    --prompt "a photo of a red house on a mountain" --seed 7 --steps 20 \
    --controlnet canny --control-image out/control.png \
    --lora style:0.8 \
    --out out/demo.png
