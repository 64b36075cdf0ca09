"""Triton glue for every Katz model: tensors in, :mod:`katz.serving` call, tensors out.

This is a Python-based backend (``backend: "python_katz"`` in config.pbtxt).
The ``role`` parameter picks the model class; all logic lives in the ``katz``
package, which the stub imports from the virtual environment it was started in.
GPU tensors cross the boundary through DLPack, never through host copies.
"""

import faulthandler
import functools
import json
import signal
import traceback

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from katz.serving.factory import BLS_ONLY_ROLES, create_model
from katz.serving.dlpack import c_order
from katz.serving.metrics import freeze_after_load, memory_gauges
from katz.errors import INVALID_ARG_MARK, UNAVAILABLE_MARK, ModelCallError, error_kind, is_out_of_memory
from katz.serving.profiling import ExecuteProfiler, ExecuteTrace

# `kill -USR1 <stub pid>` writes every thread's Python stack to the server log (a stuck
# instance says where it is stuck; the tests do it when a server does not come up).
faulthandler.register(signal.SIGUSR1, all_threads=True)


def _to_python(tensor):
    """A Triton tensor as torch (numeric) or numpy object array (BYTES)."""
    if tensor is None:
        return None
    if tensor.is_cpu():
        arr = tensor.as_numpy()
        return arr if arr.dtype == np.object_ else torch.from_numpy(arr.copy())
    return torch.from_dlpack(tensor.to_dlpack())


