"""Kernels written as tiled ATen calls (device-agnostic): the ``cpu`` backend of the contrastive losses."""
