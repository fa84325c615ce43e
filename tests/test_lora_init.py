"""LoRA's ``init``: kaiming (the default, unchanged), gaussian, PiSSA and OLoRA, against Hugging
Face PEFT's ``init_lora_weights``: the same seed gives the same A, B and residual base weight;
the model starts equal to the base; one AdamW step agrees; merge/unmerge, fw's format, the
merged model and PEFT's converted (rank-2r) form give the trained model on the original base."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
import torch
import transformers
from conftest import TINY_BERT, TINY_GPT2, TINY_LLAMA, TOKENIZER, hf_model, padded_ids, perturb_trainable
from fw_lora import LoRA, LoRALinear
from fw_lora.branch import lora_branch, plain_lora_branch
from fw_lora.method import peft_init
from safetensors.torch import load_file

from framework.cli import build_module
from framework.errors import RecipeError
from framework.formats.fw import write_fw_adapter
from framework.formats.merged import write_merged
from framework.formats.peft import write_peft_adapter
from framework.formats.source import read_adapter, updated
from framework.method import ExportNotSupportedError

QUIET_BERT = {**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
CLS = {"class_path": "Classification", "init_args": {"num_labels": 2, "pooling": "cls"}}
LM = {"class_path": "CausalLM"}
#: model -> (config, auto class, PEFT's target_modules for fw's default query/value roles)
CASES = {
    "bert": (QUIET_BERT, "AutoModelForSequenceClassification", ["query", "value"]),
    "llama": (TINY_LLAMA, "AutoModelForCausalLM", ["q_proj", "v_proj"]),
}
#: fw's init arguments -> PEFT's init_lora_weights
INITS: dict[str, tuple[dict[str, Any], Any]] = {
    "kaiming": ({}, True),
    "gaussian": ({"init": "gaussian"}, "gaussian"),
    "pissa": ({"init": "pissa"}, "pissa"),
    "pissa_niter": ({"init": "pissa", "pissa_niter": 2}, "pissa_niter_2"),
    "olora": ({"init": "olora"}, "olora"),
}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _layers(model: torch.nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _recipe(kind: str, base: dict | None = None, **args: Any) -> dict:
    config = CASES[kind][0]
    return {"backbone": base or {"config": config, "tokenizer": TOKENIZER}, "task": CLS if kind == "bert" else LM,
            "method": {"class_path": "lora", "init_args": args}}


def _labels(kind: str, batch: dict) -> torch.Tensor:
    return torch.tensor([0, 1, 1]) if kind == "bert" else batch["input_ids"]


# -- the default is what it was ---------------------------------------------------------------

def test_default_init_is_kaiming_and_draws_exactly_what_lora_drew_before():
    base = hf_model(*CASES["llama"][:2])
    models = [copy.deepcopy(base).requires_grad_(False) for _ in range(2)]
    torch.manual_seed(3)
    LoRA(r=4).attach(models[0])
    after_default = torch.rand(3)
    torch.manual_seed(3)
    LoRA(r=4, init="kaiming").attach(models[1])
    assert torch.equal(after_default, torch.rand(3))
    torch.manual_seed(3)
    for (name, ours), theirs in zip(_layers(models[0]).items(), _layers(models[1]).values()):
        expected = torch.empty(ours.lora_A.shape)
        torch.nn.init.kaiming_uniform_(expected, a=math.sqrt(5))  # the former constructor, one draw per layer
        assert torch.equal(ours.lora_A, expected) and torch.equal(theirs.lora_A, expected), name
        assert not ours.lora_B.any() and ours.lora_A0 is None and ours.init == "kaiming"
    assert torch.equal(after_default, torch.rand(3))  # nothing else was drawn
    assert all(torch.equal(m.base_layer.weight, base.get_submodule(n).weight) for n, m in _layers(models[0]).items())


# -- parity with Hugging Face PEFT ------------------------------------------------------------

@pytest.mark.parametrize("init", ["gaussian", "pissa", "pissa_niter", "olora"])
@pytest.mark.parametrize("case", list(CASES))
def test_same_seed_same_tensors_start_and_adamw_step_as_peft(case, init, tmp_path):
    peft = pytest.importorskip("peft")
    config, auto, targets = CASES[case]
    args, peft_value = INITS[init]
    r, alpha = 4, 8
    base = hf_model(config, auto)
    ours = copy.deepcopy(base).requires_grad_(False)
    method = LoRA(r=r, alpha=alpha, **args)
    torch.manual_seed(7)
    method.attach(ours)
    stream = torch.rand(4)
    torch.manual_seed(7)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                                      init_lora_weights=peft_value))
    assert torch.equal(stream, torch.rand(4))  # the same random draws, in the same order
    peft_params = dict(theirs.named_parameters())
    layers = _layers(ours)
    assert len(layers) == 4
    diff = 0.0
    for name, layer in layers.items():
        prefix = f"base_model.model.{name}"
        for ours_t, theirs_t in ((layer.lora_A, peft_params[f"{prefix}.lora_A.default.weight"]),
                                 (layer.lora_B, peft_params[f"{prefix}.lora_B.default.weight"]),
                                 (layer.base_layer.weight, peft_params[f"{prefix}.base_layer.weight"])):
            diff = max(diff, (ours_t - theirs_t).abs().max().item())
        original = base.get_submodule(name).weight
        if init == "gaussian":
            assert torch.equal(layer.base_layer.weight, original) and not layer.lora_B.any()
            assert abs(layer.lora_A.std().item() - 1 / r) < 0.3 / r  # N(0, 1/r²)
        else:  # the residual: W - s·B0·A0, and the initial factors kept
            assert not torch.equal(layer.base_layer.weight, original)
            assert torch.equal(layer.lora_A0, layer.lora_A) and torch.equal(layer.lora_B0, layer.lora_B)
            torch.testing.assert_close(layer.base_layer.weight + layer.delta_weight(), original, atol=1e-5, rtol=0)
    print(f"{case} {init}: max |fw - PEFT| A, B, base weight {diff:.3g}")  # pytest -s shows what was measured
    assert diff <= 1e-5

    batch = padded_ids()
    labels = _labels(case, batch)
    with torch.no_grad():
        start = _relative(ours(**batch).logits, base(**batch).logits)
    print(f"{case} {init}: at init, max |fw - base| / max |base| logits {start:.3g}")
    assert start <= 1e-5

    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    names = sorted(mine)
    assert sorted(f"base_model.model.{n.replace('lora_A', 'lora_A.default.weight').replace('lora_B', 'lora_B.default.weight')}"
                  for n in names) == sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    peft_of = {n: peft_params[f"base_model.model.{n}.default.weight"] for n in names}
    opt_ours = torch.optim.AdamW([mine[n] for n in names], lr=1e-2)
    opt_theirs = torch.optim.AdamW([peft_of[n] for n in names], lr=1e-2)
    before = {n: p.detach().clone() for n, p in mine.items()}
    ours(**batch, labels=labels).loss.backward()
    theirs(**batch, labels=labels).loss.backward()
    opt_ours.step(), opt_theirs.step()
    assert all(not torch.equal(before[n], mine[n]) for n in names if "lora_A" in n)  # the step moved A
    step = max((mine[n] - peft_of[n]).abs().max().item() for n in names)
    with torch.no_grad():
        after = _relative(ours(**batch).logits, theirs(**batch).logits)
    print(f"{case} {init}: after one AdamW step, max |fw - PEFT| A, B {step:.3g}, logits (relative) {after:.3g}")
    assert step <= 1e-5 and after <= 1e-5

    if init == "gaussian":
        return
    # PEFT's conversion for the original base (rank 2r) is what fw's PEFT form holds
    initial = tmp_path / "initial"
    theirs_init = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                                           init_lora_weights=peft_value))
    with torch.no_grad():  # PEFT's initial adapter: fw's A0, B0 (pissa_niter: another draw, so take fw's)
        for name, layer in layers.items():
            theirs_init.get_submodule(f"base_model.model.{name}").lora_A["default"].weight.copy_(layer.lora_A0)
            theirs_init.get_submodule(f"base_model.model.{name}").lora_B["default"].weight.copy_(layer.lora_B0)
    theirs_init.save_pretrained(str(initial))
    theirs.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(initial))
    converted = load_file(str(tmp_path / "converted" / "adapter_model.safetensors"))
    saved = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    adapter = method.to_peft(ours)
    assert (adapter.config["r"], adapter.config["lora_alpha"]) == (saved["r"], saved["lora_alpha"]) == (2 * r, 2 * alpha)
    assert saved["init_lora_weights"] is True and "init_lora_weights" not in adapter.config
    assert sorted(converted) == sorted(f"base_model.model.{k}" for k in adapter.weights)
    conversion = max((converted[f"base_model.model.{k}"] - v).abs().max().item() for k, v in adapter.weights.items())
    print(f"{case} {init}: max |fw - PEFT| converted rank-{2 * r} tensors {conversion:.3g}")
    assert conversion <= 1e-6


def test_gpt2_conv1d_pissa_is_peft_s_and_olora_starts_at_the_base():
    """PEFT transposes GPT-2's Conv1D weight for PiSSA (same tensors here); its OLoRA does not
    (A and B come out with swapped shapes), so fw's OLoRA factors W (out, in) as for Linear."""
    peft = pytest.importorskip("peft")
    base = hf_model(TINY_GPT2, "AutoModelForCausalLM")
    batch = padded_ids()
    with torch.no_grad():
        reference = base(**batch).logits
    for init in ("pissa", "olora"):
        ours = copy.deepcopy(base).requires_grad_(False)
        LoRA(r=4, alpha=8, init=init).attach(ours)
        assert all(m.fan_in_fan_out for m in _layers(ours).values())
        with torch.no_grad():
            assert _relative(ours(**batch).logits, reference) <= 1e-5, init
    ours = copy.deepcopy(base).requires_grad_(False)
    LoRA(r=4, alpha=8, init="pissa").attach(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights="pissa"))
    for name, layer in _layers(ours).items():
        peft_layer = theirs.get_submodule(f"base_model.model.{name}")
        assert torch.equal(layer.lora_A, peft_layer.lora_A["default"].weight)
        assert torch.equal(layer.lora_B, peft_layer.lora_B["default"].weight)
        assert torch.equal(layer.base_layer.weight, peft_layer.base_layer.weight)


