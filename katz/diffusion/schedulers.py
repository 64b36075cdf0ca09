"""Scheduler names a request may ask for, mapped to diffusers scheduler classes.

Every request gets a fresh scheduler built from the model folder's own
``scheduler_config.json``, so no state (step index, multistep history) is
shared between requests.
"""

from __future__ import annotations

# name -> (diffusers class name, extra config overrides)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
DEFAULT = "default"  # the folder's own scheduler class


def scheduler_names() -> tuple[str, ...]:
    return (DEFAULT, *SCHEDULERS)


def make_scheduler(name: str, base_config: dict):
    """A new scheduler instance ``name`` configured from the model's ``base_config``."""
    if name == DEFAULT:
        cls_name, overrides = base_config.get("_class_name", "EulerDiscreteScheduler"), {}
    else:
        cls_name, overrides = SCHEDULERS[name]
    import diffusers  # here: preprocessing validates names without importing diffusers (~1.5 s)

    cls = getattr(diffusers, cls_name)
    return cls.from_config({**base_config, **overrides})
