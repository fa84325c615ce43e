"""The `fw` command: methods, inspect, --print_config, the run summary, and validate/test/
predict reproducing a fit's metrics from its adapter checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT, TOKENIZER, write_recipe
from helpers import tiny_recipe

from framework.cli import main


def test_methods_lists_registered_name_package_and_description(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("lora "))
    assert line.split()[:2] == ["lora", "fw"] and "low-rank" in line
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"name": "lora", "package": "fw", "class_path": "fw_lora.LoRA"}.items() <= next(r for r in rows if r["name"] == "lora").items()


def test_inspect_prints_tree_and_counts_without_data(tmp_path, capsys):
    recipe = {"model": {"backbone": {"config": {"model_type": "bert"}}, "method": {"class_path": "lora", "init_args": {"r": 8}}},
              "data": {"class_path": "ClassificationData", "init_args": {"data_files": {"train": "does/not/exist.csv"}}}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["inspect", "--config", path, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method_params"] == 294_912 and report["stored_params"] == 294_912
    assert report["trainable_params"] == 294_912 + 768 * 2 + 2
    assert report["total_params"] == report["backbone_params"] + 294_912
    assert len(report["modified_modules"]) == 24 + 1  # 12 x (query, value) + the classifier head
    assert report["modified_modules"]["bert.encoder.layer.0.attention.self.query"].startswith("LoRA r=8")
    assert main(["inspect", "--config", path, "--model.method.init_args.r", "4"]) == 0
    text = capsys.readouterr().out
    assert "0-11 (BertLayer) x12" in text and "query (LoRALinear)" in text and "147,456" in text


def test_print_config_shows_every_default(tmp_path, capsys, sentiment_csv):
    recipe = tiny_recipe(tmp_path, sentiment_csv)
    recipe["model"]["method"] = {"class_path": "lora"}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", path, "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for expected in ("class_path: fw_lora.LoRA", "r: 8", "alpha: 16.0", "dropout: 0.0", "rslora: false",
                     "targets: null", "learning_rate: 0.01", "warmup_ratio: 0.06", "max_length: 128",
                     "dtype: float32", "test_after_fit: true"):
        assert expected in out, expected


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_fit_then_validate_test_predict_reproduce_the_metrics(tmp_path, sentiment_csv, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, sentiment_csv))
    assert main(["fit", "--config", path]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters" in out and "peak memory" in out and "training time" in out
    fit_dir = tmp_path / "runs" / "tiny" / "version_0"
    fitted = _summary(fit_dir)
    assert fitted["metrics"]["test/accuracy"] > 0.8  # the synthetic task is learnable
    assert fitted["params"]["method_params"] == 2 * 2 * 8 * (64 + 64)
    assert fitted["train_steps"] == 10 * 16 and fitted["peak_memory_bytes"] > 0
    ckpt = fit_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    assert main(["test", "--config", path, "--ckpt_path", str(ckpt)]) == 0
    tested = _summary(tmp_path / "runs" / "tiny" / "version_1")
    for key in ("test/accuracy", "test/f1_macro", "test/loss"):
        assert tested["metrics"][key] == pytest.approx(fitted["metrics"][key], abs=1e-6), key

    assert main(["validate", "--config", path, "--ckpt_path", str(ckpt)]) == 0
    validated = _summary(tmp_path / "runs" / "tiny" / "version_2")
    for key in ("val/accuracy", "val/f1_macro"):
        assert validated["metrics"][key] == pytest.approx(fitted["metrics"][key], abs=1e-6), key

    capsys.readouterr()
    assert main(["predict", "--config", path, "--ckpt_path", str(ckpt)]) == 0
    records = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "version_3" / "predictions.jsonl").open()]
    assert len(records) == 64 and {"text", "label", "prediction", "probabilities"} <= set(records[0])
    accuracy = sum(r["label"] == r["prediction"] for r in records) / len(records)
    assert accuracy == pytest.approx(fitted["metrics"]["test/accuracy"], abs=1e-6)
    assert f"accuracy against the labels: {accuracy:.4f}" in capsys.readouterr().out

    # the fit left its adapter in fw's format; it evaluates as the checkpoint does, and so does
    # its PEFT export read back (fw -> PEFT -> fw)
    adapter = fit_dir / "adapter"
    assert fitted["adapter_dir"] == str(adapter) and (adapter / "adapter.safetensors").is_file()
    assert main(["test", "--config", path, "--adapter", str(adapter)]) == 0
    assert main(["export", "--config", path, "--adapter", str(adapter), "--format", "peft", "--output", str(tmp_path / "peft")]) == 0
    assert main(["test", "--config", path, "--adapter", str(tmp_path / "peft")]) == 0
    for version in (4, 5):
        tested = _summary(tmp_path / "runs" / "tiny" / f"version_{version}")
        for key in ("test/accuracy", "test/f1_macro", "test/loss"):
            assert tested["metrics"][key] == pytest.approx(fitted["metrics"][key], abs=1e-6), (version, key)


def test_a_checkpoint_of_other_settings_is_refused_unless_adopted(tmp_path, sentiment_csv, capsys):
    """The recipe is the authority: another rank is one line naming the field;
    --ckpt_settings adopt rebuilds what was trained (saying so)."""
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, sentiment_csv))
    assert main(["fit", "--config", path, "--trainer.max_epochs", "1"]) == 0
    ckpt = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert main(["test", "--config", path, "--model.method.init_args.r", "4", "--ckpt_path", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "--ckpt_path: the checkpoint was trained with other settings than the recipe's: " in err
    assert "model.method.init_args.r: recipe 4, checkpoint 8" in err and "Traceback" not in err
    assert main(["test", "--config", path, "--model.method.init_args.r", "4", "--ckpt_path", str(ckpt),
                 "--ckpt_settings", "adopt"]) == 0
    assert "the model's backbone, method, task, train_head are the checkpoint's" in capsys.readouterr().out
    summary = _summary(tmp_path / "runs" / "tiny" / "version_2")
    assert summary["params"]["method_params"] == 2 * 2 * 8 * 128


def test_a_random_init_backbone_keeps_its_seed_in_the_checkpoint(tmp_path, sentiment_csv):
    """Evaluated under another seed_everything, a checkpoint still sees its own random backbone."""
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, sentiment_csv))
    assert main(["fit", "--config", path, "--trainer.max_epochs", "1"]) == 0
    fitted = _summary(tmp_path / "runs" / "tiny" / "version_0")
    ckpt = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["backbone"]["seed"] == 0
    adapter = tmp_path / "runs" / "tiny" / "version_0" / "adapter"
    for source in (["--ckpt_path", str(ckpt)], ["--adapter", str(adapter)]):
        assert main(["test", "--config", path, "--seed_everything", "123", *source]) == 0
    for version in (1, 2):
        tested = _summary(tmp_path / "runs" / "tiny" / f"version_{version}")
        assert tested["metrics"]["test/loss"] == pytest.approx(fitted["metrics"]["test/loss"], abs=1e-6)


# -- bad recipes fail before training, naming the field ------------------------------------


def _fails(argv: list[str], capsys) -> str:
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    captured = capsys.readouterr()
    assert "Epoch" not in captured.out + captured.err
    return captured.err


def test_unknown_method_lists_the_installed_ones(tmp_path, sentiment_csv, capsys):
    recipe = tiny_recipe(tmp_path, sentiment_csv)
    recipe["model"]["method"]["class_path"] = "lorra"
    err = _fails(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)], capsys)
    assert "model.method: unknown method 'lorra'; installed methods: " in err and "lora" in err
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, sentiment_csv))
    err = _fails(["fit", "--config", path, "--model.method", "lorra"], capsys)
    assert "unknown method 'lorra'" in err


def test_target_pattern_matching_nothing_lists_existing_modules(tmp_path, sentiment_csv, capsys):
    recipe = tiny_recipe(tmp_path, sentiment_csv)
    recipe["model"]["method"]["init_args"]["targets"] = ["quary"]
    err = _fails(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)], capsys)
    assert "model.method.init_args.targets: pattern 'quary' matches no" in err
    assert "bert.encoder.layer.*.attention.self.query" in err


def test_non_positive_rank_names_the_field(tmp_path, sentiment_csv, capsys):
    recipe = tiny_recipe(tmp_path, sentiment_csv)
    recipe["model"]["method"]["init_args"]["r"] = 0
    err = _fails(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)], capsys)
    assert "model.method.init_args.r: expected a positive integer rank, got 0" in err


def test_missing_data_file_names_the_field(tmp_path, sentiment_csv, capsys):
    files = {**sentiment_csv, "validation": str(tmp_path / "missing.csv")}
    err = _fails(["fit", "--config", write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, files))], capsys)
    assert f"data.data_files.validation: missing data file '{tmp_path / 'missing.csv'}'" in err


def test_too_few_labels_names_the_field(tmp_path, capsys):
    rows = "text,label\n" + "".join(f"t {i},{i % 3}\n" for i in range(30))
    (tmp_path / "d.csv").write_text(rows)
    files = {s: str(tmp_path / "d.csv") for s in ("train", "validation", "test")}
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, files))
    assert "model.task.num_labels: the data has 3 classes" in _fails(["fit", "--config", path], capsys)


def test_torch_checkpoint_is_plain_data(tmp_path, sentiment_csv):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, sentiment_csv))
    assert main(["fit", "--config", path, "--trainer.max_epochs", "1", "--test_after_fit", "false"]) == 0
    ckpt = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    torch.load(ckpt, weights_only=True)  # no pickled objects: hyper-parameters are plain config


def test_causal_lm_fit_and_predict_generate_text(tmp_path, instruction_jsonl):
    from conftest import TINY_LLAMA

    recipe = tiny_recipe(tmp_path, instruction_jsonl)
    recipe["trainer"].update(max_epochs=3, limit_predict_batches=1)
    recipe["model"].update(backbone={"config": TINY_LLAMA, "tokenizer": TOKENIZER},
                           task={"class_path": "CausalLM", "init_args": {"max_new_tokens": 6}})
    recipe["model"]["method"]["init_args"]["targets"] = ["all-linear"]
    recipe["data"] = {"class_path": "InstructionData", "init_args": {"data_files": instruction_jsonl, "batch_size": 8, "max_length": 48}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["fit", "--config", path]) == 0
    fitted = _summary(tmp_path / "runs" / "tiny" / "version_0")
    assert fitted["metrics"]["test/perplexity"] < 100  # from ~30,000 (uniform over the vocabulary)
    ckpt = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert main(["predict", "--config", path, "--ckpt_path", str(ckpt)]) == 0
    records = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "version_1" / "predictions.jsonl").open()]
    assert len(records) == 8 and all(r["generated"] for r in records)
    assert {r["reference"] for r in records} <= {"yes it is good", "no it is bad"}
    # the tuned model learned the answer format: every generation starts with yes or no
    assert all(r["generated"].split()[0] in ("yes", "no") for r in records), records


def test_a_checkpoint_from_before_a_method_argument_existed_loads_when_the_recipe_keeps_its_default(build):
    """A LoRA checkpoint without ``init`` (written before LoRA had it) is the recipe's
    ``init: kaiming``; a recipe asking for another init is still refused, naming the field."""
    import copy

    from framework.formats.fw import AdapterError

    def older(module) -> dict:
        hparams = copy.deepcopy(dict(module.hparams))
        for name in ("init", "pissa_niter", "loraplus_lr_ratio"):
            del hparams["method"]["init_args"][name]
        return {"hyper_parameters": hparams}

    recipe = {"backbone": {"config": TINY_BERT, "tokenizer": TOKENIZER}, "method": {"class_path": "lora"}}
    module = build(recipe)
    module.on_load_checkpoint(older(module))  # no error: every missing argument is at its default
    other = build({**recipe, "method": {"class_path": "lora", "init_args": {"init": "gaussian"}}})
    with pytest.raises(AdapterError, match="model.method.init_args.init: recipe 'gaussian', checkpoint None"):
        other.on_load_checkpoint(older(module))
    assert "init" in dict(module.hparams)["method"]["init_args"]  # the test removed it from a copy only
