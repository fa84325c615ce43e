"""LoRA+ (Hayou et al. 2024: B learns at λ × A's rate) through the ``param_groups`` hook of the
method contract: one optimizer step equals Hugging Face PEFT's ``create_loraplus_optimizer``;
a broken group list names the method; the recipe option works through ``fw fit``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import TINY_BERT, TINY_LLAMA, lora_recipe, padded_ids, write_recipe
from helpers import tiny_recipe
from torch import nn

from framework.validation import InvalidArgument

peft = pytest.importorskip("peft")

LR, WD, RATIO, RANK, ALPHA = 1e-3, 0.1, 16.0, 4, 8.0
#: the largest |fw - PEFT| difference accepted in the trained weights (float32)
TOLERANCE = 1e-5
CLS = {"class_path": "Classification", "init_args": {"num_labels": 2}}
LM = {"class_path": "CausalLM"}


def module_config(backbone: dict[str, Any], task: dict[str, Any], **method: Any) -> dict[str, Any]:
    return {**lora_recipe(backbone, r=RANK, alpha=ALPHA, **method), "task": task,
            "learning_rate": LR, "weight_decay": WD, "warmup_ratio": 0.0, "scheduler": "linear"}


def fw_optimizer(module, total_steps: int = 10) -> tuple[torch.optim.Optimizer, Any]:
    """``configure_optimizers`` as Lightning calls it (a stand-in trainer says the step count)."""
    module._trainer = SimpleNamespace(estimated_stepping_batches=total_steps)
    try:
        config = module.configure_optimizers()
    finally:
        module._trainer = None
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def peft_twin(module, task_type: str, targets: list[str]):
    """PEFT's LoRA on the same base weights as fw's ``module``, with fw's A, B and head copied in."""
    import transformers

    base_state = {k.replace(".base_layer.", "."): v for k, v in module.model.state_dict().items() if ".lora_" not in k}
    auto = transformers.AutoModelForSequenceClassification if task_type == "SEQ_CLS" else transformers.AutoModelForCausalLM
    base = auto.from_config(module.model.config)
    base.load_state_dict(base_state, strict=True)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets, task_type=task_type)
    twin = peft.get_peft_model(base, config)
    theirs = dict(twin.named_parameters())
    with torch.no_grad():
        for name, p in trainable(module.model).items():
            theirs[peft_name(name)].copy_(p)
    assert set(map(peft_name, trainable(module.model))) == set(trainable(twin))
    return twin


def peft_name(fw_name: str) -> str:
    """fw's parameter name as PEFT's (``...query.lora_A`` -> ``...query.lora_A.default.weight``)."""
    head, _, leaf = fw_name.rpartition(".")
    if leaf in ("lora_A", "lora_B"):
        return f"base_model.model.{fw_name}.default.weight"
    return f"base_model.model.{head}.modules_to_save.default.{leaf}"  # the trained head


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def loss_of(model: nn.Module, batch: dict[str, torch.Tensor], causal: bool) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    if causal:
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())
    return nn.functional.cross_entropy(logits, batch["labels"])


