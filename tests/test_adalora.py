"""AdaLoRA (Zhang et al. 2023) against Hugging Face PEFT's AdaLoRA: the same logits, the same
orthogonal regularizer, one AdamW step, the same importance scores and rank masks through the
budget schedule; exact counts, merging, fw and PEFT formats, the contract's hooks in a fit, and
an exact resume of the rank allocator."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from conftest import TINY_BERT, TINY_LLAMA, TOKENIZER, hf_model, padded_ids, sentiment_files, write_recipe
from fw_adalora import AdaLoRA

from framework.validation import InvalidArgument

QUIET_BERT = {**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
CLS = {"class_path": "Classification", "init_args": {"num_labels": 2, "pooling": "cls"}}
TOL = 1e-5


def ada_recipe(config: dict, task: dict | None = None, **args: Any) -> dict:
    return {"backbone": {"config": config, "tokenizer": TOKENIZER}, "task": task or CLS,
            "method": {"class_path": "adalora", "init_args": args}}


# -- arguments and counts -----------------------------------------------------------------------

@pytest.mark.parametrize("args, field", [
    ({"target_r": 16, "init_r": 12}, "target_r"),
    ({"tinit": 5, "tfinal": 5, "total_step": 10}, "total_step"),
    ({"beta1": 1.0}, "beta1"),
    ({"orth_reg_weight": -0.1}, "orth_reg_weight"),
    ({"deltaT": 0}, "deltaT"),
    ({"init_r": 0}, "init_r"),
])
def test_bad_arguments_name_the_field(args, field):
    with pytest.raises(InvalidArgument, match=rf"^{field}: "):
        AdaLoRA(**args)


def test_counts_are_init_r_times_in_plus_out_plus_one(build):
    module = build(ada_recipe(TINY_BERT, init_r=6, target_r=2, total_step=10))
    counts = module.param_counts()
    assert counts.method_params == TINY_BERT["num_hidden_layers"] * 2 * 6 * (64 + 64 + 1)  # 1,548
    # the stored form is A, E, B and an int8 rank mask per layer (a locator, not a parameter)
    assert counts.stored_params == counts.method_params
    llama = build(ada_recipe(TINY_LLAMA, {"class_path": "CausalLM"}, init_r=4, total_step=10, target_r=2))
    kv = 16  # 2 kv heads x 8
    assert llama.param_counts().method_params == 2 * (4 * (32 + 32 + 1) + 4 * (32 + kv + 1))
    assert module.method.modified_modules["bert.encoder.layer.0.attention.self.query"] == "AdaLoRA init_r=6 (+774)"
    bert_base = build(ada_recipe({"model_type": "bert"}, total_step=100))  # PEFT's defaults: init_r 12, query+value
    assert bert_base.param_counts().method_params == 12 * 2 * 12 * (768 + 768 + 1) == 442_656


def test_a_run_too_short_for_the_schedule_is_one_line_naming_the_field(build, files, tmp_path):
    from helpers import classification_data, trainer

    from framework.errors import FieldError

    module = build(ada_recipe(QUIET_BERT, init_r=2, target_r=1, tinit=2, tfinal=2))  # total_step: the run's 4
    with pytest.raises(FieldError, match=r"^model\.method\.init_args\.tfinal: 4 steps leave no budget phase after tinit=2"):
        trainer(tmp_path, 4).fit(module, datamodule=classification_data(files))


# -- parity with Hugging Face PEFT -------------------------------------------------------------

CASES = {
    "bert": (QUIET_BERT, "AutoModelForSequenceClassification", ["query", "value"]),
    "llama": (TINY_LLAMA, "AutoModelForCausalLM", ["q_proj", "v_proj"]),
}
SCHEDULE = {"init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 2, "deltaT": 2, "total_step": 10}


def twins(case: str, seed: int = 0, **extra: Any):
    """fw's and PEFT's AdaLoRA on one base, PEFT's trained tensors copied from fw's (made
    non-trivial: E non-zero); returns (fw model, fw method, PEFT model, fw name -> PEFT parameter)."""
    peft = pytest.importorskip("peft")
    config, auto, targets = CASES[case]
    base = hf_model(config, auto)
    ours = copy.deepcopy(base).requires_grad_(False)
    method = AdaLoRA(**SCHEDULE, alpha=4.0, **extra)
    torch.manual_seed(seed)
    method.attach(ours)
    peft_config = peft.AdaLoraConfig(**SCHEDULE, lora_alpha=4.0, target_modules=targets, **extra)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config)
    generator = torch.Generator().manual_seed(seed + 1)
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    peft_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    pairs = {n: peft_params[f"base_model.model.{n}.default"] for n in mine}
    assert len(pairs) == len(peft_params)  # the same trained tensors (PEFT's ranknum does not train)
    with torch.no_grad():
        for name, p in sorted(mine.items()):
            if name.endswith("lora_E"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            pairs[name].copy_(p)
    return ours, method, theirs, pairs


def labels_of(case: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.tensor([0, 1, 1]) if case == "bert" else batch["input_ids"]


@pytest.mark.parametrize("case", list(CASES))
def test_same_logits_regularizer_and_adamw_step_as_peft(case):
    ours, method, theirs, pairs = twins(case)
    batch = padded_ids()
    labels = labels_of(case, batch)
    out_ours = ours(**batch, labels=labels)
    # AdaLoraModel.forward adds PEFT's orthogonal regularizer to the model's .loss (PEFT's task
    # wrappers call it; the generic PeftModel calls the transformers model directly)
    out_theirs = theirs.base_model(**batch, labels=labels)
    diff = (out_ours.logits - out_theirs.logits).abs().max().item()
    reg = method.loss_term(ours)
    peft_reg = out_theirs.loss - theirs.base_model.model(**batch, labels=labels).loss
    print(f"{case}: max |fw - PEFT| logits {diff:.3g}; regularizer fw {reg.item():.6f} PEFT {peft_reg.item():.6f}")
    assert diff <= TOL and abs(reg.item() - peft_reg.item()) <= TOL and reg.item() > 0.1

    names = sorted(pairs)
    opt_ours = torch.optim.AdamW([dict(ours.named_parameters())[n] for n in names], lr=1e-2)
    opt_theirs = torch.optim.AdamW([pairs[n] for n in names], lr=1e-2)
    (out_ours.loss + reg).backward()
    out_theirs.loss.backward()
    grads = max((dict(ours.named_parameters())[n].grad - pairs[n].grad).abs().max().item() for n in names)
    opt_ours.step(), opt_theirs.step()
    step = max((dict(ours.named_parameters())[n] - pairs[n]).abs().max().item() for n in names)
    print(f"{case}: max |fw - PEFT| gradients {grads:.3g}, weights after one AdamW step {step:.3g}")
    assert grads <= TOL and step <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_budget_schedule_scores_and_masks_equal_peft_through_every_phase(case):
    """Ten steps (tinit 2, allocations every 2 steps, final allocation at step 8, then the final
    phase) with identical gradients: the same moving averages, the same masks and zeroed E at
    every step, the target budget at the end."""
    ours, method, theirs, pairs = twins(case, seed=3)
    names = sorted(pairs)
    fw_params = dict(ours.named_parameters())
    allocator = method.allocator(ours)
    peft_allocator = theirs.base_model.rankallocator
    generator = torch.Generator().manual_seed(7)
    worst_avg, budgets = 0.0, []
    for step in range(1, SCHEDULE["total_step"] + 1):
        for n in names:  # the same gradient and a small "optimizer" move on both sides
            grad = torch.randn(fw_params[n].shape, generator=generator)
            move = torch.randn(fw_params[n].shape, generator=generator) * 0.01
            with torch.no_grad():
                fw_params[n].add_(move)
                pairs[n].add_(move)
            fw_params[n].grad, pairs[n].grad = grad.clone(), grad.clone()
        method.on_after_optimizer_step(ours, step)
        theirs.base_model.update_and_allocate(step)
        for n in names:
            key = f"{n}.default"  # PEFT's allocator names the parameters of the model inside its tuner
            if key in peft_allocator.exp_avg_ipt:
                worst_avg = max(worst_avg, (allocator.exp_avg_ipt[n] - peft_allocator.exp_avg_ipt[key]).abs().max().item(),
                                (allocator.exp_avg_unc[n] - peft_allocator.exp_avg_unc[key]).abs().max().item(),
                                (allocator.ipt[n] - peft_allocator.ipt[key]).abs().max().item())
            else:
                assert n not in allocator.exp_avg_ipt  # both dropped the scores after the final allocation
            assert torch.equal(fw_params[n], pairs[n]), (step, n)  # E zeroed in the same places
        pattern = theirs.peft_config["default"].rank_pattern
        if pattern:
            mine = method.rank_pattern(ours)
            assert {k.removesuffix(".lora_E.default"): v for k, v in pattern.items()} == mine, step
        budgets.append(sum(layer.rank for layer in method.svd_layers(ours).values()))
    print(f"{case}: kept ranks after each step {budgets}; max |fw - PEFT| scores {worst_avg:.3g}")
    assert worst_avg <= 1e-7
    layers = len(method.svd_layers(ours))
    assert budgets[:2] == [6 * layers] * 2 and budgets[-1] == 2 * layers  # init budget, then the target
    assert budgets[3] < 6 * layers  # pruned during the budget phase


def test_merge_equals_unmerged_logits_with_pruned_ranks_and_unmerge_restores():
    ours, method, _, pairs = twins("llama", seed=5)
    layers = method.svd_layers(ours)
    for layer in layers.values():  # prune half the ranks
        layer.rank_mask[::2] = False
        layer.apply_mask()
    batch = padded_ids()
    weights = [layer.base_layer.weight.clone() for layer in layers.values()]
    with torch.no_grad():
        unmerged = ours(**batch).logits
        method.merge(ours)
        merged = ours(**batch).logits
        method.unmerge(ours)
        restored = ours(**batch).logits
    scale = unmerged.abs().max().item()  # float32 rounding of the merged weights, relative to the logits
    print(f"merge: max |merged - unmerged| {(merged - unmerged).abs().max().item():.3g} (max |logit| {scale:.3g})")
    assert (merged - unmerged).abs().max() <= TOL * scale and (restored - unmerged).abs().max() <= TOL * scale
    for layer, weight in zip(layers.values(), weights):
        torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-6, rtol=1e-6)


# -- formats -------------------------------------------------------------------------------------

def _pruned(module) -> dict[str, list[bool]]:
    """Prune ranks of every layer of ``module`` as an allocation would: uneven ranks, one layer
    at rank 0 (a real allocation does that: see the fit below)."""
    for i, layer in enumerate(module.method.svd_layers(module.model).values()):
        layer.rank_mask[: i + 1] = False
        layer.apply_mask()
    return module.method.rank_pattern(module.model)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_fw_and_peft_formats_round_trip_with_the_rank_pattern(kind, tmp_path, request):
    pytest.importorskip("peft")
    from helpers import module_from_adapter, peft_model, trained_module

    from framework.formats.fw import write_fw_adapter
    from framework.formats.peft import write_peft_adapter

    base = request.getfixturevalue(f"tiny_{kind}_dir")
    config = {"backbone": {"name_or_path": base, "tokenizer": TOKENIZER},
              "method": {"class_path": "adalora", "init_args": {"init_r": 4, "target_r": 2, "total_step": 20}},
              "task": CLS if kind == "bert" else {"class_path": "CausalLM"}}
    module = trained_module(config, seed=1)
    pattern = _pruned(module)
    batch = padded_ids()
    with torch.no_grad():
        ours = module.model(**batch).logits
    write_peft_adapter(module, tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["init_r"] == 4
    assert saved["rank_pattern"] == {f"{n}.lora_E": v for n, v in pattern.items()}
    theirs = peft_model(base, kind == "llama", str(tmp_path / "peft"))
    kept = {n: p.shape[0] for n, p in theirs.named_parameters() if n.endswith("lora_E.default")}
    assert sorted(kept.values()) == sorted(sum(v) for v in pattern.values())  # PEFT resized its layers
    with torch.no_grad():
        peft_diff = (theirs(**batch).logits - ours).abs().max().item()
    write_fw_adapter(module, tmp_path / "fw")
    diffs = {"peft": peft_diff}
    for folder in ("peft", "fw"):
        fresh = module_from_adapter(tmp_path / folder, config)
        with torch.no_grad():
            diffs[f"{folder} -> fw"] = (fresh.model(**batch).logits - ours).abs().max().item()
        ranks = sorted(m.rank for m in fresh.method.svd_layers(fresh.model).values())
        assert ranks == sorted(sum(v) for v in pattern.values()), folder
    print(f"{kind}: max |logit differences| {diffs}")
    assert max(diffs.values()) <= TOL


# -- the hooks in a run: loss term logged, ranks at the target, exact resume -------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    return sentiment_files(tmp_path_factory.mktemp("adalora-data"), 48, 16, 16)


def run_recipe(root, files: dict[str, str], **trainer: Any) -> dict:
    """3 epochs of 3 batches (9 steps; total_step from the run), a checkpoint after every step."""
    return {
        "seed_everything": 3, "test_after_fit": False,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 3, "enable_progress_bar": False,
            "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 0,
            "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(root / "runs"), "name": "r"}},
            "callbacks": [{"class_path": "ModelCheckpoint", "init_args": {
                "save_top_k": -1, "every_n_train_steps": 1, "filename": "{step}", "save_last": True}}],
            "log_every_n_steps": 1, **trainer,
        },
        "model": {"backbone": {"config": {**TINY_BERT, "hidden_dropout_prob": 0.1}, "tokenizer": TOKENIZER},
                  "method": {"class_path": "adalora", "init_args": {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2,
                                                                      "deltaT": 1, "dropout": 0.1}},
                  "learning_rate": 0.01, "scheduler": "cosine", "task": CLS},
        "data": {"class_path": "ClassificationData", "init_args": {"data_files": files, "batch_size": 16}},
    }


def test_fit_logs_the_loss_term_reaches_the_target_budget_and_resumes_exactly(files, tmp_path):
    import csv

    from safetensors.torch import load_file

    from framework.cli import main

    root = tmp_path / "whole"
    path = write_recipe(tmp_path / "whole.yaml", run_recipe(root, files))
    assert main(["fit", "--config", path]) == 0
    run = root / "runs" / "r" / "version_0"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    logged = [r for r in rows if r.get("train/method_loss")]
    assert len(logged) == 9
    for r in logged:  # train/loss is the task's loss, the total adds the regularizer
        assert abs(float(r["train/total_loss"]) - float(r["train/loss"]) - float(r["train/method_loss"])) <= 1e-5
    stored = load_file(str(run / "adapter" / "adapter.safetensors"))
    masks = {k: v for k, v in stored.items() if k.endswith(".rank_mask")}
    assert len(masks) == 4 and sum(int(m.sum()) for m in masks.values()) == 2 * 4  # target_r x layers
    for key, mask in masks.items():  # pruned ranks are zero in the stored E
        e = stored[key.replace("rank_mask", "lora_E")].view(-1)
        assert torch.all(e[~mask.bool()] == 0)
    checkpoint = torch.load(run / "checkpoints" / "step=4.ckpt", weights_only=True)
    state = checkpoint["fw_method_state"]
    assert any(k.endswith(".exp_avg_unc") for k in state) and len([k for k in state if k.endswith("rank_mask")]) == 4
    # resumed mid-budget-phase (after step 4): the allocator continues where it was
    assert main(["fit", "--config", path, "--ckpt_path", str(run / "checkpoints" / "step=4.ckpt")]) == 0
    resumed = load_file(str(root / "runs" / "r" / "version_1" / "adapter" / "adapter.safetensors"))
    worst = max((resumed[k].float() - stored[k].float()).abs().max().item() for k in stored)
    # the allocator's moving averages two steps later: equal to the uninterrupted run's
    later = [torch.load(root / "runs" / "r" / v / "checkpoints" / "step=6.ckpt", weights_only=True)["fw_method_state"]
             for v in ("version_0", "version_1")]
    averages = [k for k in later[0] if k.endswith((".exp_avg_ipt", ".exp_avg_unc"))]
    assert averages and later[0].keys() == later[1].keys()
    state_diff = max((later[0][k] - later[1][k]).abs().max().item() for k in averages)
    print(f"fit: final ranks {[int(m.sum()) for m in masks.values()]}; resumed vs whole: adapter max diff {worst:.3g}, "
          f"allocator averages at step 6 max diff {state_diff:.3g}")
    assert resumed.keys() == stored.keys() and worst <= 1e-6 and state_diff <= 1e-9


def test_compose_forwards_the_loss_term_after_step_and_state(build):
    module = build({"backbone": {"config": TINY_BERT, "tokenizer": TOKENIZER}, "task": CLS, "method": {
        "class_path": "compose", "init_args": {"methods": [
            {"class_path": "adalora", "init_args": {"init_r": 4, "target_r": 2, "total_step": 6, "targets": ["query"]}},
            {"class_path": "lora", "init_args": {"r": 2, "targets": ["value"]}}]}}})
    compose, model = module.method, module.model
    part = compose.methods[0]
    assert torch.equal(compose.loss_term(model), part.loss_term(model))
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    for step in range(1, 7):
        compose.on_after_optimizer_step(model, step)
    assert sum(m.rank for m in part.svd_layers(model).values()) == 2 * 2
    state = compose.method_state(model)
    assert state and all(k.startswith("methods.0.") for k in state)
    compose.load_method_state(model, state)
    with pytest.raises(KeyError, match="belongs to no part"):
        compose.load_method_state(model, {"methods.5.x": torch.zeros(1)})


def test_peft_reference_plugin_trains_exactly_as_fw_in_fws_loop(build, files, tmp_path):
    """``peft_adalora`` (PEFT's layers, regularizer and update_and_allocate through the same hooks)
    and ``adalora`` from the same seed in the same loop: the same weights and ranks after 6 steps."""
    pytest.importorskip("peft")
    from helpers import classification_data, trainer

    args = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "alpha": 4.0}
    peft_module = build({**ada_recipe(QUIET_BERT, **args), "learning_rate": 0.01,
                         "method": {"class_path": "peft_adalora", "init_args": args}}, seed=4)
    fw_module = build({**ada_recipe(QUIET_BERT, **args), "learning_rate": 0.01}, seed=4)
    for module in (fw_module, peft_module):
        trainer(tmp_path / type(module.method).__name__, 6).fit(module, datamodule=classification_data(files))
    ours = {n: p for n, p in fw_module.model.named_parameters() if p.requires_grad}
    theirs = {n.replace(".default", ""): p for n, p in peft_module.model.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    worst = max((ours[n] - theirs[n]).abs().max().item() for n in ours)
    pattern = {k.removesuffix(".lora_E.default"): v for k, v in peft_module.method.tuner.peft_config["default"].rank_pattern.items()}
    ranks = fw_module.method.rank_pattern(fw_module.model)
    print(f"fw vs PEFT reference after 6 steps in fw's loop: max weight diff {worst:.3g}; ranks {ranks}")
    assert worst <= TOL and pattern == ranks
    assert sum(sum(v) for v in pattern.values()) == 2 * 4


# -- the contract's hooks, as the core calls them --------------------------------------------------

class _Recorder:
    """Wraps a module's method: counts loss-term calls, records after-step calls (step, whether
    gradients were there), and returns a NaN loss term at the calls listed in ``nan_at``, a finite
    one with NaN gradients (sqrt at 0) at those in ``nan_grad_at``."""

    def __init__(self, nan_at: tuple[int, ...] = (), nan_grad_at: tuple[int, ...] = ()) -> None:
        self.nan_at, self.nan_grad_at, self.terms, self.steps = nan_at, nan_grad_at, 0, []

    def install(self, module) -> None:
        method, recorder = module.method, self

        def loss_term(model):
            recorder.terms += 1
            value = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            if recorder.terms in recorder.nan_grad_at:
                return torch.sqrt(value)
            return value + float("nan") if recorder.terms in recorder.nan_at else value

        def after_step(model, step):
            recorder.steps.append((step, all(p.grad is not None for p in model.parameters() if p.requires_grad)))

        method.loss_term, method.on_after_optimizer_step = loss_term, after_step


@pytest.mark.parametrize("accumulate, nan_at, nan_grad_at, expected", [
    (1, (), (), [1, 2, 3, 4]),
    (2, (), (), [1, 2, 3, 4]),          # once per optimizer step, not per batch
    (1, (2,), (), [1, 3, 4]),           # the step whose loss was NaN applied nothing: no call
    (2, (3, 4), (), [1, 3, 4]),         # both batches of step 2 skipped
    (1, (), (3,), [1, 2, 4]),           # the gradient-norm guard cleared step 3's gradients
])
def test_core_calls_the_after_step_hook_once_per_applied_step(build, files, tmp_path, accumulate, nan_at, nan_grad_at,
                                                              expected):
    from helpers import classification_data, trainer

    module = build({**ada_recipe(QUIET_BERT, init_r=2, target_r=1, total_step=100), "max_nonfinite_steps": 2})
    recorder = _Recorder(nan_at, nan_grad_at)
    recorder.install(module)
    trainer(tmp_path, 4, accumulate_grad_batches=accumulate).fit(module, datamodule=classification_data(files, batch_size=4))
    assert recorder.terms == 4 * accumulate
    assert recorder.steps == [(s, True) for s in expected]
