"""Several named adapters on one backbone (the ``multi`` method): mixed-adapter batches give
each example what its adapter alone gives, ``__base__`` rows give the base model's outputs,
named adapters save and load on their own (fw and PEFT formats), training on a mixed batch
touches only the adapters whose examples are in it, and what cannot be routed is refused
with one line."""

from __future__ import annotations

import csv
from typing import Any

import pytest
import torch
from conftest import TINY_BERT, TINY_LLAMA, TOKENIZER, padded_ids, perturb_trainable, sentiment_rows
from fw_multi import MultiAdapter, MultiAdapterLayer, RoutedClassificationData

from framework.errors import FieldError
from framework.formats.source import read_adapter

TOLERANCE = 1e-5
ROUTES = ["sst", "news", "__base__", "sst", "extra", "news"]


def method(adapters: dict[str, Any], **args: Any) -> dict[str, Any]:
    return {"class_path": "multi", "init_args": {"adapters": adapters, **args}}


def recipe(config: dict[str, Any], adapters: dict[str, Any], **args: Any) -> dict[str, Any]:
    """A tiny model with named adapters; the head stays the base's (``__base__`` rows are the base model)."""
    return {"backbone": {"config": config, "tokenizer": TOKENIZER}, "method": method(adapters, **args), "train_head": False}


def single(config: dict[str, Any], part: dict[str, Any] | None) -> dict[str, Any]:
    return {"backbone": {"config": config, "tokenizer": TOKENIZER}, "method": part, "train_head": False}


LORA = {"class_path": "lora", "init_args": {"r": 8}}
IA3 = {"class_path": "ia3"}
#: a LoRA on other targets, and a third kind (a wrapper multi runs on its own rows)
PARTS = {
    "bert": {"sst": LORA, "news": IA3, "extra": {"class_path": "pfeiffer", "init_args": {"bottleneck_size": 4}}},
    "llama": {"sst": LORA, "news": IA3, "extra": {"class_path": "lora", "init_args": {"r": 4, "targets": ["o_proj", "up_proj"]}}},
}
CONFIGS = {"bert": TINY_BERT, "llama": TINY_LLAMA}


def logits(module, batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return module.model(**batch, **kwargs).logits


def rows(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i : i + 1] for k, v in batch.items()}


def as_single(build, config, name: str, module, parts) -> Any:
    """A single-method module of adapter ``name`` (same base seed) holding ``module``'s weights."""
    alone = build(single(config, parts[name]), seed=0).eval()
    alone.method.load_stored_state_dict(alone.model, module.method.adapter_state_dict(module.model, name))
    return alone


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_mixed_batch_rows_equal_each_example_alone_with_its_adapter(build, arch):
    config, parts = CONFIGS[arch], PARTS[arch]
    module = perturb_trainable(build(recipe(config, parts), seed=0))
    batch = padded_ids(len(ROUTES), 9)
    mixed = logits(module, batch, adapter_names=ROUTES)
    with module.method.routed(module.model, ROUTES), torch.no_grad():
        assert torch.equal(module.model(**batch).logits, mixed)  # the context and the keyword route alike
    base = build(single(config, None), seed=0).eval()
    singles = {name: as_single(build, config, name, module, parts) for name in parts}
    for i, name in enumerate(ROUTES):
        one = rows(batch, i)
        expected = logits(base if name == "__base__" else singles[name], one)
        module.method.set_active([] if name == "__base__" else [name])
        assert (logits(module, one) - expected).abs().max() <= TOLERANCE, name
        assert (mixed[i : i + 1] - expected).abs().max() <= TOLERANCE, (arch, name)
    assert (mixed[0] - mixed[2]).abs().max() > 1e-3  # the adapters matter


@pytest.mark.parametrize("part", [{"class_path": "vera", "init_args": {"r": 16}},
                                  {"class_path": "houlsby", "init_args": {"bottleneck_size": 4}}], ids=["vera", "houlsby"])
