"""Loading weights from outside the run: ``--adapter`` refuses an adapter of another method,
task or backbone with one line naming both; no checkpoint or adapter is ever unpickled."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT, TOKENIZER, write_recipe
from helpers import tiny_recipe, trained_module

from framework.cli import main
from framework.formats.fw import write_fw_adapter
from framework.formats.peft import write_peft_adapter
from framework.strategies import FSDP


def _adapter(tmp_path: Path, name: str, method: dict, backbone: dict | None = None, fmt: str = "fw") -> str:
    module = trained_module({"backbone": backbone or {"config": TINY_BERT, "tokenizer": TOKENIZER}, "method": method})
    (write_fw_adapter if fmt == "fw" else write_peft_adapter)(module, tmp_path / name)
    return str(tmp_path / name)


def _error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fw: error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_an_adapter_of_another_method_task_or_backbone_names_both(tmp_path, sentiment_csv, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, sentiment_csv))  # LoRA on TINY_BERT
    ia3_fw = _adapter(tmp_path, "ia3", {"class_path": "ia3"})
    ia3_peft = _adapter(tmp_path, "ia3-peft", {"class_path": "ia3"}, fmt="peft")
    narrow = _adapter(tmp_path, "narrow", {"class_path": "lora"}, {"config": {**TINY_BERT, "hidden_size": 32}, "tokenizer": TOKENIZER})
    three = tiny_recipe(tmp_path, sentiment_csv, task={"class_path": "Classification", "init_args": {"num_labels": 3}})
    three_path = write_recipe(tmp_path / "three.yaml", three)
    lora = _adapter(tmp_path, "lora", {"class_path": "lora", "init_args": {"r": 8}})
    cases = [
        (["test", "--config", path, "--adapter", ia3_fw],
         "holds fw_ia3.method.IA3 weights but the recipe's model.method is fw_lora.method.LoRA"),
        (["test", "--config", path, "--adapter", ia3_peft], "is PEFT's IA3 but the recipe's model.method is fw_lora.method.LoRA"),
        (["test", "--config", path, "--adapter", narrow], "hidden_size=32) but the recipe's backbone config"),
        (["validate", "--config", three_path, "--adapter", lora], "(num_labels differ)"),
        (["test", "--config", path, "--adapter", str(tmp_path / "nowhere")], "no such adapter folder or checkpoint file"),
        (["test", "--config", path, "--adapter", str(tmp_path)], "neither an fw adapter (adapter.json) nor a PEFT adapter"),
        (["fit", "--config", path, "--adapter", lora], "--adapter: fit starts from the recipe's fresh method"),
        (["test", "--config", path, "--adapter", lora, "--weights_only", "false"], "--weights_only false: fw never unpickles"),
    ]
    for argv, expected in cases:
        assert expected in _error(argv, capsys), argv


class RunsCode:
    """A pickle payload: unpickling it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_whose_unpickling_runs_code_is_refused_everywhere(tmp_path, sentiment_csv, capsys):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "fw": {"method": None}, "payload": RunsCode(marker)}, evil)
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, sentiment_csv))
    for argv in (["test", "--config", path, "--ckpt_path", str(evil)],
                 ["fit", "--config", path, "--ckpt_path", str(evil)],
                 ["test", "--config", path, "--adapter", str(evil)],
                 ["export", "--config", path, "--ckpt_path", str(evil), "--format", "fw", "--output", str(tmp_path / "o")]):
        assert "pickled objects" in _error(argv, capsys), argv
    with pytest.raises(pickle.UnpicklingError):
        FSDP().load_checkpoint(evil)  # the sharded strategy's own loader (`--ckpt_path last` goes there)
    assert not marker.exists()
