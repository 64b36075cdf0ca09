"""Which host synchronisations one request makes inside the Katz models, on a GPU host.

Runs the ensemble in this process (:mod:`katz.serving.local`: the model classes Triton runs,
BLS calls made direct) on a tiny preset or a model folder, serves one request to warm up, then one
more under ``torch.cuda.set_sync_debug_mode("warn")`` and prints each call site that made the host
wait for the GPU (the Katz and diffusers frames of its stack), with the model whose ``execute()``
made it and how often. A sync inside the denoising loop drains the GPU's queue every step: the
host's next launches are then on the critical path.

    python bench/host_syncs.py --preset tiny-sdxl [--controlnet] [--controlnet-mode local]
"""

from __future__ import annotations

import argparse
import io
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-sdxl")
    p.add_argument("--model-dir", type=Path, help="a diffusers-format folder instead of --preset")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--controlnet", action="store_true", help="the request carries the folder's first ControlNet")
    p.add_argument("--controlnet-mode", default="local", choices=("inline", "local"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("host_syncs.py needs a CUDA device")

    from PIL import Image

    from katz.client import Generation
    from katz.models.folder import ModelFolder, discover_controlnets
    from katz.models.presets import ensure_preset
    from katz.serving.profiling import katz_frames
    from katz.request import Limits
    from katz.deployment import Deployment
    from katz.serving.local import LocalEnsemble

    path = args.model_dir or ensure_preset(args.preset)
    folder = ModelFolder(path, discover_controlnets(path / "controlnets"))
    size = folder.default_size
    dep = Deployment(folder.path, folder.controlnets, None, Limits(default_width=size, default_height=size),
                     device="cuda", dtype="float16", controlnet_mode=args.controlnet_mode,
                     graph_sizes=[(size, size)])
    ens = LocalEnsemble(dep)
    request = Generation(prompt="a photo of a cat", seed=3, steps=args.steps, width=size, height=size)
    if args.controlnet:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), np.uint8)).save(buf, "PNG")
        request.controlnets, request.control_images = [sorted(folder.controlnets)[0]], [buf.getvalue()]

    current = ["-"]
    for name, model in ens.models.items():
        def execute(inputs, _run=model.execute, _name=name):
            outer, current[0] = current[0], _name
            try:
                return _run(inputs)
            finally:
                current[0] = outer
        model.execute = execute

    ens.generate(request.tensors())  # warm-up (first-call work is not what a request costs)
    torch.cuda.synchronize()
    sites: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        stack = [f"{f.filename}({f.lineno}): {f.name}" for f in reversed(traceback.extract_stack()[:-1])]
        sites[(current[0], katz_frames(stack) or "?", str(message).split("\n")[0][:80])] += 1

    shown = warnings.showwarning
    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                ens.generate(request.tensors())
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = shown
    total = sum(sites.values())
    print(f"{total} host syncs in one {args.steps}-step request"
          f"{' with a ControlNet (' + args.controlnet_mode + ')' if args.controlnet else ''} on {folder.family}:")
    for (model, site, message), n in sites.most_common():
        print(f"  {n:4d}x  {model:15} {site}  [{message}]")


if __name__ == "__main__":
    main()
