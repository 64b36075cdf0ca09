"""Engines: the networks behind one interface, whatever runs them.

Each engine owns one component (UNet, ControlNets, VAE decoder, text encoders)
on one device. :mod:`katz.engines.torch_engines` runs them with PyTorch.
"""
