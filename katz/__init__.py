"""Katz: serving text-to-image diffusion workflows on NVIDIA Triton Inference Server."""
