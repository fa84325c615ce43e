"""fw_bitfit: the BitFit method plugin for fw (entry point ``bitfit`` in the ``fw.methods`` group)."""

from fw_bitfit.method import BitFit

__all__ = ["BitFit"]
