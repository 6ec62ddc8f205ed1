"""Triton kernels. Imported lazily, only when the ``triton`` backend runs."""
