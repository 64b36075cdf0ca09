"""Engines: the networks behind one interface, whatever runs them.

Each engine owns one component (UNet, ControlNets, VAE decoder, text encoders)
on one device. :mod:`katz.engines.torch.engines` runs them with PyTorch,
:mod:`katz.engines.tensorrt.engine` the UNet, ControlNets and VAE decoder with
TensorRT (``engine: tensorrt`` in the deployment; see :func:`engine_class`).
"""


def engine_class(deployment, torch_class):
    """The engine class a deployment uses for ``torch_class``'s component.

    ``engine: torch`` (the default): ``torch_class`` itself, given the deployment's
    :class:`~katz.engines.torch.cuda_graphs.Acceleration` where it takes one. ``engine: tensorrt``: the class of
    the same name in :mod:`katz.engines.tensorrt.engine`, bound to the deployment's engine
    folder and limits (same constructor arguments and call signature otherwise).
    """
    import functools
    import inspect

    if getattr(deployment, "engine", "torch") != "tensorrt":
        if "accel" in inspect.signature(torch_class).parameters and hasattr(deployment, "accel"):
            return functools.partial(torch_class, accel=deployment.accel)  # CUDA graphs / compile
        return torch_class

    from katz.engines import tensorrt_engines

    cls = getattr(tensorrt_engines, torch_class.__name__)
    return functools.partial(cls, engine_dir=deployment.engine_dir, limits=deployment.limits)