def test_other_wrappers_run_on_their_own_rows_of_a_mixed_batch(build, part):
    module = perturb_trainable(build(recipe(TINY_BERT, {"sst": LORA, "x": part}), seed=0))
    alone = as_single(build, TINY_BERT, "x", module, {"x": part})
    batch = padded_ids(4, 9)
    mixed = logits(module, batch, adapter_names=["x", "sst", "__base__", "x"])
    assert (mixed[[0, 3]] - logits(alone, batch)[[0, 3]]).abs().max() <= TOLERANCE


def test_indices_route_like_names_and_a_uniform_batch_is_the_adapter_alone(build):
    module = perturb_trainable(build(recipe(TINY_BERT, PARTS["bert"]), seed=0))
    batch = padded_ids(len(ROUTES), 9)
    index = {"sst": 0, "news": 1, "extra": 2, "__base__": -1}
    by_name = logits(module, batch, adapter_names=ROUTES)
    by_index = logits(module, batch, adapter_names=torch.tensor([index[r] for r in ROUTES]))
    assert torch.equal(by_name, by_index)
    module.method.set_active("news")
    assert torch.equal(logits(module, batch, adapter_names=["news"] * len(ROUTES)), logits(module, batch))


def test_recipe_counts_are_the_sum_of_the_adapters_and_the_tree_names_them(build):
    module = build(recipe(TINY_BERT, {"sst": LORA, "news": IA3}))
    lora = build(single(TINY_BERT, LORA)).param_counts()
    ia3 = build(single(TINY_BERT, IA3)).param_counts()
    counts = module.param_counts()
    assert counts.method_params == lora.method_params + ia3.method_params
    assert counts.stored_params == lora.stored_params + ia3.stored_params
    value = module.method.modified_modules["bert.encoder.layer.0.attention.self.value"]
    assert value.startswith("sst: LoRA r=8") and "; news: IA³ output scale" in value
    assert isinstance(module.model.get_submodule("bert.encoder.layer.0.attention.self.value"), MultiAdapterLayer)
    assert module.method.active_adapters == ["sst"]  # the first adapter by default


def test_several_active_loras_add_up_like_one_lora_of_the_summed_rank(build):
    two = {"a": {"class_path": "lora", "init_args": {"r": 4, "alpha": 8}},
           "b": {"class_path": "lora", "init_args": {"r": 4, "alpha": 8}}}
    module = perturb_trainable(build(recipe(TINY_BERT, two, active=["a", "b"]), seed=0))
    joined = build(single(TINY_BERT, {"class_path": "lora", "init_args": {"r": 8, "alpha": 16}}), seed=0).eval()
    a, b = (module.method.adapter_state_dict(module.model, n) for n in "ab")
    state = {}
    for key in a:
        dim = 1 if key.endswith("lora_B") else 0
        state[key] = torch.cat([a[key], b[key]], dim) if key.endswith(("lora_A", "lora_B")) else a[key]
    joined.method.load_stored_state_dict(joined.model, state)
    batch = padded_ids(3, 9)
    assert (logits(module, batch) - logits(joined, batch)).abs().max() <= TOLERANCE
    module.method.set_active([])
    base = build(single(TINY_BERT, None), seed=0).eval()
    assert (logits(module, batch) - logits(base, batch)).abs().max() <= TOLERANCE


def test_each_adapter_saves_alone_and_loads_back_from_fw_and_peft_folders(build, tmp_path):
    parts = {"sst": LORA, "news": IA3}
    module = perturb_trainable(build(recipe(TINY_BERT, parts), seed=0))
    routes = [r for r in ROUTES if r != "extra"]
    batch = padded_ids(len(routes), 9)
    expected = logits(module, batch, adapter_names=routes)
    for name in parts:
        for fmt in ("fw", "peft"):
            module.method.save_adapter(module, name, tmp_path / f"{name}-{fmt}", format=fmt)
    # a saved adapter is a single-method adapter: fw's own loader reads it into a plain LoRA / IA³ run
    for name, part in parts.items():
        alone = build(single(TINY_BERT, part), seed=0).eval()
        read_adapter(tmp_path / f"{name}-fw").load_into(alone)
        module.method.set_active(name)
        assert (logits(alone, batch) - logits(module, batch)).abs().max() <= TOLERANCE
    for fmt in ("fw", "peft"):
        # into the same adapters of a fresh module, and under new names into a module with one adapter
        fresh = build(recipe(TINY_BERT, parts), seed=0).eval()  # same base, fresh adapters
        grown = build(recipe(TINY_BERT, {"sst": LORA}), seed=0).eval()
        for name in parts:
            fresh.method.load_adapter(fresh, name, tmp_path / f"{name}-{fmt}")
            grown.method.load_adapter(grown, f"{name}2", tmp_path / f"{name}-{fmt}")
        assert (logits(fresh, batch, adapter_names=routes) - expected).abs().max() <= TOLERANCE, fmt
        renamed = [r if r == "__base__" else f"{r}2" for r in routes]
        assert (logits(grown, batch, adapter_names=renamed) - expected).abs().max() <= TOLERANCE, fmt
        assert grown.method.names == ["sst", "sst2", "news2"]


