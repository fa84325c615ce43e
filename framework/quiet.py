"""A normal run prints what fw says and what the user asked for; ``--verbose`` (or
``FW_VERBOSE=1``) shows the libraries' own chatter again.

Hidden by default: Lightning's hardware lines ("GPU available: False ...") and its
advertisement tips, the deprecation warnings Lightning's internals trigger, transformers'
load reports (a task head "newly initialized" is how fine-tuning starts) and bitsandbytes'
note about optional kernels. With ``trainer.enable_progress_bar: false`` the progress bars of
``datasets`` (loading, tokenizing) and transformers (loading weights) are off too.
"""

from __future__ import annotations

import logging
import os
import warnings

#: Lightning info lines that describe the machine or advertise, not the run
LIGHTNING_NOISE = ("GPU available", "TPU available", "HPU available", "💡 Tip", "Loading `train_dataloader` to estimate")


class _DropLines(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith(self.prefixes)


def verbose_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether ``--verbose`` is on the command line (or FW_VERBOSE is set), and argv without it."""
    rest = [a for a in argv if a != "--verbose"]
    return len(rest) != len(argv) or os.environ.get("FW_VERBOSE", "") not in ("", "0"), rest


def quiet_libraries(verbose: bool) -> None:
    if verbose:
        return
    drop = _DropLines(LIGHTNING_NOISE)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(drop)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def progress_bars(enabled: bool) -> None:
    """``datasets``' and transformers' bars follow the trainer's ``enable_progress_bar``."""
    import datasets
    from transformers.utils import logging as hf_logging

    if enabled:
        datasets.enable_progress_bars()
        hf_logging.enable_progress_bar()
    else:
        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()
