"""The TensorRT path: ONNX export, its numerical check, LoRA refit maps and engine builds.

One module per component owns its graph (wrapper module, tensor names, dynamic axes, shape
profile): :mod:`~katz.export.unet` (the UNet with ControlNet residuals as inputs, and its
down/up split), :mod:`~katz.export.controlnet`, :mod:`~katz.export.vae`,
:mod:`~katz.export.text_encoder`. :mod:`~katz.export.graph` runs the export and :mod:`~katz.export.onnx_cleanup` cleans the
ONNX (parameter-named weights, folded weight transposes); :mod:`~katz.export.manifest` exports
a whole model folder; :mod:`~katz.export.onnx_check` compares every graph under onnxruntime
with PyTorch; :mod:`~katz.lora.refit_map` maps LoRA targets to engine weights;
:mod:`~katz.export.tensorrt_build` builds the engines (TensorRT 10, imported lazily);
(:mod:`~katz.deploy.tensorrt_plans` renders their ``tensorrt_plan`` model configs at serving time);
:mod:`~katz.export.cli` adds ``katz export`` and ``katz build-engines``. The engines
themselves are :mod:`katz.engines.tensorrt.engine`.
"""
