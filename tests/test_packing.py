"""Padding-free packing of causal-LM training batches (InstructionData ``pack``): one row, no
padding, ``position_ids`` restarting per example, the same per-example losses as padding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_LLAMA, TOKENIZER, lora_recipe, write_recipe
from helpers import perturb, tiny_recipe

from framework.cli import main
from framework.data import InstructionData
from framework.errors import FieldError
from framework.lean_attention import NAME as LEAN_SDPA


def _module(build, attention: str | None = None, **task_args):
    recipe = {**lora_recipe(TINY_LLAMA, targets=["all-linear"]), "task": {"class_path": "CausalLM", "init_args": task_args}}
    if attention:
        recipe["backbone"]["attn_implementation"] = attention
    module = build(recipe)
    # the default: transformers' sdpa, or fw's grouped-query form of it (TINY_LLAMA has GQA)
    assert module.model.config._attn_implementation == (attention or LEAN_SDPA)
    perturb(module)  # LoRA's B starts at zero: move the adapters so they matter
    module.model.eval()
    return module


def _rows(files: dict[str, str], tokenizer, n: int = 5) -> tuple[InstructionData, list[dict]]:
    data = InstructionData(data_files=files, batch_size=n, max_length=48, pack=True)
    data.tokenizer = tokenizer
    data.setup()
    # the prompts cut by 0, 3, 6, ... tokens from the front: examples of different lengths
    rows = [data.encoded["train"][i] for i in range(n)]
    return data, [{**r, "input_ids": r["input_ids"][3 * i :], "labels": r["labels"][3 * i :]} for i, r in enumerate(rows)]


def _token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-position NLL of the next token (0 where the label is -100), shape (B, T-1)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")


def test_packed_batch_is_one_row_without_padding(instruction_jsonl, build):
    module = _module(build)
    data, rows = _rows(instruction_jsonl, module.tokenizer)
    batch = data.collate("train", rows)
    lengths = [len(r["input_ids"]) for r in rows]
    assert len(set(lengths)) == len(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["input_ids"][0].tolist() == [t for r in rows for t in r["input_ids"]]  # no pad token added
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    assert (batch["labels"][0, starts] == -100).all()
    # validation and predict batches stay padded
    assert data.collate("validation", rows)["input_ids"].shape == (len(rows), max(lengths))
    assert "prompt_input_ids" in data.collate("predict", rows)


def test_empty_prompt_first_label_masked():
    """Even an example whose first token is labelled (no prompt) is not predicted from the
    previous example's last position."""
    from framework.data.instruction import packed

    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = packed(rows)
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert rows[0]["labels"] == [5, 6, 7]  # the encoded rows are not modified


def test_packed_losses_equal_alone_and_padded(instruction_jsonl, build):
    module = _module(build)
    data, rows = _rows(instruction_jsonl, module.tokenizer)
    model = module.model
    packed_losses = _token_losses(model, data.collate("train", rows))[0]
    padded_losses = _token_losses(model, data.collate("validation", rows))
    start = 0
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        alone = _token_losses(model, data.collate("validation", [r]))[0].sum()
        in_pack = packed_losses[start : start + n - 1].sum()  # its positions but the last (predicts the next example's -100)
        assert packed_losses[start + n - 1] == 0 if i < len(rows) - 1 else True
        torch.testing.assert_close(in_pack, alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded_losses[i].sum(), alone, rtol=1e-5, atol=1e-5)
        start += n


@pytest.mark.parametrize(("chunked", "attention"), [(True, None), (False, None), (True, "eager")])
def test_task_step_packed_equals_padded(instruction_jsonl, build, chunked, attention):
    """CausalLM.step forwards position_ids: same summed loss and token count as padding (sdpa,
    transformers' default here, and eager, chosen by model.backbone.attn_implementation)."""
    module = _module(build, attention, chunked_loss=chunked)
    data, rows = _rows(instruction_jsonl, module.tokenizer)
    with torch.no_grad():
        loss_p, (_, tokens_p) = module.task.step(module.model, data.collate("train", rows))
        loss_d, (_, tokens_d) = module.task.step(module.model, data.collate("validation", rows))
    assert tokens_p == tokens_d
    torch.testing.assert_close(loss_p * tokens_p, loss_d * tokens_d, rtol=1e-5, atol=1e-5)


def test_pack_refusals(instruction_jsonl, build):
    data = InstructionData(data_files=instruction_jsonl, pack=True)
    module = _module(build)
    data.check_packing(module.model, module.method)  # Llama + LoRA: fine
    for method in (SimpleNamespace(num_virtual_tokens=20), SimpleNamespace(prefix_length=30),
                   SimpleNamespace(methods=[SimpleNamespace(r=8), SimpleNamespace(prefix_length=10)])):
        with pytest.raises(FieldError, match=r"^data\.pack: .*prepends virtual positions"):
            data.check_packing(module.model, method)
    with pytest.raises(FieldError, match=r"^data\.pack: .*create_causal_mask"):
        data.check_packing(torch.nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match=r"^data\.pack: expected true or false"):
        InstructionData(data_files=instruction_jsonl, pack="yes")
    InstructionData(data_files=instruction_jsonl).check_packing(torch.nn.Linear(2, 2), None)  # off: no check


def test_pack_refuses_prompt_tuning_at_setup(tmp_path, instruction_jsonl, capsys):
    recipe = _fit_recipe(tmp_path, instruction_jsonl)
    recipe["model"]["method"] = {"class_path": "prompt", "init_args": {"num_virtual_tokens": 4}}
    assert main(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)]) != 0
    assert "data.pack: PromptTuning prepends virtual positions" in capsys.readouterr().err


def _fit_recipe(tmp_path, files: dict[str, str]) -> dict:
    recipe = tiny_recipe(tmp_path, files)
    recipe["trainer"].update(max_epochs=1, limit_train_batches=4, limit_val_batches=2, limit_test_batches=1)
    recipe["model"].update(backbone={"config": TINY_LLAMA, "tokenizer": TOKENIZER}, task={"class_path": "CausalLM"})
    recipe["model"]["method"]["init_args"]["targets"] = ["all-linear"]
    recipe["data"] = {"class_path": "InstructionData",
                      "init_args": {"data_files": files, "batch_size": 8, "max_length": 48, "pack": True}}
    return recipe


def test_fit_with_packing(tmp_path, instruction_jsonl):
    assert main(["fit", "--config", write_recipe(tmp_path / "r.yaml", _fit_recipe(tmp_path, instruction_jsonl))]) == 0
