"""The attention step shared by the modules: the op, in float32 where the backend would not accumulate
float16/bfloat16 inputs in float32 by itself."""

from __future__ import annotations

import torch

from ..backends import resolve_backend
from ..functional import slot_attention, slot_attention_weights

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@torch.compiler.assume_constant_result
def _upcast_to_float32(backend: str, device: torch.device, dtype: torch.dtype, num_queries: int) -> bool:
    """True for float16/bfloat16 inputs that the backend would compute in that dtype (the reference: an eps
    of 1e-8 vanishes in float16, token sums lose bits) or does not take at all (cpu and float16). The fused
    backends accumulate in float32 by themselves."""
    if dtype not in _LOW_PRECISION:
        return False
    try:
        # a probe: the call itself warns if auto falls back
        return resolve_backend(backend, device, dtype, num_queries, warn=False) == "reference"
    except TypeError:  # the named backend does not take this dtype: it takes float32
        return True


def attend(q, k, v, *, scale, eps, mask, backend, return_entropy=False):
    """``eclip_kernels.slot_attention`` for modules. float16/bfloat16 inputs (for example under
    torch.autocast) that the backend would not accumulate in float32 are computed in float32; the output
    keeps the input dtype."""
    dtype = q.dtype
    if k.dtype != dtype or v.dtype != dtype:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if _upcast_to_float32(backend, q.device, dtype, q.shape[1]):
        result = slot_attention(q.float(), k.float(), v.float(), scale=scale, eps=eps, mask=mask,
                                return_entropy=return_entropy, backend=backend)
        if return_entropy:
            return result[0].to(dtype), result[1]
        return result.to(dtype)
    return slot_attention(q, k, v, scale=scale, eps=eps, mask=mask, return_entropy=return_entropy, backend=backend)


def attention_weights(q, k, *, scale, eps, mask):
    """The attention A (B, N, T) of the last call, in float32 for float16/bfloat16 inputs (for maps)."""
    if q.dtype in _LOW_PRECISION or k.dtype in _LOW_PRECISION:
        q, k = q.float(), k.float()
    return slot_attention_weights(q, k.to(q.dtype), scale=scale, eps=eps, mask=mask)


def check_tokens(name: str, t: torch.Tensor, dim: int, dims: str = "B, N") -> None:
    """A clear error unless ``t`` is a floating tensor of shape (dims..., dim)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape ({dims}, {dim}), got {type(t).__name__}")
    if t.dim() != dims.count(",") + 2 or t.shape[-1] != dim:
        raise ValueError(f"{name} must have shape ({dims}, {dim}), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")

