"""LoRA's branch as one autograd Function (fw_lora.branch): the plain ops' outputs, gradients
and random stream, with less saved for backward."""

from __future__ import annotations

from collections.abc import Callable
from unittest.mock import patch

import pytest
import torch
from fw_lora import LoRALinear
from fw_lora import layer as lora_layer
from fw_lora.branch import LoRABranch, plain_lora_branch
from fw_unipelt.gated import GatedLoRALinear
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

IN, OUT, R = 24, 20, 4
Forward = Callable[[LoRALinear, torch.Tensor], torch.Tensor]


def plain_update(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The branch as plain ops (fw's layer before the Function), the reference."""
    a = layer.lora_A
    h = F.linear(layer.lora_dropout(x).to(a.dtype), a) * layer.scaling
    return F.linear(h, layer.lora_B)


def plain_forward(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    out = layer.base_layer(x)
    if layer.merged:
        return out
    update = plain_update(layer, x)
    if isinstance(layer, GatedLoRALinear):
        update = update * layer.gate(x)
    return out + update.to(out.dtype)


def make_layer(cls: type[LoRALinear] = LoRALinear, dropout: float = 0.1, conv1d: bool = False,
               base_dtype: torch.dtype = torch.float32, dtype: torch.dtype | None = None) -> LoRALinear:
    torch.manual_seed(0)
    base = Conv1D(OUT, IN) if conv1d else nn.Linear(IN, OUT)
    nn.init.normal_(base.weight)
    base = base.to(base_dtype).requires_grad_(False)
    layer = cls(base, r=R, alpha=8, dropout=dropout, dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero: give the update (and A's gradient) values
    return layer


def run(forward: Forward, layer: LoRALinear, x: torch.Tensor, seed: int = 1) -> dict[str, torch.Tensor]:
    """Output, gradients and the random state after forward and backward, from ``seed``."""
    for p in layer.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    torch.manual_seed(seed)
    out = forward(layer, x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weights).sum().backward()
    result = {"out": out.detach(), "x": x.grad, "rng": torch.get_rng_state()}
    result |= {name: p.grad for name, p in layer.named_parameters() if p.grad is not None}
    return result


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if k != "rng")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert torch.equal(a["rng"], b["rng"]), "the global random stream moved differently"
    assert max_difference(a, b) <= atol


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_equal_to_the_plain_ops(dropout, train, conv1d):
    layer = make_layer(dropout=dropout, conv1d=conv1d).train(train)
    x = torch.randn(3, 5, IN)
    new, old = run(LoRALinear.forward, layer, x), run(plain_forward, layer, x)
    assert_same(new, old, atol=0.0)  # the same ops in the same order: bit for bit
    assert set(new) == {"out", "x", "rng", "lora_A", "lora_B"}


def test_float32_adapters_on_a_bfloat16_base():
    layer = make_layer(base_dtype=torch.bfloat16, dtype=torch.float32).train()
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(2, 7, IN, dtype=torch.bfloat16)
    new, old = run(LoRALinear.forward, layer, x), run(plain_forward, layer, x)
    assert new["out"].dtype == new["x"].dtype == torch.bfloat16
    assert new["lora_A"].dtype == torch.float32
    assert_same(new, old, atol=0.0)


def test_under_cpu_autocast():
    layer = make_layer().train()
    x = torch.randn(2, 7, IN)

    def autocast(forward: Forward) -> Forward:
        def run_autocast(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return forward(layer, x)
        return run_autocast

    new, old = run(autocast(LoRALinear.forward), layer, x), run(autocast(plain_forward), layer, x)
    assert new["out"].dtype == torch.bfloat16 and new["lora_A"].dtype == torch.float32
    assert_same(new, old, atol=0.0)


def test_forward_mask_is_the_backward_mask_and_the_stream_is_left_alone():
    layer = make_layer(dropout=0.5).train()
    with torch.no_grad():
        layer.base_layer.weight.zero_()
    x = torch.randn(4, IN, requires_grad=True)
    torch.manual_seed(3)
    out = layer(x)
    before = torch.get_rng_state()
    out.sum().backward()
    assert torch.equal(torch.get_rng_state(), before), "backward consumed random numbers"
    # the input gradient is zero exactly where the forward dropped x (A's gradient sees the same)
    torch.manual_seed(3)
    kept = F.dropout(torch.ones_like(x), 0.5) != 0
    assert 0 < kept.sum() < kept.numel()
    assert torch.equal(x.grad != 0, kept)
    expected_a = ((torch.ones_like(out) @ layer.lora_B) * layer.scaling).T @ (x * kept * 2)
    torch.testing.assert_close(layer.lora_A.grad, expected_a, rtol=1e-6, atol=1e-6)


def test_under_activation_checkpointing():
    from torch.utils.checkpoint import checkpoint

    layer = make_layer(dropout=0.3).train()
    x = torch.randn(3, 5, IN)

    def checkpointed(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(LoRALinear.forward, layer, x, use_reentrant=False)

    assert_same(run(checkpointed, layer, x), run(plain_forward, layer, x), atol=0.0)


def test_deterministic_per_seed():
    layer = make_layer(dropout=0.3).train()
    x = torch.randn(3, 5, IN)
    first, again = run(LoRALinear.forward, layer, x, seed=7), run(LoRALinear.forward, layer, x, seed=7)
    assert_same(first, again, atol=0.0)
    assert not torch.equal(run(LoRALinear.forward, layer, x, seed=8)["out"], first["out"])


def test_gated_lora_with_its_gate():
    layer = make_layer(GatedLoRALinear).train()
    x = torch.randn(3, 5, IN)
    new, old = run(GatedLoRALinear.forward, layer, x), run(plain_forward, layer, x)
    assert {"gate.proj.weight", "gate.proj.bias"} <= set(new)
    assert_same(new, old, atol=0.0)


def test_qlora_on_a_4bit_base():
    pytest.importorskip("bitsandbytes")
    from fw_qlora import QLoRALinear, quantize_linear

    torch.manual_seed(0)
    base = quantize_linear(nn.Linear(64, 64), compute_dtype=torch.float32)
    layer = QLoRALinear(base, r=R, alpha=8, dropout=0.2, dtype=torch.float32).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 3, 64)
    new, old = run(QLoRALinear.forward, layer, x), run(plain_forward, layer, x)
    assert_same(new, old, atol=0.0)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_merge_unmerge_and_the_merged_flag(conv1d):
    layer = make_layer(dropout=0.3, conv1d=conv1d).eval()
    x = torch.randn(2, 5, IN)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def test_gradcheck_in_float64():
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(R, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, R, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: LoRABranch.apply(x, a, b, 0.5, 0.0), (x, a, b))



def saved_storages(fn: Callable[[], object], exclude: nn.Module) -> dict[int, int]:
    """{storage pointer: bytes} of what autograd saves while ``fn`` runs, ``exclude``'s
    parameters left out (tensors sharing a storage counted once)."""
    params = {p.untyped_storage().data_ptr() for p in exclude.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_the_branch_saves_its_input_and_the_rank_r_activations_only():
    layer = make_layer(dropout=0.3).train()
    x = torch.randn(3, 5, IN, requires_grad=True)
    saved = saved_storages(lambda: layer(x), layer)
    assert x.untyped_storage().data_ptr() in saved and len(saved) == 3  # x itself, not a copy; h; the mask's bits
    assert sum(saved.values()) == (3 * 5 * IN + 3 * 5 * R) * 4 + -(-3 * 5 * IN // 8)  # x and h, float32; 1 bit a mask entry
    with patch.object(lora_layer, "lora_branch", plain_lora_branch):
        plain = saved_storages(lambda: layer(x), layer)
    assert sum(plain.values()) == (2 * 3 * 5 * IN + 3 * 5 * R) * 4  # CPU dropout's noise and dropout(x), and h


def test_a_llama_with_all_seven_projections_adapted_saves_less():
    from conftest import TINY_LLAMA
    from fw_lora import LoRA
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA)).requires_grad_(False)
    model.enable_input_require_grads()  # as in a block deep in a model: its input needs a gradient
    ids = torch.randint(0, 1000, (2, 16))

    def saved() -> int:
        outputs = []
        nbytes = sum(saved_storages(lambda: outputs.append(model(input_ids=ids).logits), model).values())
        outputs[0].sum().backward()
        return nbytes

    frozen = saved()
    LoRA(r=4, alpha=8, dropout=0.05, targets=["all-linear"]).attach(model)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 7 * TINY_LLAMA["num_hidden_layers"]
    model.train()
    new = saved()
    with patch.object(lora_layer, "lora_branch", plain_lora_branch):
        old = saved()
    # measured: frozen 96,896 B; plain branch +138,240 B; the Function +39,936 B (x once, h)
    assert new - frozen < (old - frozen) / 3, (frozen, old, new)
