"""Whether this machine can send runs to Weights & Biases (an API key in the environment or
``~/.netrc``); without one, fw writes W&B runs offline (``fw fit`` and ``fw bench``)."""

from __future__ import annotations

import netrc
import os


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
