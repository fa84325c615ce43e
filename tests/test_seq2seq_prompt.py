"""Prompt tuning and P-tuning on encoder-decoders (tiny random T5 and BART): the virtual tokens go
in front of the encoder's input only (Lester et al. on T5, PEFT's SEQ_2_SEQ_LM).

Measured (float32, this file's inputs): |fw - PEFT| logits 0.0 on T5 and BART (padded batches;
PEFT's PeftModelForSeq2SeqLM with fw's prompt as the first P of its 2·P rows), beam search
identical; PEFT loading fw's export and fw reading it back 0.0; greedy generate's per-step
logits vs one teacher-forced forward on its output <= 1.9e-6.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import TOKENIZER, VOCAB, _saved_base
from fw_prompt import PromptTuning
from fw_ptuning import PTuning
from torch import nn

from framework.validation import InvalidArgument

peft = pytest.importorskip("peft")

#: the tiny backbones of the brief (defaults otherwise: tied T5 head, default init and dropout)
T5: dict[str, Any] = {
    "model_type": "t5", "vocab_size": VOCAB, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
    "num_decoder_layers": 2, "num_heads": 4, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 102,
}
BART: dict[str, Any] = {
    "model_type": "bart", "vocab_size": VOCAB, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "max_position_embeddings": 128, "pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102,
    "decoder_start_token_id": 102,
}
BACKBONES = {"t5": T5, "bart": BART}
#: the same with wider random weights: greedy and beam search then write varied tokens (with
#: the default init a tiny random decoder repeats one token)
SHARP = {"t5": {**T5, "initializer_factor": 4.0}, "bart": {**BART, "init_std": 0.3}}
P = 3
#: the largest |fw - reference| logit difference accepted (float32); measured: 0.0
TOLERANCE = 1e-5


def seq2seq(config: dict[str, Any], seed: int = 0) -> nn.Module:
    """A random-init encoder-decoder in eval mode (dropout off), every weight frozen."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    fields = dict(config)
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields)).eval()
    model.generation_config.forced_eos_token_id = None  # BART's default forces token 2 at max length
    return model.requires_grad_(False)