def test_a_folder_of_another_method_is_refused_for_an_existing_adapter(build, tmp_path):
    module = build(recipe(TINY_BERT, {"sst": LORA, "news": IA3}))
    module.method.save_adapter(module, "news", tmp_path / "news")
    with pytest.raises(ValueError, match="holds a IA3 adapter but adapter 'sst' is a LoRA"):
        module.method.load_adapter(module, "sst", tmp_path / "news")


def test_peft_mixed_batch_inference_gives_fws_logits(build, tmp_path, tiny_bert_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    parts = {"sst": LORA, "news": {"class_path": "lora", "init_args": {"r": 4, "targets": ["key", "value", "dense"]}}}
    # the head trains (PEFT's SEQ_CLS adapters carry one), shared: each adapter's folder holds the same
    config = {"backbone": {"name_or_path": tiny_bert_dir, "tokenizer": TOKENIZER}, "method": method(parts)}
    module = perturb_trainable(build(config, seed=0))
    for name in parts:
        module.method.save_adapter(module, name, tmp_path / name, format="peft")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "sst"), adapter_name="sst")
    model.load_adapter(str(tmp_path / "news"), adapter_name="news")
    model.eval()
    routes = ["sst", "news", "news", "sst"]  # (PEFT's base rows read the base head, fw's the shared trained one)
    batch = padded_ids(len(routes), 9)
    with torch.no_grad():
        theirs = model(**batch, adapter_names=routes).logits
    assert (theirs - logits(module, batch, adapter_names=routes)).abs().max() <= TOLERANCE


def test_training_on_a_mixed_batch_touches_only_the_adapters_in_it(build):
    parts = {"sst": LORA, "news": IA3, "extra": {"class_path": "lora", "init_args": {"r": 2}}}
    module = build(recipe(TINY_BERT, parts), seed=0)
    module.train()
    batch = {**padded_ids(4, 9), "labels": torch.tensor([0, 1, 1, 0]), "adapter": ["sst", "__base__", "news", "sst"]}
    inputs, routing = module._routed(batch)  # what the core's steps do: the column out, the forward routed
    assert "adapter" not in inputs and "adapter" in batch
    with routing:
        loss, _ = module.task.step(module.model, inputs)
    loss.backward()
    grads = {name: [] for name in parts}
    for key, p in module.model.named_parameters():
        if p.requires_grad and ".adapters." in key:
            grads[key.split(".adapters.")[1].split(".")[0]].append(p.grad)
    assert all(g is not None and g.abs().sum() > 0 for g in grads["news"])
    assert any(g is not None and g.abs().sum() > 0 for g in grads["sst"])  # B starts at zero: A's gradient is zero
    assert grads["extra"] and all(g is None for g in grads["extra"])  # no example: no gradient at all

    # an optimizer step leaves the absent adapter bitwise equal
    before = {k: p.detach().clone() for k, p in module.model.named_parameters() if ".adapters.extra." in k}
    optimizer = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    optimizer.step()
    assert all(torch.equal(p, before[k]) for k, p in module.model.named_parameters() if k in before)


