"""Gauges every model process publishes (Triton custom metrics): GPU memory and CUDA-graph use."""

from __future__ import annotations

import torch


def memory_gauges(device: str) -> list[tuple[str, str, dict, float]]:
    """The process's CUDA memory on ``device`` as Triton gauges ``(name, description, labels, value)``:
    torch's caching allocator, ``allocated`` (in tensors) and ``reserved`` (held from the driver; what
    nvidia-smi shows, less the CUDA context). Empty on the CPU."""
    if not str(device).startswith("cuda") or not torch.cuda.is_initialized():
        return []
    description = "GPU memory of this model's process, torch's caching allocator (bytes)"
    return [
        ("katz_gpu_memory_bytes", description, {"kind": "allocated"}, float(torch.cuda.memory_allocated(device))),
        ("katz_gpu_memory_bytes", description, {"kind": "reserved"}, float(torch.cuda.memory_reserved(device))),
    ]


def graph_metrics(engine) -> list[tuple[str, str, dict, float]]:
    """CUDA-graph replays and eager fallbacks (calls of a shape not captured at load) per graph."""
    out = []
    for graph in getattr(engine, "graphs", {}).values():
        if hasattr(graph, "replays"):
            out.append(("katz_cuda_graph_replays_total", "steps replayed as CUDA graphs", {"graph": graph.name},
                        graph.replays))
            out.append(("katz_cuda_graph_eager_calls_total", "calls of a shape with no captured graph (run eagerly)",
                        {"graph": graph.name}, graph.eager_calls))
    return out
