"""fw_adalora: the AdaLoRA method plugin for fw (entry point ``adalora`` in the ``fw.methods`` group)."""

from fw_adalora.allocator import RankAllocator, Schedule
from fw_adalora.layer import SVDLinear
from fw_adalora.method import AdaLoRA

__all__ = ["AdaLoRA", "RankAllocator", "Schedule", "SVDLinear"]