def test_training_two_adapters_together_equals_training_each_alone(build):
    """Disjoint adapters do not interact: SGD on mixed batches gives each adapter the weights
    of training it alone on its own rows (its loss weighted by its share of the batch, since
    the task's loss is the batch mean)."""
    quiet = {**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    parts = {"sst": {"class_path": "lora", "init_args": {"r": 4}}, "news": IA3}
    module = build(recipe(quiet, parts), seed=0)
    perturb_trainable(module)  # B != 0: every LoRA weight gets a gradient from the start
    alone = {name: as_single(build, quiet, name, module, parts) for name in parts}
    start = {name: {k: v.clone() for k, v in module.method.adapter_state_dict(module.model, name).items()} for name in parts}
    modules = [module, *alone.values()]
    optimizers = [torch.optim.SGD([p for p in m.model.parameters() if p.requires_grad], lr=0.5) for m in modules]
    for m in modules:
        m.train()
    routes = ["sst", "news", "__base__", "news", "sst", "sst"]
    for step in range(4):
        ids = padded_ids(6, 9, seed=step)
        batch = {**ids, "labels": torch.tensor([0, 1, 1, 0, 1, step % 2]), "adapter": routes}
        inputs, routing = module._routed(batch)
        with routing:
            module.task.step(module.model, inputs)[0].backward()
        for name, single_module in alone.items():
            picked = [i for i, r in enumerate(routes) if r == name]
            own = {k: v[picked] for k, v in inputs.items()}
            (single_module.task.step(single_module.model, own)[0] * len(picked) / len(routes)).backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    for name, single_module in alone.items():
        together = module.method.adapter_state_dict(module.model, name)
        separate = single_module.method.stored_state_dict(single_module.model)
        assert together.keys() == separate.keys()
        assert all(not torch.equal(together[k], start[name][k]) for k in together)  # every weight trained
        for key in together:
            torch.testing.assert_close(together[key], separate[key], rtol=1e-5, atol=1e-6)


def test_a_fit_on_routed_data_trains_each_adapter_on_its_rows(build, tmp_path):
    from helpers import trainer

    path = tmp_path / "train.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label", "adapter"])
        writer.writeheader()
        for i, row in enumerate(sentiment_rows(96)):
            writer.writerow({"text": row["text"], "label": row["label"], "adapter": ["sst", "news", "__base__"][i % 3]})
    files = {"train": str(path), "validation": str(path), "test": str(path)}
    data = RoutedClassificationData(data_files=files, batch_size=12)
    module = build({**recipe(TINY_BERT, {"sst": LORA, "news": IA3, "idle": {"class_path": "lora", "init_args": {"r": 2}}}),
                    "learning_rate": 0.01, "train_head": False}, seed=0)
    start = {k: p.detach().clone() for k, p in module.model.named_parameters() if p.requires_grad}
    trainer(tmp_path, 4).fit(module, datamodule=data)
    moved = {k for k, p in module.model.named_parameters() if k in start and not torch.equal(p, start[k])}
    assert any(".adapters.sst.lora_B" in k for k in moved) and any(".adapters.news." in k for k in moved)
    assert not any(".adapters.idle." in k for k in moved)
    test = trainer(tmp_path, 1).test(module, datamodule=data, verbose=False)
    assert "test/accuracy" in test[0]


@pytest.mark.parametrize(
    ("part", "message"),
    [
        ({"class_path": "prefix", "init_args": {"prefix_length": 2}}, "without wrapping it"),
        ({"class_path": "bitfit"}, "BitFit changes 'bert.embeddings.LayerNorm' without wrapping it"),
        ({"class_path": "fisher"}, "writes its own checkpoint format"),
        ({"class_path": "parallel_adapter"}, "parallel=true reads another module's input"),
    ],
)
def test_methods_that_cannot_be_routed_are_refused_with_one_line(build, part, message):
    with pytest.raises(Exception, match=message) as info:
        build(recipe(TINY_BERT, {"sst": LORA, "other": part}))
    assert "\n" not in str(info.value) and "adapters.other" in str(info.value)


