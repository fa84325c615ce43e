"""Data: grouped splits without leakage, label handling, prompt masking for causal-LM SFT."""

from __future__ import annotations

import pytest
from conftest import TOKENIZER

from framework.backbone import Backbone
from framework.data import ClassificationData, InstructionData
from framework.data.packaged import rotten_tomatoes


@pytest.fixture(scope="module")
def tokenizer():
    return Backbone(name_or_path=TOKENIZER).load_tokenizer()


def test_rotten_tomatoes_is_reviews_only_deduplicated_and_labelled():
    data = rotten_tomatoes()["train"]
    assert data.features["label"].names == ["rotten", "fresh"]
    assert len(data) == len(set(data["text"])) == 7403 + 5405 - 56  # 56 repeated snippets dropped
    assert sum(data["label"]) == len([t for t in data["label"] if t == 1]) > 0.55 * len(data)


def test_grouped_split_keeps_every_movie_in_one_split():
    dm = ClassificationData(dataset="rotten_tomatoes", group_column="movie_name", validation_fraction=0.1, test_fraction=0.2)
    splits = dm.load_raw()
    movies = {name: set(split["movie_name"]) for name, split in splits.items()}
    assert not movies["train"] & movies["validation"]
    assert not movies["train"] & movies["test"]
    assert not movies["validation"] & movies["test"]
    total = sum(len(s) for s in splits.values())
    assert total == 7403 + 5405 - 56
    assert abs(len(splits["test"]) / total - 0.2) < 0.01 and abs(len(splits["validation"]) / total - 0.1) < 0.01
    again = ClassificationData(dataset="rotten_tomatoes", group_column="movie_name").load_raw()
    assert again["test"]["text"] == splits["test"]["text"]  # the seed makes the split reproducible


def test_max_train_examples_subsamples_train_only():
    dm = ClassificationData(dataset="rotten_tomatoes", group_column="movie_name", max_train_examples=300)
    sizes = dm.split_sizes()
    assert sizes["train"] == 300 and sizes["test"] > 2000


def test_string_labels_map_to_ids_in_sorted_order(tmp_path, tokenizer):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nnice,pos\nugly,neg\nokay,mid\nfine,pos\n")
    dm = ClassificationData(data_files={"train": str(path), "validation": str(path), "test": str(path)})
    dm.tokenizer = tokenizer
    dm.setup("fit")
    assert dm.label_names == ["mid", "neg", "pos"]
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["labels"].tolist()) == [0, 1, 2, 2]
    assert batch["input_ids"].shape == batch["attention_mask"].shape


def test_instruction_labels_cover_the_response_only(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "say hello", "response": "hello there"}\n{"prompt": "a much longer question here", "response": "ok"}\n')
    dm = InstructionData(data_files={"train": str(path), "validation": str(path), "test": str(path)}, batch_size=2)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    rows = dm.encoded["train"]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    for row, response in zip(rows, ["hello there", "ok"]):
        answer = tokenizer(response, add_special_tokens=False)["input_ids"]
        labelled = [t for t in row["labels"] if t != -100]
        assert labelled == answer + eos
        assert row["input_ids"][-len(labelled):] == labelled
        assert row["input_ids"][: len(row["prompt_input_ids"])] == row["prompt_input_ids"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"][batch["attention_mask"] == 0].eq(-100).all()  # padding carries no loss
    predict = next(iter(dm.predict_dataloader()))
    mask = predict["prompt_attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()  # left padding for generation
    assert predict["reference"] == ["hello there", "ok"]


def test_bad_data_fields_are_named(tmp_path):
    with pytest.raises(ValueError, match="data: give exactly one of `dataset`"):
        ClassificationData()
    with pytest.raises(FileNotFoundError, match="data.data_files.train: missing data file"):
        ClassificationData(data_files={"train": str(tmp_path / "nope.csv")})
    with pytest.raises(ValueError, match="data.batch_size"):
        ClassificationData(dataset="rotten_tomatoes", batch_size=0)
    dm = ClassificationData(dataset="rotten_tomatoes", group_column="film")
    with pytest.raises(ValueError, match="data.group_column: no column 'film'"):
        dm.load_raw()