def _to_triton(name, value):
    if isinstance(value, torch.Tensor):
        value = c_order(value)
        if value.is_cuda:
            return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value))
        return pb_utils.Tensor(name, value.numpy())
    return pb_utils.Tensor(name, np.asarray(value))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.input_names = [i["name"] for i in config["input"]]
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
            torch.cuda.set_device(device)
        self.device = device
        self.model = create_model(params["role"], params, device, call=self._call, call_stream=self._call_stream)
        if device != "cpu":  # hand back what loading left cached and free (warm-up's eager runs)
            torch.cuda.empty_cache()
        freeze_after_load()
        self._families, self._metrics = {}, {}
        self._invalid_mark = INVALID_ARG_MARK if params["role"] in BLS_ONLY_ROLES else ""
        self._profiler = ExecuteProfiler.from_env(self.model_name)  # KATZ_PROFILE_DIR (katz/serving/profiling.py)
        self._trace = ExecuteTrace.from_env(self.model_name)  # KATZ_TRACE_DIR, KATZ_TRACE_AT (katz/serving/profiling.py)
        self._publish_metrics()  # the memory held after load (weights, CUDA graphs) before any request

    def _request(self, model_name, inputs, output_names):
        extra = {}
        if self.device == "cpu":  # a host instance (no CUDA context): GPU models answer in host memory
            extra["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        return pb_utils.InferenceRequest(
            model_name=model_name,
            inputs=[_to_triton(k, v) for k, v in inputs.items() if v is not None],
            requested_output_names=list(output_names),
            **extra,
        )

    @staticmethod
    def _outputs(model_name, response, output_names):
        if response.has_error():
            err = response.error()
            kind = {
                pb_utils.TritonError.INVALID_ARG: "invalid_arg",
                pb_utils.TritonError.UNAVAILABLE: "unavailable",
            }.get(err.code(), "internal")
            if "Stub process" in err.message() and "is not healthy" in err.message():
                kind = "unavailable"  # the callee's instance process died; katz.deploy.watchdog brings it back
            raise ModelCallError.from_error(model_name, err.message(), kind)
        return {name: _to_python(pb_utils.get_output_tensor_by_name(response, name)) for name in output_names}

    def _call(self, model_name, inputs, output_names):
        return self._outputs(model_name, self._request(model_name, inputs, output_names).exec(), output_names)

    def _call_stream(self, model_name, inputs, output_names):
        """BLS to a decoupled model: its responses' outputs, one dict each, as they come (the empty
        final response ends the iteration)."""
        for response in self._request(model_name, inputs, output_names).exec(decoupled=True):
            if response.has_error() or response.output_tensors():
                yield self._outputs(model_name, response, output_names)

    def _inputs(self, request):
        inputs = {n: _to_python(pb_utils.get_input_tensor_by_name(request, n)) for n in self.input_names}
        # a GPU instance works on its GPU: numeric inputs from the client or a CPU model move there
        return {
            k: v.to(self.device) if self.device != "cpu" and isinstance(v, torch.Tensor) else v
            for k, v in inputs.items() if v is not None
        }

    def _response(self, result):
        if not isinstance(result, BaseException):
            try:
                tensors = [_to_triton(name, value) for name, value in result.items()]
                return pb_utils.InferenceResponse(output_tensors=tensors)
            except Exception as exc:
                result = exc
        # every failure becomes this request's error, never the server's
        kind = error_kind(result)
        if kind == "invalid_arg":
            error = pb_utils.TritonError(self._invalid_mark + str(result), pb_utils.TritonError.INVALID_ARG)
        elif kind == "unavailable":
            message = str(result)
            if is_out_of_memory(result):
                message = f"{UNAVAILABLE_MARK}{self.model_name}: out of memory ({type(result).__name__}: {message})"
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            error = pb_utils.TritonError(message, pb_utils.TritonError.UNAVAILABLE)
        elif kind == "gone":  # its client cancelled: nobody reads this, and it is no fault to log
            error = pb_utils.TritonError(f"{self.model_name}: {result}")
        else:
            trace = "".join(traceback.format_exception(type(result), result, result.__traceback__))
            pb_utils.Logger.log_error(f"{self.model_name}: {trace}")
            error = pb_utils.TritonError(f"{self.model_name}: {type(result).__name__}: {result}")
        return pb_utils.InferenceResponse(output_tensors=[], error=error)

    def _stream(self, request):
        """Decoupled models (``execute_stream``): any number of responses, the last one final."""
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            self.model.execute_stream(
                self._inputs(request),
                lambda outputs, last: sender.send(self._response(outputs), flags=final if last else 0),
                request.is_cancelled,
            )
        except Exception as exc:
            try:  # a cancelled request just ends; anything else becomes its error
                if request.is_cancelled():
                    sender.send(flags=final)
                else:
                    sender.send(self._response(exc), flags=final)
            except Exception as send_exc:
                pb_utils.Logger.log_warn(f"{self.model_name}: could not end a stream: {send_exc}")

    def execute(self, requests):
        run = self._execute
        if self._trace is not None:
            run = functools.partial(self._trace.run, run)
        if self._profiler is not None:
            return self._profiler.run(run, requests)
        return run(requests)

    def _execute(self, requests):
        if hasattr(self.model, "execute_stream"):
            for request in requests:
                self._stream(request)
            self._publish_metrics()
            return None
        parsed = []
        for request in requests:
            try:
                parsed.append(self._inputs(request))
            except Exception as exc:
                parsed.append(exc)
        if hasattr(self.model, "execute_batch"):
            todo = [i for i, p in enumerate(parsed) if not isinstance(p, BaseException)]
            results = list(parsed)
            for i, r in zip(todo, self.model.execute_batch([parsed[i] for i in todo])):
                results[i] = r
        else:
            results = []
            for p in parsed:
                if isinstance(p, BaseException):
                    results.append(p)
                    continue
                try:
                    results.append(self.model.execute(p))
                except Exception as exc:
                    results.append(exc)
        responses = [self._response(r) for r in results]
        self._publish_metrics()
        return responses

    def _publish_metrics(self):
        """Counters from the model's ``metrics()`` and gauges (its ``gauges()``, the process's GPU
        memory) as Triton custom metrics (labelled by model)."""
        gauges = memory_gauges(self.device) + (self.model.gauges() if hasattr(self.model, "gauges") else [])
        for name, description, labels, value in gauges:
            self._metric(name, description, labels, pb_utils.MetricFamily.GAUGE)[0].set(float(value))
        if not hasattr(self.model, "metrics"):
            return
        for name, description, labels, total in self.model.metrics():
            slot = self._metric(name, description, labels, pb_utils.MetricFamily.COUNTER)
            if total > slot[1]:
                slot[0].increment(float(total - slot[1]))
                slot[1] = total

    def _metric(self, name, description, labels, kind):
        """``[metric, last total published]`` for ``name`` with ``labels``, made on first use."""
        key = (name, tuple(sorted(labels.items())))
        if key not in self._metrics:
            if name not in self._families:
                self._families[name] = pb_utils.MetricFamily(name=name, description=description, kind=kind)
            self._metrics[key] = [self._families[name].Metric(labels={"model": self.model_name, **labels}), 0.0]
        return self._metrics[key]