# -- merging, fw's format, merged and PEFT exports ----------------------------------------------

@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("kind", list(CASES))
def test_merge_and_unmerge_are_exact_on_the_residual_base(build, kind, init):
    module = build(_recipe(kind, r=4, init=init))
    perturb_trainable(module)
    layers = _layers(module.model)
    residuals = {n: m.base_layer.weight.clone() for n, m in layers.items()}
    batch = padded_ids()
    with torch.no_grad():
        unmerged = module.model(**batch).logits
        module.method.merge(module.model)
        merged = module.model(**batch).logits
        module.method.unmerge(module.model)
        again = module.model(**batch).logits
    assert _relative(merged, unmerged) <= 1e-5 and _relative(again, unmerged) <= 1e-5
    for name, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight, residuals[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter", "olora"])
def test_fw_format_stores_the_initial_factors_and_round_trips(init, tmp_path):
    args = INITS[init][0]
    torch.manual_seed(0)
    module = perturb_trainable(build_module(_recipe("llama", r=4, **args)))
    batch = padded_ids()
    with torch.no_grad():
        ours = module.model(**batch).logits
    write_fw_adapter(module, tmp_path)
    stored = load_file(str(tmp_path / "adapter.safetensors"))
    layers = _layers(module.model)
    assert sorted(stored) == sorted(f"{n}.{k}" for n in layers for k in ("lora_A", "lora_B", "lora_A0", "lora_B0"))
    for name, layer in layers.items():
        assert torch.equal(stored[f"{name}.lora_A0"], layer.lora_A0) and not torch.equal(stored[f"{name}.lora_A"], layer.lora_A0)

    adapter = read_adapter(tmp_path)
    config = updated(_recipe("llama", r=4, **args), adapter.model_update(_recipe("llama", r=4, **args)))
    torch.manual_seed(0)  # the same random backbone
    fresh = build_module(config)
    if init == "pissa_niter":  # as if the randomized SVD had drawn otherwise: loading rebases on the stored A0/B0
        for name, layer in _layers(fresh.model).items():
            layer.rebase(layer.lora_A0 * 1.01, layer.lora_B0.flip(0))
            assert (layer.base_layer.weight - layers[name].base_layer.weight).abs().max() > 1e-3
    adapter.load_into(fresh)
    with torch.no_grad():
        back = fresh.eval().model(**batch).logits
    diff = _relative(back, ours)
    print(f"{init}: fw format round trip, max |Δ| / max |logits| {diff:.3g}")
    assert diff <= (0 if init != "pissa_niter" else 1e-5)
    for name, layer in _layers(fresh.model).items():
        torch.testing.assert_close(layer.base_layer.weight, layers[name].base_layer.weight, atol=1e-6, rtol=0)


def test_a_checkpoint_keeps_a_and_b_only_and_attach_recomputes_the_residual():
    torch.manual_seed(0)
    module = perturb_trainable(build_module(_recipe("bert", r=4, init="pissa")))
    state = module.method.trainable_state_dict(module.model)
    assert not any(k.endswith(("lora_A0", "lora_B0")) for k in state)
    batch = padded_ids()
    torch.manual_seed(0)
    fresh = build_module(_recipe("bert", r=4, init="pissa"))
    fresh.method.load_trainable_state_dict(fresh.model, state)
    with torch.no_grad():
        assert torch.equal(fresh.eval().model(**batch).logits, module.model(**batch).logits)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_merged_export_is_the_trained_model(init, tmp_path):
    module = build_module(_recipe("bert", r=4, init=init))
    perturb_trainable(module)
    batch = padded_ids()
    with torch.no_grad():
        ours = module.model(**batch).logits
    write_merged(module, tmp_path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert _relative(model(**batch).logits, ours) <= 1e-5


@pytest.mark.parametrize(("kind", "init", "rslora"), [("bert", "pissa", False), ("llama", "pissa", False),
                                                      ("llama", "olora", False), ("bert", "olora", True)])
def test_peft_export_is_plain_lora_of_rank_2r_on_the_original_base(kind, init, rslora, tmp_path, request):
    peft = pytest.importorskip("peft")
    from helpers import adam_losses

    base = request.getfixturevalue(f"tiny_{kind}_dir")
    config = _recipe(kind, {"name_or_path": base, "tokenizer": TOKENIZER}, r=4, alpha=8, init=init, rslora=rslora)
    torch.manual_seed(0)
    module = build_module(config)
    batch = padded_ids()
    adam_losses(module, {**batch, "labels": _labels(kind, batch)}, steps=1)  # a real step: ΔW ≠ 0
    module.eval()
    with torch.no_grad():
        ours = module.model(**batch).logits
    write_peft_adapter(module, tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    assert saved["lora_alpha"] == pytest.approx(8 * math.sqrt(2) if rslora else 16)
    auto = transformers.AutoModelForSequenceClassification if kind == "bert" else transformers.AutoModelForCausalLM
    original = auto.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        untouched = original(**batch).logits
        theirs = peft.PeftModel.from_pretrained(original, str(tmp_path / "peft")).eval()(**batch).logits
    diff = _relative(theirs, ours)
    print(f"{kind} {init} rslora={rslora}: PEFT on the original base vs fw, max |Δ| / max |logits| {diff:.3g}")
    assert diff <= 1e-5 and _relative(untouched, ours) > 1e-4  # trained: not the base

    # read back into fw: plain LoRA of rank 2r (kaiming) on the original base, whatever the recipe's init
    adapter = read_adapter(tmp_path / "peft")
    rebuilt = updated(config, adapter.model_update(config))
    assert rebuilt["method"]["init_args"]["r"] == 8 and rebuilt["method"]["init_args"]["init"] == "kaiming"
    torch.manual_seed(1)
    fresh = build_module(rebuilt)
    adapter.load_into(fresh)
    with torch.no_grad():
        assert _relative(fresh.eval().model(**batch).logits, ours) <= 1e-5


def test_an_unconverted_peft_pissa_adapter_reads_as_pissa_on_the_original_base(tmp_path, tiny_llama_dir):
    """PEFT's save_pretrained without conversion keeps init_lora_weights: pissa and the trained A, B;
    fw rebuilds the residual from the recipe's original base at attach, as PEFT did."""
    peft = pytest.importorskip("peft")
    auto = transformers.AutoModelForCausalLM
    theirs = peft.get_peft_model(auto.from_pretrained(tiny_llama_dir, dtype=torch.float32), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="olora"))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in sorted(theirs.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    theirs.save_pretrained(str(tmp_path / "peft"))
    batch = padded_ids()
    with torch.no_grad():
        expected = theirs.eval()(**batch).logits
    config = _recipe("llama", {"name_or_path": tiny_llama_dir, "tokenizer": TOKENIZER}, r=8)
    adapter = read_adapter(tmp_path / "peft")
    rebuilt = updated(config, adapter.model_update(config))
    assert rebuilt["method"]["init_args"]["init"] == "olora" and rebuilt["method"]["init_args"]["r"] == 4
    fresh = build_module(rebuilt)
    adapter.load_into(fresh)
    with torch.no_grad():
        assert _relative(fresh.eval().model(**batch).logits, expected) <= 1e-5


def test_peft_init_values():
    assert peft_init(True) == ("kaiming", None) and peft_init(False) == ("kaiming", None)
    assert peft_init("gaussian") == ("gaussian", None) and peft_init("eva") == ("kaiming", None)
    assert peft_init("pissa") == ("pissa", None) and peft_init("pissa_niter_16") == ("pissa", 16)
    assert peft_init("olora") == ("olora", None)
    for value in ("loftq", "corda", "lora_ga", "pissa_fast"):
        with pytest.raises(ExportNotSupportedError, match="init_lora_weights"):
            peft_init(value)


# -- the recipe checks, QLoRA, the lean branch ---------------------------------------------------

def test_a_bad_init_names_the_field(build, sentiment_csv, tmp_path, capsys):
    from conftest import write_recipe

    from framework.cli import main

    recipe = {
        "trainer": {"accelerator": "cpu", "logger": False, "default_root_dir": str(tmp_path)},
        "model": _recipe("bert", init="xavier"),
        "data": {"class_path": "ClassificationData", "init_args": {"data_files": sentiment_csv}},
    }
    assert main(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)]) == 2  # LightningCLI's parser: the Literal
    err = capsys.readouterr().err
    assert "fw: error: model.method.init_args.init: Expected a typing.Literal['kaiming', 'gaussian', 'pissa', 'olora']" in err
    with pytest.raises(RecipeError, match=r"model\.method\.init_args\.pissa_niter: applies to init: pissa only"):
        build(_recipe("bert", pissa_niter=4))
    with pytest.raises(ValueError, match=r"model\.method\.init_args\.r: pissa takes r singular/QR directions"):
        build(_recipe("bert", r=128, init="pissa"))


def test_qlora_takes_gaussian_and_refuses_pissa_and_olora_naming_the_field(build):
    pytest.importorskip("bitsandbytes")
    qlora = {"class_path": "qlora", "init_args": {"r": 4, "targets": ["query", "value"], "gradient_checkpointing": False}}
    for init in ("pissa", "olora"):
        config = {**_recipe("bert"), "method": {**qlora, "init_args": {**qlora["init_args"], "init": init}}}
        with pytest.raises(RecipeError, match=rf"model\.method\.init_args\.init: {init} leaves the residual"):
            build(config)
    module = build({**_recipe("bert"), "method": {**qlora, "init_args": {**qlora["init_args"], "init": "gaussian"}}})
    layers = _layers(module.model)
    assert layers and all(m.init == "gaussian" and not m.lora_B.any() and m.lora_A0 is None for m in layers.values())


def test_the_lean_branch_gives_the_plain_ops_gradients_on_a_pissa_layer():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(24, 16), r=4, alpha=8, dropout=0.2, init="pissa").train()
    x = torch.randn(3, 5, 24, requires_grad=True)
    grads = []
    for branch in (lora_branch, plain_lora_branch):
        torch.manual_seed(1)
        out = layer.base_layer(x) + branch(x, layer.lora_A, layer.lora_B, layer.scaling, layer.dropout_p)
        grads.append(torch.autograd.grad(out.square().sum(), (x, layer.lora_A, layer.lora_B)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert torch.equal(layer.lora_A, layer.lora_A0) and layer.init == "pissa"
