"""fw_dora: the DoRA method plugin for fw (entry point ``dora`` in the ``fw.methods`` group)."""

from fw_dora.layer import DoRALinear
from fw_dora.method import DoRA

__all__ = ["DoRA", "DoRALinear"]
