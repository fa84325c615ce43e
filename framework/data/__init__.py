"""DataModules over Hugging Face ``datasets``: local files, hub ids or packaged corpora."""

from framework.data.classification import ClassificationData
from framework.data.instruction import InstructionData
from framework.data.seq2seq import Seq2SeqData
from framework.data.text import TextDataModule

__all__ = ["TextDataModule", "ClassificationData", "InstructionData", "Seq2SeqData"]
