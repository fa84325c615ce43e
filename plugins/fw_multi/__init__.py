"""fw_multi: several named adapters on one frozen backbone (entry point ``multi`` in the
``fw.methods`` group), with per-example routing of mixed-adapter batches."""

from fw_multi.data import MultiTaskData, RoutedClassificationData
from fw_multi.layer import BASE, MultiAdapterLayer, Router
from fw_multi.method import MultiAdapter
from fw_multi.metrics import AdapterMetrics

__all__ = ["BASE", "AdapterMetrics", "MultiAdapter", "MultiAdapterLayer", "MultiTaskData", "RoutedClassificationData", "Router"]
