"""QLoRA (fw_qlora): 4-bit NF4 layers, what stays in full precision, parameter counts, training
on a tiny Llama (causal LM) and a tiny BERT (classification), frozen 4-bit weights, merging to
a plain 16-bit model, adapter-only checkpoints, paged-optimizer fallback, errors, the benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT, TINY_GPT2, TINY_LLAMA, TOKENIZER, lora_recipe, write_recipe
from helpers import LossRecorder, classification_data, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from framework.data import InstructionData
from framework.method import MergeNotSupportedError

bnb = pytest.importorskip("bitsandbytes")
from fw_lora import LoRALinear  # noqa: E402
from fw_qlora import QLoRA, QLoRALinear, QuantizationError, dequantize_weight, merged_model, resolve_compute_dtype  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def qlora_recipe(backbone: dict, task: str | None = None, **method_args) -> dict:
    recipe = {
        "backbone": {"config": backbone, "tokenizer": TOKENIZER},
        "method": {"class_path": "qlora", "init_args": method_args},
    }
    if task:
        recipe["task"] = {"class_path": task}
    return recipe


def four_bit_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _randomize_lora(model: nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.normal_(0, 0.5)


# -- what is quantized and what is not ------------------------------------------------------


def test_backbone_linears_are_nf4_double_quant_and_head_embeddings_norms_are_not(build):
    module = build(qlora_recipe(TINY_LLAMA, "CausalLM"))
    model = module.model
    quantized = four_bit_layers(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    # every Linear but the LM head is 4-bit, and each is wrapped by fw_lora's layer
    assert len(quantized) == 7 * TINY_LLAMA["num_hidden_layers"]
    assert set(linears) - set(quantized) == {"lm_head"}
    for name, layer in quantized.items():
        assert name.endswith(".base_layer") and isinstance(model.get_submodule(name[: -len(".base_layer")]), QLoRALinear)
        assert isinstance(layer.weight, bnb.nn.Params4bit) and layer.weight.dtype == torch.uint8
        state = layer.weight.quant_state
        assert state.quant_type == "nf4" and state.blocksize == 64
        assert state.nested, "double quantization: the block scales are quantized too"
        assert layer.compute_dtype == resolve_compute_dtype("auto")  # float32 on a CPU-only machine
        assert not layer.weight.requires_grad
    assert resolve_compute_dtype("auto") == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.dtype == torch.float32
    assert type(model.model.embed_tokens) is nn.Embedding and model.model.embed_tokens.weight.dtype == torch.float32
    for name, param in model.named_parameters():
        if "norm" in name:
            assert param.dtype == torch.float32 and not param.requires_grad
    # preparation for k-bit training
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert model._require_grads_hooks, "frozen embeddings' outputs must require grad under checkpointing"


def test_quantization_options_single_quant_fp4_and_compute_dtype(build):
    module = build(qlora_recipe(TINY_LLAMA, "CausalLM", double_quant=False, quant_type="fp4", compute_dtype="bfloat16", dtype="compute"))
    layer = module.model.get_submodule("model.layers.0.mlp.down_proj")
    state = layer.base_layer.weight.quant_state
    assert state.quant_type == "fp4" and not state.nested
    assert layer.base_layer.compute_dtype == torch.bfloat16 and layer.lora_A.dtype == torch.bfloat16
    out = module.model(input_ids=torch.randint(1000, 2000, (2, 6))).logits
    out.float().sum().backward()
    assert layer.lora_B.grad is not None


def test_classification_head_trains_in_full_precision_and_is_never_quantized(build):
    module = build(qlora_recipe(TINY_LLAMA))  # Classification: LlamaForSequenceClassification, head `score`
    model = module.model
    assert "score" not in {n.split(".")[0] for n in four_bit_layers(model)}
    assert type(model.score) is nn.Linear and model.score.weight.dtype == torch.float32 and model.score.weight.requires_grad
    assert module.param_counts().head_params == TINY_LLAMA["hidden_size"] * 2
    # a 16-bit backbone: norms and the small head go to float32, the embeddings stay 16-bit
    recipe = qlora_recipe(TINY_LLAMA)
    recipe["backbone"]["dtype"] = "bfloat16"
    half = build(recipe).model
    assert half.score.weight.dtype == torch.float32
    assert half.model.norm.weight.dtype == torch.float32
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert four_bit_layers(half)["model.layers.0.self_attn.q_proj.base_layer"].weight.quant_state.dtype == torch.bfloat16
    logits = half(input_ids=torch.randint(1000, 2000, (2, 5))).logits  # no dtype clash without autocast
    logits.float().sum().backward()
    assert half.score.weight.grad is not None


def test_counts_equal_loras_on_the_same_targets(build):
    for config, task in ((TINY_LLAMA, "CausalLM"), (TINY_BERT, None)):
        lora_cfg = lora_recipe(config, r=8, targets=["all-linear"])
        if task:
            lora_cfg["task"] = {"class_path": task}
        lora = build(lora_cfg).param_counts()
        qlora = build(qlora_recipe(config, task, r=8)).param_counts()
        assert qlora == lora, (qlora, lora)  # 4-bit weights count by their unpacked size
        assert qlora.method_params > 0 and qlora.stored_params == qlora.method_params


def test_gpt2_conv1d_layers_quantize_and_merge_back_to_conv1d(build):
    from transformers.pytorch_utils import Conv1D

    module = build(qlora_recipe(TINY_GPT2, "CausalLM", targets=["c_attn"], compute_dtype="float32"))
    model = module.model
    assert len(four_bit_layers(model)) == 4 * TINY_GPT2["n_layer"]  # c_attn, c_proj (attn, mlp), c_fc
    _randomize_lora(model)
    model.eval()
    ids = torch.randint(1000, 2000, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        plain = merged_model(model, torch.float32)
        after = plain(input_ids=ids).logits
    assert isinstance(plain.transformer.h[0].attn.c_attn, Conv1D)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()


# -- merging ---------------------------------------------------------------------------------


def test_merged_16bit_model_matches_the_quantized_lora_model(build):
    module = build(qlora_recipe(TINY_LLAMA, "CausalLM", r=4, compute_dtype="float32"))
    model = module.model.eval()
    ids = torch.randint(1000, 2000, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=ids).logits  # B = 0: the 4-bit base alone
        _randomize_lora(model)
        reference = model(input_ids=ids).logits
        assert (reference - base).abs().max() > 0.1 * base.abs().max(), "the adapter must matter for this test"
        plain = merged_model(model, torch.bfloat16)
        merged = plain(input_ids=ids).logits.float()
    assert not any(isinstance(m, (LoRALinear, bnb.nn.Linear4bit)) for m in plain.modules())
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    assert set(plain.state_dict()) == set(type(plain)(plain.config).state_dict())
    # bf16 keeps ~3 significant digits of every weight and activation: measured over 6 seeds,
    # mean error 1.8-3.0 % of the mean |logit| and cosine >= 0.999, while the (deliberately
    # large) adapter moves the logits by ~130 % of that mean
    error = (merged - reference).abs().mean() / reference.abs().mean()
    effect = (reference - base).abs().mean() / reference.abs().mean()
    assert error <= 0.05 and error <= effect / 20, (float(error), float(effect))
    assert nn.functional.cosine_similarity(merged.flatten(), reference.flatten(), dim=0) >= 0.998


def test_merge_in_place_is_exact_in_float32_and_cannot_be_undone(build):
    module = build(qlora_recipe(TINY_LLAMA, "CausalLM", r=4, merge_dtype="float32", compute_dtype="float32"))
    model = module.model
    _randomize_lora(model)
    model.eval()
    ids = torch.randint(1000, 2000, (2, 9))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        module.method.merge(model)
        merged = model(input_ids=ids).logits
    assert not four_bit_layers(model)
    assert all(layer.merged for layer in module.method.layers(model))
    assert (merged - reference).abs().max() <= 1e-4 * reference.abs().max()
    with pytest.raises(MergeNotSupportedError, match="cannot be undone"):
        module.method.unmerge(model)


# -- training --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory, instruction_jsonl):
    """One short QLoRA SFT run on a tiny Llama with a paged optimizer and a checkpoint."""
    from framework import optim
    from framework.cli import build_module

    tmp_path = tmp_path_factory.mktemp("qlora_causal")
    recipe = qlora_recipe(TINY_LLAMA, "CausalLM", r=8)
    recipe.update(learning_rate=0.01, optimizer="paged_adamw")
    torch.manual_seed(0)
    module = build_module(recipe)
    frozen = {n: (m.weight.detach().clone(), dequantize_weight(m)) for n, m in four_bit_layers(module.model).items()}
    recorder = LossRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    data = InstructionData(data_files=instruction_jsonl, batch_size=16, max_length=48)
    optim._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, 40, recorder, ckpt).fit(module, datamodule=data)
    return {"module": module, "recipe": recipe, "losses": recorder.losses, "frozen": frozen,
            "ckpt": tmp_path / "ckpt" / "last.ckpt", "warnings": [str(w.message) for w in caught]}


def test_causal_lm_loss_falls(causal_run):
    losses = causal_run["losses"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_frozen_4bit_weights_are_unchanged_by_training(causal_run):
    layers = four_bit_layers(causal_run["module"].model)
    assert set(layers) == set(causal_run["frozen"])
    for name, (codes, weight) in causal_run["frozen"].items():
        assert torch.equal(layers[name].weight, codes), f"4-bit codes of {name} changed"
        assert torch.equal(dequantize_weight(layers[name]), weight)


def test_paged_optimizer_falls_back_on_cpu_with_one_warning(causal_run):
    module = causal_run["module"]
    optimizer = module.trainer.optimizers[0]
    assert type(optimizer) is bnb.optim.AdamW and not optimizer.is_paged
    ours = [w for w in causal_run["warnings"] if "paged_adamw" in w]
    assert len(ours) == 1 and "non-paged" in ours[0], causal_run["warnings"]
    assert not [w for w in causal_run["warnings"] if "Paged optimizers are not supported" in w]  # bnb's own


def test_checkpoint_is_adapter_only_and_round_trips(causal_run):
    from framework.cli import build_module

    module, path = causal_run["module"], causal_run["ckpt"]
    checkpoint = torch.load(path, weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert keys == {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    assert keys and all(".lora_A" in k or ".lora_B" in k for k in keys)
    assert checkpoint["fw"]["method"]["class_path"] == "fw_qlora.method.QLoRA"
    assert checkpoint["hyper_parameters"]["optimizer"] == "paged_adamw"
    assert path.stat().st_size < 0.05 * module.backbone_params * 4
    torch.manual_seed(0)
    fresh = build_module(causal_run["recipe"])  # same seed: same random base, same 4-bit codes
    fresh.load_state_dict(checkpoint["state_dict"])
    ids = torch.randint(1000, 2000, (2, 9))
    module.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(module.model(input_ids=ids).logits, fresh.model(input_ids=ids).logits)


def test_generation_runs_on_the_4bit_model(causal_run):
    # eval mode + no grad: bitsandbytes' CPU fast path would repack the weights and fail on
    # these narrow layers; fw_qlora switches it off
    model = causal_run["module"].model.eval()
    codes = model.get_submodule("model.layers.0.self_attn.k_proj.base_layer").weight.detach().clone()
    with torch.no_grad():
        out = model.generate(input_ids=torch.randint(1000, 2000, (2, 5)), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9)
    assert torch.equal(model.get_submodule("model.layers.0.self_attn.k_proj.base_layer").weight, codes)


def test_classification_loss_falls(build, sentiment_csv, tmp_path):
    recipe = qlora_recipe(TINY_LLAMA, r=8)  # LlamaForSequenceClassification: 4-bit body, fp32 head
    recipe["learning_rate"] = 0.01
    module = build(recipe)
    recorder = LossRecorder()
    trainer(tmp_path, 40, recorder).fit(module, datamodule=classification_data(sentiment_csv))
    first, last = recorder.losses[:10], recorder.losses[-10:]
    assert sum(last) / len(last) < 0.6 * sum(first) / len(first), recorder.losses


# -- optimizer selection (framework/optim.py) -----------------------------------------------


def test_build_optimizer_choices_and_one_fallback_warning():
    from framework import optim

    p = nn.Parameter(torch.randn(8, 8))
    groups = lambda: [{"params": [p], "weight_decay": 0.1}, {"params": [], "weight_decay": 0.0}]  # noqa: E731
    assert type(optim.build_optimizer("adamw", groups(), lr=1e-3)) is torch.optim.AdamW
    assert type(optim.build_optimizer("adamw_8bit", groups(), lr=1e-3)) is bnb.optim.AdamW8bit
    optim._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = optim.build_optimizer("paged_adamw_8bit", groups(), lr=1e-3)
        second = optim.build_optimizer("paged_adamw_8bit", groups(), lr=1e-3)
    assert type(first) is type(second) is bnb.optim.AdamW8bit and not first.is_paged
    assert len(caught) == 1 and "CUDA" in str(caught[0].message)
    assert first.param_groups[0]["weight_decay"] == 0.1 and first.param_groups[1]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="model.optimizer"):
        optim.build_optimizer("sgd", groups(), lr=1e-3)


# -- errors ----------------------------------------------------------------------------------


def test_bad_compute_dtype_names_the_field_and_the_supported_ones(instruction_jsonl, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^compute_dtype: 'float64'.*auto, float32, bfloat16, float16"):
        QLoRA(compute_dtype="float64")
    recipe = {
        "trainer": {"accelerator": "cpu", "logger": False, "default_root_dir": str(tmp_path)},
        "model": qlora_recipe(TINY_LLAMA, "CausalLM", compute_dtype="int4"),
        "data": {"class_path": "InstructionData", "init_args": {"data_files": instruction_jsonl}},
    }
    from framework.cli import main

    assert main(["fit", "--config", write_recipe(tmp_path / "r.yaml", recipe)]) == 2
    err = capsys.readouterr().err
    assert "fw: error: model.method.init_args.compute_dtype: 'int4' is not supported; supported: auto" in err


def test_an_already_quantized_backbone_is_refused(build):
    module = build(qlora_recipe(TINY_LLAMA, "CausalLM"))
    with pytest.raises(QuantizationError, match="already quantized"):
        QLoRA().attach(module.model)


def test_a_machine_where_bitsandbytes_cannot_quantize_fails_before_training(build, monkeypatch):
    from fw_qlora import quant

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, as without the package
    with pytest.raises(ValueError, match="bitsandbytes.*cannot be imported"):  # one line at the CLI
        build(qlora_recipe(TINY_LLAMA, "CausalLM"))
    monkeypatch.undo()

    def no_backend(*args, **kwargs):
        raise RuntimeError("no kernel for device type 'cpu'")

    monkeypatch.setattr(quant, "_PROBED", {})
    monkeypatch.setattr(quant, "_quantize_weight", no_backend)
    with pytest.raises(ValueError, match=r"cannot quantize to 4-bit on cpu \(RuntimeError: no kernel"):
        build(qlora_recipe(TINY_LLAMA, "CausalLM"))


# -- benchmark -------------------------------------------------------------------------------


def test_bench_script_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_qlora.py"), "--preset", "tiny", "--steps", "2",
         "--warmup", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    names = [row["name"] for row in report["results"]]
    assert names == ["fw LoRA", "fw QLoRA", "PEFT LoRA", "PEFT QLoRA"]
    for row in report["results"]:
        assert row["tokens_per_s"] > 0 and row["peak_memory_bytes"] > 0, row
    rows = {row["name"]: row for row in report["results"]}
    assert rows["fw QLoRA"]["trainable_params"] == rows["fw LoRA"]["trainable_params"] == rows["PEFT LoRA"]["trainable_params"]
    assert rows["fw QLoRA"]["weight_bytes"] < rows["fw LoRA"]["weight_bytes"]
    assert rows["PEFT QLoRA"]["weight_bytes"] < rows["PEFT LoRA"]["weight_bytes"]
    assert "fw QLoRA" in result.stdout and "tokens/s" in result.stdout


# -- on a GPU (skipped without CUDA) ---------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("optimizer", ["paged_adamw", "paged_adamw_8bit"])
def test_gpu_qlora_trains_in_bf16_with_a_paged_optimizer(build, optimizer):
    from framework import optim

    module = build(qlora_recipe(TINY_LLAMA, "CausalLM", r=8))  # quantized on the CPU, then moved
    model = module.model.cuda()
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.base_layer.compute_dtype == torch.bfloat16 and layer.base_layer.weight.device.type == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optim.build_optimizer(optimizer, [{"params": params, "weight_decay": 0.0}], lr=1e-2)
    assert opt.is_paged
    ids = torch.randint(1000, 2000, (4, 16), device="cuda")
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


@pytest.mark.gpu
@needs_cuda
def test_gpu_merged_model_matches(build):
    model = build(qlora_recipe(TINY_LLAMA, "CausalLM", r=4)).model.cuda().eval()
    _randomize_lora(model)
    ids = torch.randint(1000, 2000, (2, 11), device="cuda")
    with torch.no_grad():
        reference = model(input_ids=ids).logits.float()
        merged = merged_model(model, torch.bfloat16)(input_ids=ids).logits.float()
    assert nn.functional.cosine_similarity(merged.flatten(), reference.flatten(), dim=0) >= 0.998
