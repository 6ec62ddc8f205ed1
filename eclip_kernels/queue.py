"""A fixed-size queue of momentum features and their product ids, the extra negatives of ECLIP Eq. 8."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from .losses import _gather_rows, _row_counts


class MomentumQueue(nn.Module):
    """First-in first-out bank of (K, D) momentum features and their (K,) product ids, kept on the device.

    Starts filled with random unit vectors and id -1 (MoCo / ALBEF style), so every slot is always a valid
    negative and no call needs the host to know how full it is. ``enqueue`` writes the newest features over
    the oldest with device-side index arithmetic: no host synchronization (across a process group, one: the
    ranks' row counts). The buffers are part of the state_dict (checkpointed with the model).

    Args:
        size: K, the number of stored features.
        dim: D, the feature size.
        dtype: storage dtype of the features (default float32).

    Example::

        queue = MomentumQueue(65536, 512)
        loss = ek.info_nce(h, h_momentum_pos, torch.cat([h_momentum_batch, queue.features]), s,
                           query_ids=ids, negative_ids=torch.cat([batch_ids, queue.ids]))
        queue.enqueue(h_momentum_batch, batch_ids, group=group)    # after the loss
    """

    def __init__(self, size: int, dim: int, *, dtype: torch.dtype = torch.float32):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"size and dim must be >= 1, got size={size}, dim={dim}")
        self.size, self.dim = size, dim
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1).to(dtype))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, ids: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
        """Store (N, D) features (detached) and their (N,) integer ids, replacing the oldest entries.

        With ``group``, the features and ids of every rank are all-gathered first (in rank order), so that
        all ranks keep the same queue. Ranks may hold different numbers of rows, zero included (a rank
        without rows still calls ``enqueue``: it takes part in the gathers and stores the others' rows);
        that takes one all_gather of the row counts, read on the host, before the features' and the ids'.
        Without a group nothing leaves the device. If more than K arrive, the last K are kept.
        """
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must have shape (N, {self.dim}), got {tuple(features.shape)}")
        if ids.shape != features.shape[:1] or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"ids must be an integer tensor of shape ({features.shape[0]},), got {ids.dtype} {tuple(ids.shape)}")
        if group is not None and dist.get_world_size(group) > 1:
            counts = _row_counts(features.shape[0], group, features.device)
            (features,), (ids,) = _gather_rows(features, counts, group), _gather_rows(ids, counts, group)
        features, ids = features[-self.size:], ids[-self.size:]
        slots = (self.ptr + torch.arange(features.shape[0], device=self.ptr.device)) % self.size
        self.features[slots] = features.to(self.features.dtype)
        self.ids[slots] = ids.to(self.ids.dtype)
        self.ptr.copy_((self.ptr + features.shape[0]) % self.size)
