"""fw_adapters: bottleneck adapter plugins for fw (entry points ``houlsby``, ``pfeiffer``,
``parallel_adapter`` and the general ``adapter``)."""

from fw_adapters.layers import Bottleneck, ParallelAdapter, SerialAdapter
from fw_adapters.method import BottleneckAdapter, Houlsby, Parallel, Pfeiffer

__all__ = ["BottleneckAdapter", "Houlsby", "Pfeiffer", "Parallel", "Bottleneck", "SerialAdapter", "ParallelAdapter"]
