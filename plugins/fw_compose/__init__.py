"""fw_compose: several PEFT methods on one backbone (entry point ``compose``)."""

from fw_compose.method import Compose

__all__ = ["Compose"]
