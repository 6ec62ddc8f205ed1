"""ECLIP on eclip_kernels: the model layer (``eclip.models``)."""