def test_bad_routes_and_stacking_are_refused_with_one_line(build):
    module = build(recipe(TINY_BERT, PARTS["bert"]))
    module.eval()
    batch = padded_ids(2, 9)
    with pytest.raises(FieldError, match="unknown adapter 'nope' in the routing column; adapters: sst, news, extra"):
        logits(module, batch, adapter_names=["sst", "nope"])
    with pytest.raises(FieldError, match="unknown adapter 7"):
        logits(module, batch, adapter_names=torch.tensor([0, 7]))
    with pytest.raises(RuntimeError, match="sees 3 rows but the batch routes 2"):
        logits(module, padded_ids(3, 9), adapter_names=["sst", "news"])
    module.method.set_active(["sst", "extra"])  # different layers: both apply
    logits(module, batch)
    module.method.set_active(["news", "extra"])  # both on the FFN's output projection
    with pytest.raises(RuntimeError, match="extra .SerialAdapter. cannot be stacked with others on one layer"):
        logits(module, batch)
    with pytest.raises(FieldError, match="unknown adapter"):  # through the core's step
        module.predict_step({**batch, "adapter": ["sst", "nope"]}, 0)
    with pytest.raises(ValueError, match="active: unknown adapter 'nope'"):
        module.method.set_active("nope")
    with pytest.raises(Exception, match="adapter names must be non-empty"):
        build(recipe(TINY_BERT, {"__base__": LORA}))
    module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module.train()
    with pytest.raises(FieldError, match="model.gradient_checkpointing: .* cannot be trained"):
        module.model(**batch, adapter_names=["sst", "news"])
    with pytest.raises(FieldError, match="model.gradient_checkpointing: .* cannot be trained"):
        with module.method.routed(module.model, ["sst", "news"]):
            pass


def test_the_whole_multi_exports_to_an_fw_folder_that_rebuilds_it_and_has_no_peft_form(build, tmp_path):
    from framework.formats.fw import write_fw_adapter
    from framework.formats.source import updated
    from framework.method import ExportNotSupportedError

    config = recipe(TINY_BERT, {"sst": LORA, "news": IA3}, active=["news"], head_classes={"sst": [0, 1]})
    module = perturb_trainable(build(config, seed=0))
    write_fw_adapter(module, tmp_path)
    adapter = read_adapter(tmp_path)
    fresh = build(updated(config, adapter.model_update(config)), seed=0).eval()
    adapter.load_into(fresh)
    assert fresh.method.active_adapters == ["news"] and fresh.method.head_classes == {"sst": [0, 1]}
    batch = padded_ids(3, 9)
    routes = ["news", "sst", "__base__"]
    assert torch.equal(logits(fresh, batch, adapter_names=routes), logits(module, batch, adapter_names=routes))
    assert torch.equal(logits(fresh, batch), logits(module, batch))
    with pytest.raises(ExportNotSupportedError, match="save each named adapter on its own"):
        module.method.to_peft(module.model)
    assert isinstance(module.method, MultiAdapter)


def _task_files(tmp_path) -> dict[str, str]:
    """Two local tasks: the synthetic sentiment rows (2 classes) and a 3-class topic task."""
    sentiment, topic = tmp_path / "sentiment.csv", tmp_path / "topic.jsonl"
    with sentiment.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows({"text": r["text"], "label": r["label"]} for r in sentiment_rows(60))
    words = {"sport": "goal match team", "tech": "chip software phone", "arts": "film music stage"}
    import json

    with topic.open("w") as f:
        for i in range(60):
            label = sorted(words)[i % 3]
            f.write(json.dumps({"text": f"news about the {words[label].split()[i % 3]} today", "label": label}) + "\n")
    return {"sst": str(sentiment), "topic": str(topic)}


