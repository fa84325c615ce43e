"""fw_ia3: the IA³ method plugin for fw (entry point ``ia3`` in the ``fw.methods`` group)."""

from fw_ia3.layer import IA3Linear
from fw_ia3.method import IA3

__all__ = ["IA3", "IA3Linear"]
