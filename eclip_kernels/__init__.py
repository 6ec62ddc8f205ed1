"""eclip-kernels: fused kernels for ECLIP (instance-level vision-language pretraining, CVPR 2023).

    import eclip_kernels as ek
    out, ent = ek.slot_attention(q, k, v, mask=mask, return_entropy=True)
    loss_r = ek.entropy_regularizer(ent, positive_index, num_tokens=mask.sum(1))

See ``ek.available_backends()`` for what runs on this machine.
"""

from . import nn, ops  # noqa: F401  (ops registers fake kernels and autograd of the operators)
from ._extension import ExtensionLoadWarning
from .backends import BackendFallbackWarning, BackendStatus, available_backends
from .functional import entropy_regularizer, slot_attention, slot_attention_weights
from .losses import clip_loss, info_nce, siglip_loss
from .queue import MomentumQueue

__version__ = "0.1.0"

__all__ = [
    "BackendFallbackWarning",
    "BackendStatus",
    "ExtensionLoadWarning",
    "MomentumQueue",
    "available_backends",
    "clip_loss",
    "entropy_regularizer",
    "info_nce",
    "nn",
    "siglip_loss",
    "slot_attention",
    "slot_attention_weights",
]
