"""Generate one image over gRPC streaming from `katz_stream`: a response per denoising step, then the image.

    python clients/grpc_stream_generate.py --url localhost:8001 --prompt "a red house" --steps 30 --out house.png
    python clients/grpc_stream_generate.py ... --cancel-at 5    # cancel after 5 steps: the server stops there

The request tensors are the `katz` ensemble's; progress responses carry `step`,
`steps` and `elapsed_s`, the last response `image`, `png`, `seed` and `lora_applied_step`.
"""

import argparse
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient


def tensor(name, array, dtype):
    t = grpcclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="localhost:8001", help="the server's gRPC HOST:PORT")
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lora", help="NAME[:SCALE]")
    p.add_argument("--cancel-at", type=int, help="cancel the request after this many steps")
    p.add_argument("--out", default="out.png")
    args = p.parse_args()

    inputs = [
        tensor("prompt", np.array([args.prompt.encode()], dtype=object), "BYTES"),
        tensor("seed", np.array([args.seed], dtype=np.int64), "INT64"),
        tensor("steps", np.array([args.steps], dtype=np.int32), "INT32"),
    ]
    if args.lora:
        name, _, scale = args.lora.partition(":")
        inputs.append(tensor("loras", np.array([name.encode()], dtype=object), "BYTES"))
        inputs.append(tensor("lora_scales", np.array([float(scale or 1.0)], dtype=np.float32), "FP32"))

    responses = queue.Queue()
    client = grpcclient.InferenceServerClient(args.url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer("katz_stream", inputs)
    cancel = False
    try:
        while True:
            result, error = responses.get(timeout=600)
            if error is not None:
                sys.exit(f"request failed: {error}")
            if result.as_numpy("png") is not None:  # the last response
                with open(args.out, "wb") as f:
                    f.write(result.as_numpy("png")[0])
                print(f"\nwrote {args.out}, seed {int(result.as_numpy('seed')[0])}")
                break
            step, steps = int(result.as_numpy("step")[0]), int(result.as_numpy("steps")[0])
            print(f"\rstep {step}/{steps}, {float(result.as_numpy('elapsed_s')[0]):.1f}s", end="", flush=True)
            if args.cancel_at and step >= args.cancel_at:
                cancel = True
                print(f"\ncancelled at step {step}")
                break
    finally:
        # cancel_requests=True cancels the request on the server, which stops at its next step
        client.stop_stream(cancel_requests=cancel)
        client.close()


if __name__ == "__main__":
    main()
