"""Modules on the fused ops: drop-in ``SlotAttention`` and ``MultiHeadSlotAttention``, and ECLIP's
``InstanceSlotAttention`` layer."""

from .instance_slot_attention import InstanceSlotAttention, InstanceSlotAttentionOutput
from .multi_head_slot_attention import MultiHeadSlotAttention
from .slot_attention import SlotAttention

__all__ = ["InstanceSlotAttention", "InstanceSlotAttentionOutput", "MultiHeadSlotAttention", "SlotAttention"]
