"""Generate several images concurrently over gRPC with tritonclient's asyncio client.

    python clients/grpc_async_generate.py --url localhost:8001 --prompt "a red house" -n 4 --out-dir out
    python clients/grpc_async_generate.py --controlnet canny --control-image edges.png --lora style:0.8 ...
"""

import argparse
import asyncio
import os
import time

import numpy as np
import tritonclient.grpc.aio as grpcclient


def tensor(name, array, dtype):
    t = grpcclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def request(args, seed):
    inputs = [
        tensor("prompt", np.array([args.prompt.encode()], dtype=object), "BYTES"),
        tensor("seed", np.array([seed], dtype=np.int64), "INT64"),
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
    return inputs


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="localhost:8001", help="the server's gRPC HOST:PORT")
    p.add_argument("--prompt", required=True)
    p.add_argument("-n", type=int, default=4, help="images, sent at once")
    p.add_argument("--seed", type=int, default=7, help="seed of the first image; the next ones count up")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--controlnet")
    p.add_argument("--control-image")
    p.add_argument("--lora", help="NAME[:SCALE]")
    p.add_argument("--out-dir", default="out")
    args = p.parse_args()

    os.makedirs(args.out_dir, exist_ok=True)
    client = grpcclient.InferenceServerClient(args.url)
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("png", "seed")]

    async def one(i):
        start = time.monotonic()
        result = await client.infer("katz", request(args, args.seed + i), outputs=outputs)
        path = os.path.join(args.out_dir, f"image_{i}.png")
        with open(path, "wb") as f:
            f.write(result.as_numpy("png")[0])
        print(f"{path}: seed {int(result.as_numpy('seed')[0])}, {time.monotonic() - start:.2f}s")

    try:
        await asyncio.gather(*(one(i) for i in range(args.n)))
    finally:
        await client.close()


if __name__ == "__main__":
    asyncio.run(main())
