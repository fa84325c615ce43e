"""Tasks: what the model predicts, its loss and its metrics. One file per task."""

from framework.tasks.base import Task
from framework.tasks.causal_lm import CausalLM
from framework.tasks.classification import Classification
from framework.tasks.seq2seq import Seq2SeqLM

__all__ = ["Task", "Classification", "CausalLM", "Seq2SeqLM"]
