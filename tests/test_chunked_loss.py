"""The chunked causal-LM loss (framework/tasks/lm_loss.py): the head applied to labelled
positions only, the cross-entropy chunk by chunk. Same loss and gradients as the standard
path, with LoRA and with the methods that prepend virtual positions (prompt, prefix)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import TINY_BART, TINY_GPT2, TINY_LLAMA, TINY_T5, TOKENIZER
from torch import nn

from framework.tasks.causal_lm import CausalLM
from framework.tasks.lm_loss import ChunkedCrossEntropy, chunked_lm_loss, headless, lm_head_of

RTOL = 1e-5

METHODS: dict[str, dict[str, Any]] = {
    "lora": {"class_path": "lora", "init_args": {"r": 4}},
    "prompt": {"class_path": "prompt", "init_args": {"num_virtual_tokens": 4}},
    "prefix": {"class_path": "prefix", "init_args": {"prefix_length": 4, "bottleneck": 16}},
}


def recipe(backbone: dict[str, Any], method: str, chunk: int = 5, **model: Any) -> dict[str, Any]:
    task = "Seq2SeqLM" if backbone["model_type"] in ("t5", "bart") else "CausalLM"
    return {
        "backbone": {"config": backbone, "tokenizer": TOKENIZER},
        "method": METHODS[method],
        "task": {"class_path": task, "init_args": {"loss_chunk_size": chunk}},
        **model,
    }


def sft_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three right-padded prompt/response pairs: prompt and padding labelled -100."""
    g = torch.Generator().manual_seed(seed)
    lengths, prompts = [12, 9, 6], [5, 4, 2]
    ids = torch.zeros(3, 12, dtype=torch.long)
    labels = torch.full((3, 12), -100)
    for i, (n, p) in enumerate(zip(lengths, prompts)):
        ids[i, :n] = torch.randint(1000, 2000, (n,), generator=g)
        labels[i, p:n] = ids[i, p:n]
    return {"input_ids": ids, "attention_mask": (torch.arange(12) < torch.tensor(lengths)[:, None]).long(),
            "labels": labels}