def test_multitask_data_joins_label_spaces_and_the_head_is_one_per_adapter(build, tmp_path):
    from fw_multi import AdapterMetrics, MultiTaskData
    from helpers import trainer

    data = MultiTaskData(tasks=_task_files(tmp_path), batch_size=16, validation_fraction=0.2, test_fraction=0.2)
    assert data.label_names == ["sst:0", "sst:1", "topic:arts", "topic:sport", "topic:tech"]
    assert data.head_classes == {"sst": [0, 1], "topic": [2, 3, 4]}
    raw = data.load_raw()
    assert set(raw["train"]["adapter"]) == {"sst", "topic"} and max(raw["train"]["label"]) == 4
    config = {**recipe(TINY_BERT, {"sst": LORA, "topic": IA3}, head_classes=data.head_classes), "train_head": True,
              "task": {"class_path": "Classification", "init_args": {"num_labels": 5}}, "learning_rate": 0.01}
    module = build(config, seed=0)
    batch = padded_ids(3, 9)
    out = logits(module.eval(), batch, adapter_names=["sst", "topic", "__base__"])
    lowest = torch.finfo(out.dtype).min
    assert (out[0, 2:] == lowest).all() and (out[0, :2] > lowest).all()
    assert (out[1, :2] == lowest).all() and (out[1, 2:] > lowest).all()
    assert (out[2] > lowest).all()  # the base model reads every output
    module.method.set_active("topic")
    assert (logits(module, batch)[:, :2] == lowest).all()

    run = trainer(tmp_path, 6, AdapterMetrics())
    run.fit(module.train(), datamodule=data)
    results = run.test(module, datamodule=data, verbose=False)[0]
    assert {"test/accuracy", "test/sst/accuracy", "test/topic/accuracy"} <= set(results)
    assert all(0.0 <= results[k] <= 1.0 for k in results if k.endswith("accuracy"))


def test_bad_head_classes_are_refused(build):
    with pytest.raises(Exception, match="head_classes: no adapter named 'x'"):
        build(recipe(TINY_BERT, {"sst": LORA}, head_classes={"x": [0]}))
    module = build(recipe(TINY_BERT, {"sst": LORA}, head_classes={"sst": [0, 5]}))
    with pytest.raises(ValueError, match="class 5 is past the head's 2 outputs"):
        logits(module.eval(), padded_ids(2, 9))


