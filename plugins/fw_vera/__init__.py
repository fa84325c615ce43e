"""fw_vera: the VeRA method plugin for fw (entry point ``vera`` in the ``fw.methods`` group)."""

from fw_vera.layer import VeRALinear, projections
from fw_vera.method import VeRA

__all__ = ["VeRA", "VeRALinear", "projections"]