def seq2seq_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three right-padded source/target pairs: target padding labelled -100."""
    batch = sft_batch(seed)
    labels = torch.randint(1000, 2000, (3, 7), generator=torch.Generator().manual_seed(seed + 1))
    labels[1, 5:] = labels[2, 3:] = -100
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def loss_and_grads(module, batch: dict[str, torch.Tensor], chunked: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.task.chunked_loss = chunked
    module.model.zero_grad(set_to_none=True)
    loss, _ = module.task.step(module.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    scale = b.abs().max().clamp_min(1e-12)
    assert float((a - b).abs().max() / scale) <= rtol


@pytest.fixture
def trained(build):
    def _trained(backbone: dict[str, Any], method: str, chunk: int = 5, **model: Any):
        module = build(recipe(backbone, method, chunk, **model), seed=1).eval()  # eval: GPT-2's dropout off
        with torch.no_grad():  # trainable parameters off their (possibly zero) initialisation
            for p in module.model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        return module
    return _trained


def assert_chunked_equals_standard(module, batch: dict[str, torch.Tensor]) -> None:
    """The chunked path's loss and every trainable gradient equal the standard path's (RTOL)."""
    loss, grads = loss_and_grads(module, batch, chunked=True)
    ref_loss, ref_grads = loss_and_grads(module, batch, chunked=False)
    assert torch.isfinite(ref_loss)
    assert_close(loss, ref_loss, RTOL)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert_close(grads[name], ref_grads[name], RTOL), name


@pytest.mark.parametrize(("backbone", "method", "train_head"), [
    (TINY_LLAMA, "lora", False), (TINY_GPT2, "lora", False), (TINY_LLAMA, "prompt", False),
    (TINY_LLAMA, "prefix", False), (TINY_LLAMA, "lora", True),
], ids=["llama-lora", "gpt2-lora", "llama-prompt", "llama-prefix", "llama-lora-trained-head"])
def test_chunked_loss_and_gradients_equal_the_standard_path(trained, backbone, method, train_head):
    module = trained(backbone, method, train_head=train_head)
    assert module.model.get_output_embeddings().weight.requires_grad == train_head
    assert lm_head_of(module.model).linear is module.model.get_output_embeddings()
    assert_chunked_equals_standard(module, sft_batch())
    assert type(module.model.get_output_embeddings()) is nn.Linear  # the head is back


@pytest.mark.parametrize(("backbone", "method"), [
    (TINY_T5, "lora"), (TINY_BART, "lora"), (TINY_BART, "prompt"),
], ids=["t5-lora", "bart-lora", "bart-prompt"])
def test_seq2seq_chunked_loss_and_gradients_equal_the_standard_path(trained, backbone, method):
    module = trained(backbone, method)
    head = lm_head_of(module.model)
    assert head is not None and (head.bias_owner is not None) == (backbone is TINY_BART)
    if head.bias_owner is not None:  # a non-zero final_logits_bias, so that folding it in is tested
        head.bias_owner.final_logits_bias.normal_()
    assert_chunked_equals_standard(module, seq2seq_batch())
    if head.bias_owner is not None:
        assert head.bias_owner.final_logits_bias.abs().sum() > 0  # the bias is back


def test_evaluation_loss_is_the_same(trained):
    module = trained(TINY_LLAMA, "prompt", chunk=1024)
    batch = sft_batch(seed=3)
    with torch.no_grad():
        module.task.chunked_loss = True
        loss, (_, tokens) = module.task.step(module.model, batch)
        module.task.chunked_loss = False
        ref, (_, ref_tokens) = module.task.step(module.model, batch)
    assert_close(loss, ref, RTOL)
    assert tokens == ref_tokens == 16  # (12-5) + (9-4) + (6-2) response tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_the_function_matches_cross_entropy_with_weight_and_bias_gradients(dtype, chunk):
    torch.manual_seed(0)
    head = nn.Linear(16, 50).to(dtype)
    hidden = (torch.randn(2, 9, 16) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = labels[1, 7:] = -100

    def run(chunked: bool) -> list[torch.Tensor]:
        head.zero_grad(set_to_none=True)
        hidden.grad = None
        if chunked:
            loss = chunked_lm_loss(hidden, labels, head.weight, head.bias, chunk)
        else:
            loss = nn.functional.cross_entropy(head(hidden).flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        loss.backward()
        return [loss.detach(), hidden.grad, head.weight.grad, head.bias.grad]

    # bf16: only the rounding of the gradients to bf16 differs (the chunked path accumulates
    # the head's gradient in float32): measured up to 6e-3 of the largest entry (bf16's spacing
    # is 2^-7 = 7.8e-3)
    for got, want in zip(run(True), run(False)):
        assert_close(got.float(), want.float(), RTOL if dtype == torch.float32 else 1e-2)


def test_no_labelled_position_gives_nan_as_the_standard_path():
    head = nn.Linear(8, 20)
    loss = chunked_lm_loss(torch.randn(2, 3, 8), torch.full((2, 3), -100), head.weight, head.bias, 4)
    assert torch.isnan(loss)


def test_function_gradcheck():
    torch.manual_seed(0)
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (5,))
    assert torch.autograd.gradcheck(lambda h, w, b: ChunkedCrossEntropy.apply(h, w, b, t, 2), (h, w, b))


def test_heads_the_loss_cannot_apply_take_the_standard_path(build):
    module = build({"backbone": {"config": TINY_LLAMA, "tokenizer": TOKENIZER}, "task": {"class_path": "CausalLM"}})
    model = module.model
    assert lm_head_of(model) is not None
    model.config.logit_scale = 0.5  # a logit transform after the head (Cohere)
    assert lm_head_of(model) is None
    model.config.logit_scale = None
    head = model.get_output_embeddings()
    model.set_output_embeddings(nn.Sequential(head))  # not a plain Linear (e.g. an adapter on it)
    assert lm_head_of(model) is None
    model.set_output_embeddings(head)
    handle = head.register_forward_hook(lambda *args: None)  # a hook that must see the logits
    assert lm_head_of(model) is None
    handle.remove()
    model.config.model_type = "gemma2"  # softcapping: not a known plain head
    assert lm_head_of(model) is None


def test_headless_restores_the_head_on_error(build):
    module = build({"backbone": {"config": TINY_LLAMA, "tokenizer": TOKENIZER}, "task": {"class_path": "CausalLM"}})
    head = module.model.get_output_embeddings()
    with pytest.raises(RuntimeError), headless(module.model, lm_head_of(module.model)):
        raise RuntimeError
    assert module.model.get_output_embeddings() is head


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"loss_chunk_size": 0}, "model.task.loss_chunk_size"),
    ({"loss_chunk_size": 2.5}, "model.task.loss_chunk_size"),
    ({"chunked_loss": "yes"}, "model.task.chunked_loss"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CausalLM(**kwargs)
