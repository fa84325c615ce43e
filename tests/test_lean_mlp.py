"""The lean SwiGLU MLP (model.lean_mlp): bitwise the same forward and gradients as
transformers' own MLP, one inner-width tensor per layer less saved for backward (two with
LoRA on down_proj, whose input it recomputes), and only SwiGLU MLPs changed."""

from __future__ import annotations

import torch
from conftest import TINY_BERT, TINY_LLAMA, TOKENIZER, padded_ids

from framework.lean_mlp import SwiGLU, lean_gated_mlps

LORA_ALL = {"class_path": "lora", "init_args": {"r": 4, "targets": ["all-linear"], "dropout": 0.1}}


def lm(lean: bool, method: dict | None = LORA_ALL) -> dict:
    return {"backbone": {"config": TINY_LLAMA, "tokenizer": TOKENIZER}, "task": {"class_path": "CausalLM"},
            "method": method, "lean_mlp": lean}


def saved_bytes(loss_fn) -> int:
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return sum(saved.values())


def test_swiglu_function_is_bitwise_the_plain_ops():
    gate = torch.randn(4, 7, 16, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 7, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLU.apply, (gate, up))
    gate, up = gate.float().detach().requires_grad_(), up.float().detach().requires_grad_()
    grad = torch.randn(4, 7, 16)
    plain = torch.nn.functional.silu(gate) * up
    plain_grads = torch.autograd.grad(plain, (gate, up), grad)
    lean = SwiGLU.apply(gate, up)
    lean_grads = torch.autograd.grad(lean, (gate, up), grad)
    assert torch.equal(plain, lean)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, lean_grads))


def test_llama_training_step_is_bitwise_equal_and_saves_one_inner_tensor_less(build):
    plain, lean = build(lm(False)), build(lm(True))
    assert lean_gated_mlps(plain.model) == TINY_LLAMA["num_hidden_layers"]  # what lean_mlp: true did
    plain.model.load_state_dict(lean.model.state_dict())
    for layer in plain.model.model.layers:
        del layer.mlp.forward  # back to transformers' forward for the reference
    ids = padded_ids(batch=3, length=9)
    batch = {**ids, "labels": ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)}
    losses, grads, nbytes = [], [], []
    for module in (plain, lean):
        torch.manual_seed(7)  # the same LoRA dropout masks
        nbytes.append(saved_bytes(lambda m=module: m.task.step(m.model, batch)[0]))
        torch.manual_seed(7)
        module.model.zero_grad()
        loss = module.task.step(module.model, batch)[0]
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad})
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    inner = 3 * 9 * TINY_LLAMA["intermediate_size"] * 4  # one inner-width tensor of one layer, float32
    # per layer: silu(gate(x)), and down_proj's LoRA input silu(gate(x)) * up(x) (recomputed from
    # gate(x) and up(x), which the lean MLP keeps anyway)
    assert nbytes[0] - nbytes[1] == TINY_LLAMA["num_hidden_layers"] * 2 * inner


def test_only_swiglu_mlps_change_and_the_switch_turns_it_off(build):
    assert lean_gated_mlps(build({"backbone": {"config": TINY_BERT, "tokenizer": TOKENIZER}}).model) == 0
    off = build(lm(False, method=None))
    assert all("forward" not in layer.mlp.__dict__ for layer in off.model.model.layers)
    on = build(lm(True, method=None))
    assert all("forward" in layer.mlp.__dict__ for layer in on.model.model.layers)
    assert lean_gated_mlps(on.model) == 0  # already lean: not wrapped twice