def attached(config: dict[str, Any], method: Any, seed: int = 0) -> nn.Module:
    model = seq2seq(config, seed)
    method.attach(model)
    with torch.no_grad():  # off the vocabulary initialisation, as training would move it
        for p in model.prompt_encoder.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.5)
    return model


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Sources (the second row padded) and labels padded with -100, as Seq2SeqData gives them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids[1, 4:] = 0
    labels = torch.randint(1000, 2000, (3, 5), generator=g)
    labels[1, 3:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def forward(model: nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Teacher-forced logits, called as fw's Seq2SeqLM task calls the model."""
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=data["labels"])
    return model(input_ids=data["input_ids"], attention_mask=data["attention_mask"], decoder_input_ids=decoder_input_ids).logits


def peft_twin(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    """PEFT's SEQ_2_SEQ_LM prompt tuning on the same backbone, with fw's ``(P, d)`` prompt as its
    first ``P`` rows; its other ``P`` rows (the decoder's, ``num_transformer_submodules=2``) are
    noise that must never be read."""
    twin = seq2seq(config)
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("prompt_encoder.")})
    wrapped = peft.PeftModelForSeq2SeqLM(twin, peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    table = wrapped.prompt_encoder["default"].embedding.weight
    assert table.shape == (2 * P, config["d_model"])  # PEFT's default for seq2seq: 2 submodules
    with torch.no_grad():
        table.copy_(torch.cat([model.prompt_encoder.embedding.weight, torch.randn(P, config["d_model"]) * 9]))
    return wrapped.eval()


def max_diff(theirs: torch.Tensor, ours: torch.Tensor, label: str) -> float:
    diff = (theirs.float() - ours.float()).abs().max().item()
    print(f"max |diff| {label}: {diff:.3g}")
    return diff


# -- what the model sees ---------------------------------------------------------------------


def test_virtual_tokens_reach_the_encoder_only_and_the_mask_is_widened():
    from framework import forward_context

    model = attached(T5, PromptTuning(num_virtual_tokens=P))
    context = forward_context.install(model)
    seen: dict[str, Any] = {}
    model.get_encoder().register_forward_hook(
        lambda m, args, kw, out: seen.update(encoder=kw["inputs_embeds"], mask=kw["attention_mask"]), with_kwargs=True)
    model.get_decoder().register_forward_hook(
        lambda m, args, kw, out: seen.update(decoder=kw["input_ids"], cross=kw["encoder_attention_mask"]), with_kwargs=True)
    data = batch()
    with torch.no_grad():
        logits = forward(model, data)
    assert logits.shape == (3, 5, VOCAB)  # the decoder's logits: nothing to drop
    assert seen["encoder"].shape == (3, P + 7, 32)
    torch.testing.assert_close(seen["encoder"][0, :P], model.prompt_encoder.embedding.weight, rtol=0, atol=0)
    ones = torch.ones(3, P, dtype=torch.long)
    for mask in (seen["mask"], seen["cross"], context.mask):  # encoder, cross-attention, forward context
        assert torch.equal(mask, torch.cat([ones, data["attention_mask"]], dim=1))
    assert torch.equal(seen["decoder"], model.prepare_decoder_input_ids_from_labels(labels=data["labels"]))


def test_prompt_tuning_counts_are_p_times_d_model():
    for config in BACKBONES.values():
        model = attached(config, PromptTuning(num_virtual_tokens=P))
        trained = [p for p in model.parameters() if p.requires_grad]
        assert sum(p.numel() for p in trained) == P * config["d_model"] == 96


def test_virtual_positions_past_barts_position_table_are_refused():
    model = attached(BART, PromptTuning(num_virtual_tokens=P))
    ids = torch.randint(1000, 2000, (1, 128 - P))
    model.get_encoder()(input_ids=ids)  # fits: P + L = 128 positions
    with pytest.raises(InvalidArgument, match="lower data.max_length to 125"):
        model.get_encoder()(input_ids=torch.cat([ids, ids[:, :1]], dim=1))


def test_an_encoder_without_token_inputs_is_refused():
    class SpeechEncoder(nn.Module):
        def forward(self, input_features: torch.Tensor) -> torch.Tensor:
            return input_features

    class SpeechModel(nn.Module):
        config = type("Config", (), {"is_encoder_decoder": True, "model_type": "speech"})()

        def __init__(self) -> None:
            super().__init__()
            self.encoder = SpeechEncoder()
            self.embed = nn.Embedding(10, 4)

        def get_encoder(self) -> nn.Module:
            return self.encoder

        def get_input_embeddings(self) -> nn.Embedding:
            return self.embed

    with pytest.raises(InvalidArgument, match="text encoder that takes inputs_embeds"):
        PromptTuning(num_virtual_tokens=P).attach(SpeechModel())


# -- parity with PEFT and with generate -------------------------------------------------------


@pytest.mark.parametrize("name", ["t5", "bart", "t5-wide", "bart-wide"])
def test_logits_and_beam_search_equal_pefts_prompt_tuning(name):
    arch, _, wide = name.partition("-")
    config = SHARP[arch] if wide else BACKBONES[arch]
    model = attached(config, PromptTuning(num_virtual_tokens=P))
    twin = peft_twin(model, config)
    data = batch()
    with torch.no_grad():
        ours, theirs = forward(model, data), forward(twin, data)
        loss = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"], labels=data["labels"]).loss
        their_loss = twin(input_ids=data["input_ids"], attention_mask=data["attention_mask"], labels=data["labels"]).loss
    assert max_diff(theirs, ours, f"{name} fw vs PEFT logits") <= TOLERANCE
    assert abs(loss.item() - their_loss.item()) <= TOLERANCE
    source = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    ours_beam = model.generate(**source, max_new_tokens=5, num_beams=2, do_sample=False)
    theirs_beam = twin.generate(**source, max_new_tokens=5, num_beams=2, do_sample=False)
    assert torch.equal(ours_beam, theirs_beam)


METHODS = {
    "prompt": lambda: PromptTuning(num_virtual_tokens=P),
    "ptuning-lstm": lambda: PTuning(num_virtual_tokens=P, encoder="lstm", encoder_hidden_size=16),
    "ptuning-mlp": lambda: PTuning(num_virtual_tokens=P),
}
CASES = [("prompt", "t5"), ("prompt", "bart"), ("ptuning-lstm", "t5"), ("ptuning-mlp", "bart")]


def until_eos(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """True up to and including each row's first ``eos`` (generate pads what follows)."""
    ended = torch.cumsum((tokens == eos).long(), dim=1)
    return (ended == 0) | ((ended == 1) & (tokens == eos))


def greedy_and_forced(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens greedy search wrote, its logits per step, one teacher-forced forward's logits on them)."""
    data = batch(seed=1)
    out = model.generate(input_ids=data["input_ids"], attention_mask=data["attention_mask"], max_new_tokens=6,
                         num_beams=1, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        forced = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                       decoder_input_ids=out.sequences[:, :-1]).logits
    return out.sequences[:, 1:], torch.stack(out.logits, dim=1), forced


@pytest.mark.parametrize(("method", "arch"), CASES)
def test_greedy_generate_is_the_argmax_of_the_teacher_forced_forward(method, arch):
    """generate runs the encoder once (directly) and then the model with encoder_outputs and the
    caller's mask: every step's logits must be those of one forward on the generated sequence.
    The logits are compared on the default init (logits of a few units; with the wide init the
    cached and the full forward differ by float32 rounding, ~1e-3 on logits of ~80, without any
    method too); the tokens also on the wide init, where greedy search writes varied tokens."""
    eos = BACKBONES[arch]["eos_token_id"]
    written, steps, forced = greedy_and_forced(attached(BACKBONES[arch], METHODS[method]()))
    assert max_diff(steps, forced, f"{method}-{arch} generate steps vs teacher-forced") <= TOLERANCE
    live = until_eos(written, eos)
    assert torch.equal(forced.argmax(-1)[live], written[live])
    written, _, forced = greedy_and_forced(attached(SHARP[arch], METHODS[method]()))
    live = until_eos(written, eos)
    assert torch.equal(forced.argmax(-1)[live], written[live])
    assert len(set(written[live].tolist())) > 3  # varied tokens, not one repeated


def test_ptuning_is_prompt_tuning_with_its_encoders_output():
    ptuning = attached(BART, PTuning(num_virtual_tokens=P, encoder="lstm", encoder_hidden_size=16))
    prompt = attached(BART, PromptTuning(num_virtual_tokens=P))
    with torch.no_grad():
        prompt.prompt_encoder.embedding.weight.copy_(ptuning.prompt_encoder())
        assert max_diff(forward(prompt, batch()), forward(ptuning, batch()), "P-tuning vs prompt tuning") <= TOLERANCE


# -- training ---------------------------------------------------------------------------------


def test_gradient_reaches_the_prompt_and_adam_lowers_the_loss():
    model = attached(T5, PromptTuning(num_virtual_tokens=P))
    table = model.prompt_encoder.embedding.weight
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = batch()
    optimizer = torch.optim.Adam([table], lr=0.3)

    def loss() -> torch.Tensor:
        logits = forward(model, data)
        return nn.functional.cross_entropy(logits.flatten(0, 1), data["labels"].flatten(), ignore_index=-100)

    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        assert table.grad is not None and table.grad.abs().sum() > 0
        optimizer.step()
        losses.append(value.item())
    with torch.no_grad():
        final = loss().item()
    print(f"teacher-forced loss: {losses[0]:.4f} -> {final:.4f}")
    assert final < losses[0] - 1e-3
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


# -- PEFT's format ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _saved_base(tmp_path_factory, "t5", "AutoModelForSeq2SeqLM", T5)


def seq2seq_recipe(base: str, method: str, **args: Any) -> dict[str, Any]:
    return {"backbone": {"name_or_path": base, "tokenizer": TOKENIZER}, "task": {"class_path": "Seq2SeqLM"},
            "method": {"class_path": method, "init_args": args}}


def needs_seq2seq_task() -> None:
    import framework.tasks

    if not hasattr(framework.tasks, "Seq2SeqLM"):
        pytest.skip("framework.tasks.Seq2SeqLM is not there yet")


def reimported(model_config: dict[str, Any], adapter_dir: str) -> Any:
    from framework.cli import build_module
    from framework.formats.source import read_adapter, updated

    adapter = read_adapter(adapter_dir)
    module = build_module(updated(model_config, adapter.model_update(model_config)))
    adapter.load_into(module)
    return module.eval()


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_peft_loads_fws_seq2seq_export_and_fw_reads_it_back(method, tmp_path, t5_dir):
    needs_seq2seq_task()
    from helpers import trained_module
    from transformers import AutoModelForSeq2SeqLM

    from framework.formats.peft import write_peft_adapter

    config = seq2seq_recipe(t5_dir, method, num_virtual_tokens=P)
    module = trained_module(config, seed=1)
    counts = module.param_counts()
    assert counts.stored_params == P * T5["d_model"] and counts.head_params == 0
    if method == "prompt":
        assert counts.method_params == counts.trainable_params == P * T5["d_model"]
    data = batch()
    ours = forward(module.model, data)
    write_peft_adapter(module, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_2_SEQ_LM" and saved["num_transformer_submodules"] == 1
    theirs_model = peft.PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(t5_dir), str(tmp_path)).eval()
    assert isinstance(theirs_model, peft.PeftModelForSeq2SeqLM)
    with torch.no_grad():
        theirs = forward(theirs_model, data)
    assert max_diff(theirs, ours, f"{method} PEFT loads fw's seq2seq export") <= TOLERANCE
    again = forward(reimported(config, str(tmp_path)).model, data)
    assert max_diff(again, ours, f"{method} fw reads its seq2seq PEFT folder") <= TOLERANCE


def test_pefts_two_submodule_prompt_is_read_as_its_first_p_rows(tmp_path, t5_dir):
    """PEFT saves 2·P rows for SEQ_2_SEQ_LM (num_transformer_submodules=2) and feeds the encoder
    the first P: fw keeps those and computes PEFT's logits."""
    needs_seq2seq_task()
    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(0)
    theirs_model = peft.get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(t5_dir),
                                       peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    with torch.no_grad():
        theirs_model.prompt_encoder["default"].embedding.weight.normal_(0, 3.0)
    theirs_model.eval().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["num_transformer_submodules"] == 2
    data = batch()
    with torch.no_grad():
        theirs = forward(theirs_model, data)
    ours = forward(reimported(seq2seq_recipe(t5_dir, "prompt"), str(tmp_path)).model, data)
    assert max_diff(theirs, ours, "PEFT-saved 2P-row prompt read into fw") <= TOLERANCE
