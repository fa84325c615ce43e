"""Checkpoint writes that a kill cannot corrupt: the new file is written beside the target and
renamed over it, so the previous checkpoint stays loadable whenever the writer dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from framework.atomic_save import save_atomically, temp_path
from framework.checkpoint_io import AtomicCheckpointIO

WRITER = """
import sys, torch
from framework.atomic_save import save_atomically
path, i = sys.argv[1], 0
big = torch.zeros(4_000_000)  # 16 MB: long enough a write to be killed in the middle of
while True:
    i += 1
    save_atomically({"step": i, "weights": big + i}, path)
    print(i, flush=True)
"""


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_atomically({"step": 1}, path)

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # what a signal does to the writer

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_atomically({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_kill_9_at_random_moments_never_corrupts_the_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    for attempt in range(3):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        writer.stdout.readline()  # one checkpoint is complete
        time.sleep(0.05 + 0.1 * attempt)  # then die somewhere in a later write
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        saved = torch.load(path, weights_only=True)
        assert saved["step"] >= 1 and torch.equal(saved["weights"], torch.full((4_000_000,), float(saved["step"])))
        leftover = [p.name for p in tmp_path.iterdir() if p != path]
        assert leftover in ([], [temp_path(path).name])  # at most the file the next save replaces


def test_fw_runs_write_and_read_checkpoints_through_it(tmp_path):
    from lightning.pytorch import Trainer

    from framework.checkpoint_io import SafeCheckpoints

    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[SafeCheckpoints()])
    SafeCheckpoints().setup(trainer, None, "fit")
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
