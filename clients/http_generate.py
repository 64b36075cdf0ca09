"""Generate one image from a running Katz server over HTTP with plain tritonclient.

    python clients/http_generate.py --url localhost:8000 --prompt "a red house" --out house.png
    python clients/http_generate.py --controlnet canny --control-image edges.png --lora style:0.8 ...
"""

import argparse

import numpy as np
import tritonclient.http as httpclient


def tensor(name, array, dtype):
    t = httpclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="localhost:8000")
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--controlnet")
    p.add_argument("--control-image")
    p.add_argument("--lora", help="NAME[:SCALE]")
    p.add_argument("--out", default="out.png")
    args = p.parse_args()

    inputs = [
        tensor("prompt", np.array([args.prompt.encode()], dtype=object), "BYTES"),
        tensor("seed", np.array([args.seed], dtype=np.int64), "INT64"),
        tensor("steps", np.array([args.steps], dtype=np.int32), "INT32"),
    ]
    if args.controlnet:
        with open(args.control_image, "rb") as f:
            image = f.read()
        inputs.append(tensor("controlnets", np.array([args.controlnet.encode()], dtype=object), "BYTES"))
        inputs.append(tensor("control_images", np.array([image], dtype=object), "BYTES"))
    if args.lora:
        name, _, scale = args.lora.partition(":")
        inputs.append(tensor("loras", np.array([name.encode()], dtype=object), "BYTES"))
        inputs.append(tensor("lora_scales", np.array([float(scale or 1.0)], dtype=np.float32), "FP32"))

    result = httpclient.InferenceServerClient(args.url).infer("katz", inputs)
    with open(args.out, "wb") as f:
        f.write(result.as_numpy("png")[0])
    print(f"wrote {args.out}: {result.as_numpy('image').shape}, seed {int(result.as_numpy('seed')[0])}")


if __name__ == "__main__":
    main()
