"""Engines: the networks behind one interface, whatever runs them.

Each engine owns one component (UNet, ControlNets, VAE decoder, text encoders) on one device.
:mod:`katz.engines.torch` runs them with PyTorch (eager, compiled, CUDA graphs);
:mod:`katz.engines.tensorrt` runs the UNet, ControlNets and VAE decoder with TensorRT
(``engine: tensorrt`` in the deployment). :func:`engine_class` picks the class for a deployment.
"""

from __future__ import annotations

import functools

ENGINE_COMPONENTS = ("unet", "controlnet", "vae_decoder")


def engine_class(deployment, component: str):
    """The engine class (with the deployment's settings bound) for ``component``, one of
    :data:`ENGINE_COMPONENTS`.

    ``engine: torch`` (the default): the PyTorch engine, given the deployment's
    :class:`~katz.engines.torch.cuda_graphs.Acceleration` (CUDA graphs, compile). ``engine: tensorrt``:
    the TensorRT engine, bound to the deployment's engine folder and limits. Both take
    ``(folder, device, dtype)`` and have the same call signature.
    """
    if component not in ENGINE_COMPONENTS:
        raise ValueError(f"no engine for component {component!r} (one of {', '.join(ENGINE_COMPONENTS)})")
    if deployment.engine == "tensorrt":
        from katz.engines.tensorrt import components as trt

        cls = {"unet": trt.TrtUNetEngine, "controlnet": trt.TrtControlNetEngine,
               "vae_decoder": trt.TrtVaeDecoderEngine}[component]
        return functools.partial(cls, engine_dir=deployment.engine_dir, limits=deployment.limits)
    if component == "unet":
        from katz.engines.torch.unet import UNetEngine as cls
    elif component == "controlnet":
        from katz.engines.torch.controlnet import ControlNetEngine as cls
    else:
        from katz.engines.torch.vae import VaeDecoderEngine as cls
    return functools.partial(cls, accel=deployment.accel)
