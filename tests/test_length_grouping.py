"""``data.group_by_length``: training batches of similar length, in an order that depends on
(seed, epoch) alone, split alike across DDP ranks, and resumable mid-epoch."""

from __future__ import annotations

import random

import pytest
from conftest import TOKENIZER, write_recipe
from helpers import tiny_recipe
from lightning.pytorch import Callback
from torch.utils.data import DistributedSampler

from framework.backbone import Backbone
from framework.cli import main
from framework.data import ClassificationData
from framework.data.sampler import EpochSampler

N = 1000
#: widely varying lengths (1 to 200 tokens), seeded
_RNG = random.Random(0)
LENGTHS = [_RNG.randint(1, 200) for _ in range(N + 10)]


def sampler(n: int = N, seed: int = 7, world: int = 1, rank: int = 0, batch: int = 8, epoch: int = 0,
            grouped: bool = True) -> EpochSampler:
    s = EpochSampler(range(n), True, seed, world, rank, lengths=LENGTHS[:n] if grouped else None, batch_size=batch)
    s.set_epoch(epoch)
    return s


def batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def pad_fraction(groups: list[list[int]], lengths: list[int]) -> float:
    """Pad tokens over all tokens when each batch is padded to its longest row."""
    padded = sum(max(lengths[i] for i in b) * len(b) for b in groups)
    return 1 - sum(lengths[i] for b in groups for i in b) / padded


def test_every_index_once_in_batches_of_similar_length():
    for epoch in range(3):
        grouped = list(sampler(epoch=epoch))
        assert sorted(grouped) == list(range(N))
        plain = list(sampler(epoch=epoch, grouped=False))
        grouped_pad, plain_pad = pad_fraction(batches(grouped, 8), LENGTHS), pad_fraction(batches(plain, 8), LENGTHS)
        assert plain_pad > 0.3 and grouped_pad < 0.1 * plain_pad, (grouped_pad, plain_pad)
        first = batches(grouped, 8)[0]
        assert max(LENGTHS) in [LENGTHS[i] for i in first]  # the longest batch first


def test_the_order_depends_on_seed_and_epoch_only():
    assert list(sampler(epoch=1)) == list(sampler(epoch=1))
    assert list(sampler(epoch=0)) != list(sampler(epoch=1))
    assert list(sampler(seed=8)) != list(sampler(seed=7))
    # batch order shuffled: not simply longest to shortest
    firsts = [LENGTHS[b[0]] for b in batches(list(sampler()), 8)]
    assert firsts[1:] != sorted(firsts[1:], reverse=True)
    unshuffled = [EpochSampler(range(N), False, 7, lengths=LENGTHS[:N], batch_size=8) for _ in range(2)]
    unshuffled[1].set_epoch(1)
    assert list(unshuffled[0]) == list(unshuffled[1]) and sorted(unshuffled[0]) == list(range(N))


@pytest.mark.parametrize("n", [1000, 1003])
def test_ddp_ranks_get_equal_batches_from_one_sorted_run(n):
    world, batch = 2, 8
    ranks = [list(sampler(n, world=world, rank=r, batch=batch, epoch=2)) for r in range(world)]
    assert isinstance(sampler(n, world=world), DistributedSampler)  # so Lightning keeps it under DDP
    per_rank = [batches(indices, batch) for indices in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) and len(ranks[0]) == len(ranks[1]) == len(sampler(n, world=world))
    for a, b in zip(*per_rank):
        assert len(a) == len(b)
        run = [LENGTHS[i] for i in a + b]
        assert run == sorted(run, reverse=True)  # one global batch: consecutive cuts of a sorted run
    together = ranks[0] + ranks[1]
    assert set(together) == set(range(n)) and len(together) == n + n % world  # DistributedSampler's padding


def test_a_resumed_epoch_continues_with_the_remaining_batches():
    for world, rank in ((1, 0), (2, 1)):
        whole = list(sampler(world=world, rank=rank, epoch=3))
        resumed = sampler(world=world, rank=rank, epoch=3)
        resumed.skip(5 * 8)
        assert list(resumed) == whole[5 * 8 :]
        assert list(resumed) == whole  # the skip applies to one epoch only


def test_the_datamodule_reads_lengths_and_groups_its_training_batches(sentiment_csv):
    with pytest.raises(ValueError, match="data.group_by_length: expected true or false, got 'yes'"):
        ClassificationData(data_files=sentiment_csv, group_by_length="yes")
    tokenizer = Backbone(name_or_path=TOKENIZER).load_tokenizer()
    pads = {}
    for group in (False, True):
        dm = ClassificationData(data_files=sentiment_csv, batch_size=8, group_by_length=group)
        dm.tokenizer = tokenizer
        dm.setup()
        loader = dm.train_dataloader()
        assert (loader.sampler.lengths is not None) == group
        masks = [b["attention_mask"] for b in loader]
        pads[group] = 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert dm.lengths("train") == [len(row["input_ids"]) for row in dm.encoded["train"]]
    assert pads[True] < 0.5 * pads[False], pads


class BatchRecorder(Callback):
    """Records every training batch's token ids by global step (class-level: the CLI builds it)."""

    seen: dict[int, list[list[int]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        type(self).seen[trainer.global_step] = batch["input_ids"].tolist()


@pytest.mark.integration
def test_a_grouped_fit_resumed_mid_epoch_sees_the_same_batches(sentiment_csv, tmp_path):
    recipe = tiny_recipe(tmp_path, sentiment_csv)
    recipe["trainer"].update({"max_epochs": 2, "num_sanity_val_steps": 0, "limit_val_batches": 0})
    recipe["trainer"]["callbacks"] = [
        {"class_path": "ModelCheckpoint", "init_args": {"save_top_k": -1, "every_n_train_steps": 1, "filename": "{step}"}},
        {"class_path": f"{__name__}.BatchRecorder"}]
    recipe["test_after_fit"] = False
    recipe["data"]["init_args"].update({"group_by_length": True, "max_train_examples": 64})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["fit", "--config", path]) == 0
    whole = dict(BatchRecorder.seen)
    assert sorted(whole) == list(range(8))  # 64 examples, batch 16: 4 steps an epoch
    BatchRecorder.seen.clear()
    ckpt = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "step=5.ckpt"
    assert main(["fit", "--config", path, "--ckpt_path", str(ckpt)]) == 0
    assert BatchRecorder.seen == {step: whole[step] for step in (5, 6, 7)}