def test_generation_routes_every_decoding_step(build):
    config = {**recipe(TINY_LLAMA, {"a": LORA, "b": IA3}), "task": {"class_path": "CausalLM", "init_args": {"max_new_tokens": 5}}}
    module = perturb_trainable(build(config, seed=0), scale=0.5)
    ids = torch.randint(1000, 2000, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as generation batches are
    batch = {"prompt_input_ids": ids, "prompt_attention_mask": mask}
    routes = ["a", "b", "__base__"]
    with torch.no_grad():
        mixed = [r["generated"] for r in module.predict_step({**batch, "adapter": routes}, 0)]
        alone = []
        for i, name in enumerate(routes):
            module.method.set_active([] if name == "__base__" else name)
            alone.append(module.predict_step({k: v[i : i + 1] for k, v in batch.items()}, 0)[0]["generated"])
    assert mixed == alone and len(set(mixed)) == 3


# -- prompt tuning and P-tuning adapters: per-example virtual tokens ---------------------------

PROMPTS = {
    "p1": {"class_path": "prompt", "init_args": {"num_virtual_tokens": 3}},
    "p2": {"class_path": "ptuning", "init_args": {"num_virtual_tokens": 3}},
    "p3": {"class_path": "prompt", "init_args": {"num_virtual_tokens": 3, "init": "random"}},
    "lora": LORA,
    "ia3": IA3,
}
#: prompt rows, and rows without virtual tokens (filler in front, masked out)
PROMPT_ROUTES = ["p1", "__base__", "p2", "lora", "p3", "ia3", "p1"]
CAUSAL = {"class_path": "CausalLM", "init_args": {"max_new_tokens": 4}}


def prompt_recipe(arch: str, parts: dict[str, Any] | None = None, **args: Any) -> dict[str, Any]:
    config = recipe(CONFIGS[arch], parts or PROMPTS, **args)
    return {**config, "task": CAUSAL} if arch == "llama" else config


def prompt_single(arch: str, name: str) -> dict[str, Any]:
    config = single(CONFIGS[arch], PROMPTS.get(name))  # __base__: no method
    return {**config, "task": CAUSAL} if arch == "llama" else config


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_mixed_prompt_batch_rows_equal_each_example_alone_with_its_adapter(build, arch):
    module = perturb_trainable(build(prompt_recipe(arch), seed=0))
    assert {n.split(".")[1] for n, p in module.model.named_parameters() if n.startswith("prompt_encoder.")} == {"p1", "p2", "p3"}
    batch = padded_ids(len(PROMPT_ROUTES), 9)
    mixed = logits(module, batch, adapter_names=PROMPT_ROUTES)
    n = len(PROMPT_ROUTES)
    assert mixed.shape[:2] == ((n, 9) if arch == "llama" else (n, 2))  # the virtual positions are dropped
    for i, name in enumerate(PROMPT_ROUTES):
        alone = build(prompt_single(arch, name), seed=0).eval()
        if name != "__base__":
            alone.method.load_stored_state_dict(alone.model, module.method.adapter_state_dict(module.model, name))
        expected = logits(alone, rows(batch, i))
        assert (mixed[i : i + 1] - expected).abs().max() <= TOLERANCE, (arch, name)
        module.method.set_active([] if name == "__base__" else name)  # a uniform batch: the adapter alone
        assert torch.equal(logits(module, rows(batch, i)), logits(module, rows(batch, i), adapter_names=[name]))
        assert (logits(module, rows(batch, i)) - expected).abs().max() <= TOLERANCE, (arch, name)
    assert (mixed[0] - mixed[2]).abs().max() > 1e-3 and (mixed[0] - mixed[1]).abs().max() > 1e-3  # the adapters matter
    # one prompt stacks with a LoRA when both are active
    module.method.set_active(["p1", "lora"])
    assert (logits(module, batch) - logits(module, batch, adapter_names=["p1"] * n)).abs().max() > 1e-4


def test_generation_with_a_mixed_prompt_batch_gives_each_example_its_adapters_text(build):
    module = perturb_trainable(build(prompt_recipe("llama"), seed=0), scale=0.5)
    routes = ["p1", "p2", "__base__", "lora"]
    ids = torch.randint(1000, 2000, (4, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :1] = 0  # left padding, as generation batches are
    batch = {"prompt_input_ids": ids, "prompt_attention_mask": mask}
    with torch.no_grad():
        mixed = [r["generated"] for r in module.predict_step({**batch, "adapter": routes}, 0)]
        alone = []
        for i, name in enumerate(routes):
            module.method.set_active([] if name == "__base__" else name)
            alone.append(module.predict_step({k: v[i : i + 1] for k, v in batch.items()}, 0)[0]["generated"])
    assert mixed == alone and len(set(mixed)) == 4


def test_training_on_a_mixed_prompt_batch_touches_only_the_prompts_in_it(build):
    module = build(prompt_recipe("bert"), seed=0)
    module.train()
    batch = {**padded_ids(5, 9), "labels": torch.tensor([0, 1, 1, 0, 1]), "adapter": ["p1", "p2", "__base__", "p1", "lora"]}
    inputs, routing = module._routed(batch)
    with routing:
        loss, _ = module.task.step(module.model, inputs)
    loss.backward()
    grads = {name: [p.grad for n, p in module.model.named_parameters() if n.startswith(f"prompt_encoder.{name}.")]
             for name in ("p1", "p2", "p3")}
    assert all(g is not None and g.abs().sum() > 0 for name in ("p1", "p2") for g in grads[name])
    assert grads["p3"] and all(g is None for g in grads["p3"])  # no example: no gradient at all
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.model.named_parameters() if ".adapters.lora." in n)
    assert all(p.grad is None for n, p in module.model.named_parameters() if ".adapters.ia3." in n)


def test_a_prompt_adapter_saves_alone_and_loads_back_from_fw_and_peft_folders(build, tmp_path):
    module = perturb_trainable(build(prompt_recipe("bert"), seed=0))
    batch = padded_ids(3, 9)
    for name in ("p1", "p2"):
        for fmt in ("fw", "peft"):
            folder = tmp_path / f"{name}-{fmt}"
            module.method.save_adapter(module, name, folder, format=fmt)
            expected = logits(module, batch, adapter_names=[name] * 3)
            alone = build(single(TINY_BERT, PROMPTS[name]), seed=0).eval()
            read_adapter(folder).load_into(alone)
            assert (logits(alone, batch) - expected).abs().max() <= TOLERANCE, (name, fmt)
            other = build(recipe(TINY_BERT, {"lora": LORA, name: PROMPTS[name]}), seed=0).eval()  # the same base head
            assert (logits(other, batch, adapter_names=[name] * 3) - expected).abs().max() > 1e-4  # not loaded yet
            other.method.load_adapter(other, name, folder)  # into an existing adapter
            other.method.load_adapter(other, "again", folder)  # under a new name
            for route in (name, "again"):
                assert (logits(other, batch, adapter_names=[route] * 3) - expected).abs().max() <= TOLERANCE, (name, fmt)
            assert (logits(other, batch, adapter_names=[name, "again", name]) - expected).abs().max() <= TOLERANCE


def test_prompt_adapters_refuse_what_cannot_mix_with_one_line(build):
    from conftest import TINY_T5

    from framework.data.instruction import prepends_positions

    module = build(prompt_recipe("bert"), seed=0).eval()
    assert prepends_positions(module.method) and not prepends_positions(build(recipe(TINY_BERT, {"lora": LORA})).method)
    batch = padded_ids(3, 9)
    module.method.set_active(["p1", "p3"])
    with pytest.raises(FieldError, match="prompt adapters p1, p3 are active together"):
        logits(module, batch)
    longer = {**PROMPTS, "p4": {"class_path": "prompt", "init_args": {"num_virtual_tokens": 5}}}
    with pytest.raises(Exception, match="adapters.p4.num_virtual_tokens: 5 here but 3 for prompt adapter 'p1'") as info:
        build(recipe(TINY_BERT, longer))
    assert "\n" not in str(info.value)
    roberta = {**TINY_BERT, "model_type": "roberta", "max_position_embeddings": 130, "pad_token_id": 1}
    module = build(recipe(roberta, {"p1": PROMPTS["p1"]}), seed=0).eval()
    logits(module, batch, adapter_names=["p1", "p1", "p1"])  # prompt rows only: fine
    with pytest.raises(FieldError, match="rows to prompt adapter 'p1' and rows to '__base__'.*padding index") as info:
        logits(module, batch, adapter_names=["p1", "__base__", "p1"])
    assert "\n" not in str(info.value)
    seq2seq = {**recipe(TINY_T5, {"p1": PROMPTS["p1"]}), "task": {"class_path": "Seq2SeqLM"}}
    with pytest.raises(Exception, match="adapters.p1: PromptTuning inside multi needs a decoder-only or encoder-only") as info:
        build(seq2seq)
    assert "\n" not in str(info.value)


def test_prompt_adapters_prepare_on_their_own_view_and_the_whole_multi_round_trips(build, tmp_path):
    from framework.formats.fw import write_fw_adapter
    from framework.formats.source import updated

    text = {"class_path": "prompt", "init_args": {"num_virtual_tokens": 3, "init": "text", "init_text": "great movie"}}
    config = recipe(TINY_BERT, {"lora": LORA, "t": text, "p2": PROMPTS["p2"]})
    module = build(config, seed=0)
    module.method.prepare(module.prepare_context(None))  # init: text, as the core calls it before fitting
    ids = module.tokenizer("great movie", add_special_tokens=False)["input_ids"]
    words = module.model.get_input_embeddings().weight
    assert torch.equal(module.model.prompt_encoder["t"].embedding.weight, words[torch.tensor([*ids, ids[0]])])
    module = perturb_trainable(module)
    write_fw_adapter(module, tmp_path)  # a training checkpoint's form: every adapter
    adapter = read_adapter(tmp_path)
    fresh = build(updated(config, adapter.model_update(config)), seed=0).eval()
    adapter.load_into(fresh)
    batch = padded_ids(4, 9)
    routes = ["t", "__base__", "p2", "lora"]
    assert torch.equal(logits(fresh, batch, adapter_names=routes), logits(module, batch, adapter_names=routes))
