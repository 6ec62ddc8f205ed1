"""Modules on the fused ops: a drop-in ``SlotAttention`` and ECLIP's ``InstanceSlotAttention`` layer."""

from .instance_slot_attention import InstanceSlotAttention, InstanceSlotAttentionOutput
from .slot_attention import SlotAttention

__all__ = ["InstanceSlotAttention", "InstanceSlotAttentionOutput", "SlotAttention"]
