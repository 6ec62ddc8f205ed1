"""Functional API: input checks, backend choice and documentation. The math is in SPEC section 2-3."""

from __future__ import annotations

import math

import torch

from . import reference
from .backends import resolve_call
from .ops import slot_attention as _slot_attention_ops


@torch.compiler.assume_constant_result
def _resolve(
    backend: str, device: torch.device, dtype: torch.dtype, num_queries: int, autocast_dtype: torch.dtype | None
) -> tuple[str, torch.dtype]:
    # Pure function of its arguments and of the build (its warnings are issued once, while tracing under
    # torch.compile); constant under torch.compile.
    return resolve_call(backend, device, dtype, num_queries, "slot_attention", autocast_dtype)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype of ``torch.autocast`` when it is enabled for ``device``'s type, else None."""
    is_enabled = getattr(torch, "is_autocast_enabled", None)
    get_dtype = getattr(torch, "get_autocast_dtype", None)
    if is_enabled is None or get_dtype is None or device.type not in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return None
    if not is_enabled(device.type):
        return None
    return get_dtype(device.type)


def _promote_under_autocast(*tensors):
    """Under autocast, float16/bfloat16/float32 inputs of different dtypes are accepted, as by a matrix
    product: they are brought to their promoted dtype here (before the input checks), and the precision
    policy then takes them in the autocast dtype. Anything else is returned as it is, for the checks."""
    first = tensors[0]
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
               for t in tensors):
        return tensors
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1 or _autocast_dtype(first.device) is None:
        return tensors
    common = first.dtype
    for t in tensors[1:]:
        common = torch.promote_types(common, t.dtype)
    return tuple(_cast(t, common) for t in tensors)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Differentiable cast of a floating tensor (gradients return in the tensor's own dtype)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, mask: torch.Tensor | None
) -> None:
    named = [("q", q, "B, T, D"), ("k", k, "B, N, D")] + ([("v", v, "B, N, Dv")] if v is not None else [])
    for name, t, dims in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape ({dims}), got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape ({dims}), got a {t.dim()}-d tensor of shape {_shape(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"q and {name} are on different devices: {q.device} and {t.device}")
        if t.dtype != q.dtype:
            raise TypeError(f"q and {name} must have the same dtype, got {q.dtype} and {t.dtype}")
        if 0 in t.shape:
            raise ValueError(f"{name} has an empty dimension: shape {_shape(t)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k batch sizes differ: q {_shape(q)} (B={q.shape[0]}), k {_shape(k)} (B={k.shape[0]})")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"q and k feature sizes differ: q {_shape(q)} (D={q.shape[2]}), k {_shape(k)} (D={k.shape[2]})")
    if v is not None and v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v must have shape (B, N, Dv) with the B and N of k {_shape(k)}, got v {_shape(v)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool tensor of shape (B, N) or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must have dtype torch.bool (True = valid token), got {mask.dtype}")
        if mask.shape != k.shape[:2]:
            raise ValueError(f"mask must have shape (B, N) = ({k.shape[0]}, {k.shape[1]}), got {_shape(mask)}")
        if mask.device != q.device:
            raise ValueError(f"q and mask are on different devices: {q.device} and {mask.device}")


def _check_scalars(q: torch.Tensor, scale: float | None, eps: float) -> float:
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    if not (math.isfinite(float(eps)) and float(eps) >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return scale


def slot_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    eps: float = 0.0,
    mask: torch.Tensor | None = None,
    return_entropy: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Slot attention with the softmax over queries and a weighted mean over tokens (ECLIP Eq. 2-4).

    For each sample b, token i and query t::

        M[b,i,t]   = softmax over t of scale * <k[b,i], q[b,t]>    # each token distributes itself over queries
        m[b,i,t]   = M[b,i,t] + eps                               # 0 for masked tokens
        A[b,i,t]   = m[b,i,t] / sum_i m[b,i,t]                     # weighted mean over tokens
        out[b,t]   = sum_i A[b,i,t] v[b,i]
        ent[b,t]   = -sum_i A[b,i,t] log A[b,i,t]                  # 0 log 0 = 0

    ``eps`` is added to every (valid) element before the token sum, as in the common PyTorch
    slot-attention implementation. The W_o projection and residual of Eq. 5 belong to the module
    (:class:`eclip_kernels.nn.InstanceSlotAttention`).

    Args:
        q: queries (B, T, D), already projected.
        k: keys (B, N, D), already projected.
        v: values (B, N, Dv), already projected. q, k, v share dtype and device (under autocast, their
            float16/bfloat16/float32 dtypes may differ); any strides.
        scale: multiplier of the logits, > 0; default ``D ** -0.5``.
        eps: >= 0, added to the softmax weights before the token sum (default 0).
        mask: optional (B, N) bool, True = valid token. Masked tokens get no weight. A sample whose
            tokens are all masked gets ``out = 0`` and ``ent = 0`` (and zero gradients), not NaN.
        return_entropy: also return ``ent`` (B, T), the entropy of each query's weights over the tokens
            (the input of :func:`entropy_regularizer`, ECLIP Eq. 10). Differentiable.
        backend: "auto" (default), "cpu", "cuda", "triton" or "reference"; see
            :func:`eclip_kernels.available_backends`. A named backend that cannot run the call raises.

    Returns:
        ``out`` (B, T, Dv) in the input dtype, or ``(out, ent)``; ``ent`` is float32 (float64 for float64
        inputs).

    Numerics: the fused backends (cpu, cuda, triton) accumulate in float32 (float64 for float64 inputs), make
    one pass over the tokens for all T queries, and never store the (B, N, T) attention: backward recomputes
    it from q and k. Supported dtypes: cpu float32/float64/bfloat16; cuda (experimental, not yet verified on
    a GPU; only when named) float32/float64/float16/bfloat16; triton float32/float16/bfloat16; reference any
    floating dtype (computed in the input dtype). T <= 64 on cuda and triton; no limit on cpu and reference. ``auto`` falls back with a
    :class:`~eclip_kernels.BackendFallbackWarning` that names the reason (README "Precision and backend
    choice").

    Under ``torch.autocast`` (enabled for the inputs' device type), float32/float16/bfloat16 inputs are cast
    (differentiably) to the autocast dtype, as for a matrix product, and ``out`` is returned in it; ``ent``
    stays float32. The ``reference`` backend then computes in float32 from the cast inputs, with autocast
    disabled. A backend without a kernel for the autocast dtype runs the inputs' own dtype
    (:func:`eclip_kernels.backends.resolve_call`).
    """
    q, k, v = _promote_under_autocast(q, k, v)
    _check_attention_inputs(q, k, v, mask)
    scale = _check_scalars(q, scale, eps)
    autocast = _autocast_dtype(q.device)
    chosen, dtype = _resolve(backend, q.device, q.dtype, q.shape[1], autocast)
    q, k, v = _cast(q, dtype), _cast(k, dtype), _cast(v, dtype)
    if chosen == "reference":
        if autocast is not None and dtype != torch.float64:
            # under autocast: float32 math from the inputs rounded to the autocast dtype, as the fused kernels
            with torch.autocast(q.device.type, enabled=False):
                out, ent = reference.slot_attention(q.float(), k.float(), v.float(), scale, float(eps), mask)
            out = out.to(dtype)
        else:
            out, ent = reference.slot_attention(q, k, v, scale, float(eps), mask)
        ent = ent.to(_slot_attention_ops._stat_dtype(dtype))
    else:
        out, ent, _, _ = _slot_attention_ops.forward_op(chosen)(q, k, v, mask, scale, float(eps))
    return (out, ent) if return_entropy else out


def slot_attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    eps: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The attention weights A (B, N, T) of :func:`slot_attention`, for attention maps and grounding.

    Not fused: it materializes (B, N, T) in the input dtype (plain PyTorch, differentiable). Each column
    ``A[b, :, t]`` sums to 1 over the valid tokens (0 where all tokens of the sample are masked).

    Args:
        q: queries (B, T, D). k: keys (B, N, D). scale, eps, mask: as in :func:`slot_attention`.
    """
    _check_attention_inputs(q, k, None, mask)
    scale = _check_scalars(q, scale, eps)
    return reference.slot_attention_weights(q, k, scale, float(eps), mask)


def entropy_regularizer(
    ent: torch.Tensor,
    positive_index: torch.Tensor,
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """ECLIP's entropy regularizer (Eq. 10), over the token distributions A of each query.

    ``L_R = mean_b [ ent[b, r_b] + sum_{j != r_b} (log N_b - ent[b, j]) ]``: low entropy (sharp attention,
    on the product) for the positive query r_b, high entropy for the T - 1 negatives.

    Args:
        ent: (B, T) per-query entropies from ``slot_attention(..., return_entropy=True)``.
        positive_index: (B,) integer index r_b in [0, T) of each sample's positive query. Indices are not
            range-checked on the host (that would synchronize a GPU); an out-of-range index raises in the
            scatter on CPU and is a device-side assertion on CUDA.
        num_tokens: N_b, the number of valid tokens: an int for all samples, or a (B,) tensor (e.g.
            ``mask.sum(1)``); a count of 0 is taken as 1. If None, the constant ``log N_b`` terms are left out: the gradient is the same
            and the value is lower by ``(T - 1) * mean_b log N_b``.

    Returns:
        A scalar in the dtype of ``ent``.
    """
    if not isinstance(ent, torch.Tensor) or ent.dim() != 2 or not ent.is_floating_point():
        raise ValueError(f"ent must be a floating-point tensor of shape (B, T), got {ent!r:.80}")
    if not isinstance(positive_index, torch.Tensor) or positive_index.shape != ent.shape[:1]:
        raise ValueError(
            f"positive_index must be a tensor of shape (B,) = ({ent.shape[0]},), got "
            f"{_shape(positive_index) if isinstance(positive_index, torch.Tensor) else type(positive_index).__name__}"
        )
    if positive_index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"positive_index must be an integer tensor, got {positive_index.dtype}")
    if positive_index.device != ent.device:
        raise ValueError(f"ent and positive_index are on different devices: {ent.device} and {positive_index.device}")
    if isinstance(num_tokens, bool):
        raise TypeError("num_tokens must be an int, a (B,) tensor or None, got a bool")
    if isinstance(num_tokens, int):
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        num_tokens = torch.full(ent.shape[:1], num_tokens, dtype=ent.dtype, device=ent.device)
    elif num_tokens is not None:
        if not isinstance(num_tokens, torch.Tensor) or num_tokens.shape != ent.shape[:1]:
            raise ValueError(f"num_tokens must be an int, a tensor of shape (B,) = ({ent.shape[0]},), or None")
        if num_tokens.device != ent.device:
            raise ValueError(f"ent and num_tokens are on different devices: {ent.device} and {num_tokens.device}")
    return reference.entropy_regularizer(ent, positive_index.long(), num_tokens)