def one_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], causal: bool) -> float:
    model.eval()  # no dropout: both sides see the same function
    loss = loss_of(model, batch, causal)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def start_off_zero(module) -> None:
    """Move A and B off their initialisation (B = 0 would give A no gradient in one step)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(trainable(module.model).items()):
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)


@pytest.mark.parametrize(
    "backbone,task,task_type,targets",
    [(TINY_BERT, CLS, "SEQ_CLS", ["query", "value"]), (TINY_LLAMA, LM, "CAUSAL_LM", ["q_proj", "v_proj"])],
    ids=["bert", "llama"],
)
def test_one_step_equals_peft_create_loraplus_optimizer(build, backbone, task, task_type, targets):
    module = build(module_config(backbone, task, loraplus_lr_ratio=RATIO))
    start_off_zero(module)
    twin = peft_twin(module, task_type, targets)
    causal = task_type == "CAUSAL_LM"
    batch = {**padded_ids(), "labels": torch.tensor([0, 1, 1])}
    from peft.optimizers import create_loraplus_optimizer

    theirs = create_loraplus_optimizer(twin, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, loraplus_weight_decay=WD)
    ours, _ = fw_optimizer(module)
    before = {n: p.detach().clone() for n, p in trainable(module.model).items()}
    assert one_step(module.model, ours, batch, causal) == pytest.approx(one_step(twin, theirs, batch, causal), abs=1e-6)

    peft_params = dict(twin.named_parameters())
    diffs = {n: (p - peft_params[peft_name(n)]).abs().max().item() for n, p in trainable(module.model).items()}
    moved = {n: (p - before[n]).abs().max().item() for n, p in trainable(module.model).items()}
    # PEFT gives every 1-D parameter (the classifier's bias) the ratio too; fw keeps the head at lr
    bias = [n for n in diffs if n.startswith("classifier.") and n.endswith("bias")]
    print(f"{task_type}: max |fw - PEFT| after one LoRA+ step: {max(v for n, v in diffs.items() if n not in bias):.3g}")
    assert all(diffs[n] <= TOLERANCE for n in diffs if n not in bias)
    assert all(moved[n] > 1e-4 for n in moved)  # every A, B (and head weight) really stepped
    for name in bias:  # Adam's first step is lr · g / (|g| + eps): PEFT's is RATIO times fw's
        peft_delta = peft_params[peft_name(name)] - before[name]
        torch.testing.assert_close(RATIO * (module.model.get_parameter(name) - before[name]), peft_delta, atol=1e-6, rtol=1e-4)
    assert (task_type == "SEQ_CLS") == bool(bias)


def test_groups_put_b_at_the_ratio_and_the_schedule_keeps_it(build):
    module = build({**module_config(TINY_BERT, CLS, loraplus_lr_ratio=RATIO), "warmup_ratio": 0.5})
    optimizer, schedule = fw_optimizer(module)
    lr_of = {id(p): group["initial_lr"] for group in optimizer.param_groups for p in group["params"]}
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    params = trainable(module.model)
    assert len(lr_of) == len(params)  # each trainable parameter once
    for name, p in params.items():
        assert lr_of[id(p)] == pytest.approx(RATIO * LR if name.endswith("lora_B") else LR), name
        assert decay_of[id(p)] == (WD if p.ndim >= 2 else 0.0), name
    a, b = params["bert.encoder.layer.0.attention.self.query.lora_A"], params["bert.encoder.layer.0.attention.self.query.lora_B"]
    seen = []
    for _ in range(8):  # warm-up (5 steps), then linear decay: every group's own lr is scaled
        optimizer.step()
        schedule.step()
        lr_a = next(g["lr"] for g in optimizer.param_groups if any(p is a for p in g["params"]))
        lr_b = next(g["lr"] for g in optimizer.param_groups if any(p is b for p in g["params"]))
        assert lr_b == pytest.approx(RATIO * lr_a)
        seen.append(lr_a)
    assert seen[4] == pytest.approx(LR) and 0 < seen[0] < seen[4] and 0 < seen[-1] < seen[4]
    assert module.method.param_groups(module.model, LR)[1]["lr"] == RATIO * LR


def test_without_a_ratio_the_groups_are_the_two_default_ones(build):
    module = build(module_config(TINY_BERT, CLS))
    assert module.method.param_groups(module.model, LR) is None
    optimizer, _ = fw_optimizer(module)
    assert [(len(g["params"]), g["weight_decay"], g["lr"]) for g in optimizer.param_groups] == [
        (2 * 2 * 2 + 1, WD, LR), (1, 0.0, LR)]  # 2 layers x (query, value) x (A, B) + classifier weight; bias


@pytest.mark.parametrize("ratio", [0, -1.0, "16"])
def test_ratio_must_be_positive(ratio):
    from fw_lora import LoRA

    with pytest.raises(InvalidArgument, match="loraplus_lr_ratio: expected > 0"):
        LoRA(loraplus_lr_ratio=ratio)


class Broken:
    """A method whose ``param_groups`` returns ``groups(model)``."""

    def __init__(self, groups):
        self.groups = groups

    def __call__(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        return self.groups(model)


def lora_params(model: nn.Module, leaf: str) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if n.endswith(leaf)]


@pytest.mark.parametrize(
    "groups,message",
    [
        (lambda m: [{"params": lora_params(m, "lora_A")}], r"LoRA\.param_groups: every trainable parameter .* missing: \['bert\..*lora_B'"),
        (lambda m: [{"params": lora_params(m, "lora_A") + lora_params(m, "lora_B")}, {"params": lora_params(m, "lora_B")[:1]}],
         r"LoRA\.param_groups: 'bert\.encoder\.layer\.0\.attention\.self\.query\.lora_B' is listed twice \(groups 0 and 1\)"),
        (lambda m: [{"params": [nn.Parameter(torch.zeros(2))]}],
         r"LoRA\.param_groups: group 0 lists a tensor of shape \(2,\) that is not a trainable"),
        (lambda m: [{"params": list(m.parameters()), "momentum": 0.9}], r"LoRA\.param_groups: group 0 sets \['momentum'\]"),
        (lambda m: [{"params": [], "lr": -1.0}], r"LoRA\.param_groups: group 0's lr must be a number > 0"),
        (lambda m: [lora_params(m, "lora_A")], r"LoRA\.param_groups: group 0 must be a dict with 'params'"),
    ],
    ids=["missing", "twice", "foreign", "unknown-key", "bad-lr", "not-a-dict"],
)
def test_a_broken_group_list_names_the_method(build, groups, message):
    module = build(module_config(TINY_BERT, CLS))
    module.method.param_groups = Broken(groups)
    with pytest.raises((ValueError, TypeError), match=message):
        fw_optimizer(module)


def test_the_head_may_be_listed_or_left_to_the_core(build):
    module = build(module_config(TINY_BERT, CLS))
    head = list(module.model.classifier.parameters())
    module.method.param_groups = Broken(lambda m: [{"params": lora_params(m, "lora_A") + lora_params(m, "lora_B")},
                                                   {"params": head, "lr": 0.5, "weight_decay": 0.0}])
    optimizer, _ = fw_optimizer(module)
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(8, LR, WD), (2, 0.5, 0.0)]


def test_recipe_option_trains_through_fw_fit(tmp_path: Path, sentiment_csv):
    from framework.cli import main

    recipe = tiny_recipe(tmp_path, sentiment_csv, warmup_ratio=0.0)
    recipe["model"]["method"]["init_args"]["loraplus_lr_ratio"] = RATIO
    recipe["trainer"].update({"max_epochs": None, "max_steps": 2, "limit_val_batches": 0, "num_sanity_val_steps": 0})
    recipe["data"]["init_args"]["data_files"] = {"train": sentiment_csv["train"], "validation": sentiment_csv["validation"]}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["fit", "--config", path]) == 0
    first = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(first, weights_only=True)
    assert checkpoint["hyper_parameters"]["method"]["init_args"]["loraplus_lr_ratio"] == RATIO
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert sorted((len(g["params"]), g["initial_lr"]) for g in groups) == [(1, 0.01), (1, 0.01), (4, 0.01), (4, 0.01 * RATIO)]
    # resuming restores the same groups (torch refuses another structure) and keeps stepping
    assert main(["fit", "--config", path, "--trainer.max_steps", "3", "--ckpt_path", str(first)]) == 0
    resumed = torch.load(tmp_path / "runs" / "tiny" / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 3
    assert [g["initial_lr"] for g in resumed["optimizer_states"][0]["param_groups"]] == [g["initial_lr"] for g in groups]


def test_compose_forwards_each_parts_groups(build):
    """A LoRA+ part inside compose keeps its ratio; the other parts and the head train at lr."""
    parts = [{"class_path": "lora", "init_args": {"r": 2, "targets": ["query"], "loraplus_lr_ratio": RATIO}},
             {"class_path": "lora", "init_args": {"r": 2, "targets": ["value"]}},
             {"class_path": "ia3", "init_args": {"targets": ["key"], "feedforward_targets": []}}]
    config = {**module_config(TINY_BERT, CLS), "method": {"class_path": "compose", "init_args": {"methods": parts}}}
    module = build(config)
    optimizer, _ = fw_optimizer(module)
    lr_of = {id(p): group["initial_lr"] for group in optimizer.param_groups for p in group["params"]}
    params = trainable(module.model)
    assert len(lr_of) == len(params)
    for name, p in params.items():
        boosted = "query.lora_B" in name
        assert lr_of[id(p)] == pytest.approx(RATIO * LR if boosted else LR), name


def test_qlora_takes_the_ratio(build):
    module = build({**module_config(TINY_LLAMA, LM), "method": {"class_path": "qlora", "init_args": {
        "r": 2, "targets": ["q_proj", "v_proj"], "loraplus_lr_ratio": RATIO}}})
    groups = module.method.param_groups(module.model, LR)
    assert groups[1]["lr"] == RATIO * LR and all(n.endswith("lora_B") for n, p in trainable(module.model).items()
                                                   if any(p is q for q in groups[1]["params"]))
    assert len(groups[1]["params"]) == 2 * TINY_LLAMA["num_hidden_layers"]
