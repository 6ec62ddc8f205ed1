"""What the modules share: the attention step (the op, in float32 where the backend would not accumulate
float16/bfloat16 inputs in float32 by itself), the initial-slot draw and the checks of their arguments."""

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



def check_eps(eps) -> None:
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")


def draw_slots(mu: torch.Tensor, logsigma: torch.Tensor, batch: int, num_slots: int, device, dtype) -> torch.Tensor:
    """``mu + exp(logsigma) * randn`` of shape (batch, num_slots, dim), mu and logsigma (1, 1, dim): one draw
    of ``randn`` from the global RNG, in ``dtype`` on ``device`` (the draw of the PyPI slot-attention modules)."""
    mu = mu.expand(batch, num_slots, -1)
    sigma = logsigma.exp().expand(batch, num_slots, -1)
    return mu + sigma * torch.randn(mu.shape, device=device, dtype=dtype)


def check_slots(slots, inputs: torch.Tensor, num_slots: int | None) -> None:
    """A clear error unless the given initial ``slots`` are a floating (B, num_slots, dim) tensor on the
    device of ``inputs`` (B, N, dim), with ``num_slots`` slots when that is given too."""
    batch, _, dim = inputs.shape
    expected = f"(B, num_slots, {dim}) with B={batch}" + ("" if num_slots is None else f", num_slots={num_slots}")
    if not isinstance(slots, torch.Tensor):
        raise TypeError(f"slots must be a tensor of shape {expected}, got {type(slots).__name__}")
    if slots.dim() != 3 or slots.shape[0] != batch or slots.shape[2] != dim or slots.shape[1] == 0 or (
            num_slots is not None and slots.shape[1] != num_slots):
        raise ValueError(f"slots must have shape {expected}, got {tuple(slots.shape)}")
    if not slots.is_floating_point():
        raise TypeError(f"slots must be a floating-point tensor, got {slots.dtype}")
    if slots.device != inputs.device:
        raise ValueError(f"inputs and slots are on different devices: {inputs.device} and {slots.device}")


def check_mask(mask, inputs: torch.Tensor) -> None:
    """A clear error unless ``mask`` is a bool (B, N) tensor on the device of ``inputs`` (B, N, dim)."""
    batch, tokens = inputs.shape[:2]
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool tensor of shape (B, N) = ({batch}, {tokens}) or None, "
                        f"got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool (True = valid token), got {mask.dtype}")
    if tuple(mask.shape) != (batch, tokens):
        raise ValueError(f"mask must have shape (B, N) = ({batch}, {tokens}), got {tuple(mask.shape)}")
    if mask.device != inputs.device:
        raise ValueError(f"inputs and mask are on different devices: {inputs.device} and {mask.device}")
