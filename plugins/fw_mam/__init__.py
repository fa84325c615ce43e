"""fw_mam: the MAM adapter (entry point ``mam``), built from fw_prefix and fw_adapters."""

from fw_mam.method import MAM

__all__ = ["MAM"]
