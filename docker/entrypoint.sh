#!/usr/bin/env bash
# Container entry point: serve with PyTorch engines (default), or with TensorRT
# engines (KATZ_ENGINE=tensorrt) built on first start into the `engines` volume
# and reused on later starts (`katz build-engines --reuse` keeps engines built
# from the same ONNX on the same GPU and TensorRT version).
set -euo pipefail
MODEL_DIR=${KATZ_MODEL_DIR:-/models/base}
ENGINE_DIR=${KATZ_ENGINE_DIR:-/engines}
if [ "${KATZ_ENGINE:-torch}" = "tensorrt" ]; then
    controlnets=()
    if [ -d "$MODEL_DIR/controlnets" ]; then
        for cn in "$MODEL_DIR"/controlnets/*/; do
            [ -f "$cn/config.json" ] && controlnets+=(--controlnet "$(basename "$cn")=$cn")
        done
    fi
    if [ ! -f "$ENGINE_DIR/onnx/export.json" ]; then
        echo "katz: first start: exporting ONNX to $ENGINE_DIR/onnx" >&2
        katz export --model-dir "$MODEL_DIR" "${controlnets[@]}" --out "$ENGINE_DIR/onnx" --unet-split \
            --max-size "${KATZ_MAX_SIZE:-2048}"
    fi
    katz build-engines --onnx "$ENGINE_DIR/onnx" --out "$ENGINE_DIR" --reuse
    exec "$@" --engine tensorrt --engine-dir "$ENGINE_DIR"
fi
exec "$@"
