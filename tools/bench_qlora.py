#!/usr/bin/env python
"""LoRA vs QLoRA, fw vs Hugging Face PEFT: peak memory and training throughput, side by side.

One random-init Llama-shaped causal LM is written to a temporary folder once; then each
configuration trains it for a few steps on the same random batch, each in its own
process (forked from a server that has imported torch, transformers and peft once, so
peak memory is each configuration's own and start-up is paid once):

    fw LoRA      bf16 base, fw_lora.LoRA on all-linear
    fw QLoRA     fw_qlora.QLoRA: the base quantized to NF4 (double quant) in attach()
    PEFT LoRA    bf16 base, peft.get_peft_model(LoraConfig(target_modules="all-linear"))
    PEFT QLoRA   transformers' BitsAndBytesConfig (NF4, double quant) at load time,
                 peft.prepare_model_for_kbit_training, then LoraConfig as above

All use the same rank, alpha, adapters in fp32, torch AdamW, gradient checkpointing (on by
default) and bf16 autocast. Peak memory is CUDA's max allocated during training on a GPU;
on CPU it is the process's peak RSS (resource.getrusage), which includes the libraries
and the loading (fw QLoRA loads 16-bit weights and quantizes them layer by layer; PEFT
QLoRA quantizes while loading).

    python tools/bench_qlora.py                      # GPU: Llama-3.2-1B shape, seq 512; CPU: `small`
    python tools/bench_qlora.py --preset tiny --steps 2 --warmup 1   # seconds, on CPU (the test)
    python tools/bench_qlora.py --json bench.json     # default: runs/bench_qlora.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

CONFIGS = ["fw LoRA", "fw QLoRA", "PEFT LoRA", "PEFT QLoRA"]

_LLAMA = {"model_type": "llama", "tie_word_embeddings": True, "rope_theta": 500000.0, "initializer_range": 0.02}
PRESETS: dict[str, dict[str, Any]] = {
    # the shape of meta-llama/Llama-3.2-1B (1.24 B parameters), random weights
    "llama-1b": {
        "model": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                  "max_position_embeddings": 4096},
        "batch": 4, "seq": 512,
    },
    # ~17 M parameters: big enough on CPU for the 4-bit weights to show in the memory
    "small": {
        "model": {**_LLAMA, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4,
                  "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 8192,
                  "max_position_embeddings": 512},
        "batch": 4, "seq": 128,
    },
    # seconds on CPU: what the fast test runs
    "tiny": {
        "model": {**_LLAMA, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
                  "max_position_embeddings": 128},
        "batch": 2, "seq": 32,
    },
}


# -- the child: one configuration -----------------------------------------------------------


def _weight_bytes(model: Any) -> int:
    """Bytes of every parameter and buffer as stored (4-bit codes + their quantization state)."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            for part in (state.absmax, state.code, *((state.state2.absmax, state.state2.code) if state.nested else ())):
                total += part.numel() * part.element_size()
    return total


def _build(name: str, model_dir: str, args: argparse.Namespace, device: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    gc_kwargs = {"use_reentrant": False}
    if name.startswith("fw"):
        from framework.backbone import Backbone

        model = Backbone(name_or_path=model_dir, dtype="bfloat16").build(AutoModelForCausalLM)
        model.requires_grad_(False)
        if name == "fw LoRA":
            from fw_lora import LoRA

            LoRA(r=args.r, alpha=args.alpha, targets=["all-linear"]).attach(model)
            if args.gradient_checkpointing == "on":
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
        else:
            from fw_qlora import QLoRA

            QLoRA(r=args.r, alpha=args.alpha, compute_dtype="bfloat16",
                  gradient_checkpointing=args.gradient_checkpointing == "on").attach(model)
        return model.to(device)

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    config = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    if name == "PEFT LoRA":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
        if args.gradient_checkpointing == "on":
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
        return get_peft_model(model, config)
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=quant,
                                                 device_map={"": (device.index or 0) if device.type == "cuda" else "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing == "on",
                                            gradient_checkpointing_kwargs=gc_kwargs)
    return get_peft_model(model, config)


def child(name: str, model_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    started = time.perf_counter()
    model = _build(name, model_dir, args, device)
    model.train()
    setup_s = time.perf_counter() - started
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator).to(device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast == "on"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak, kind = (rss if sys.platform == "darwin" else rss * 1024), "process_peak_rss"
    return {
        "name": name,
        "trainable_params": sum(p.numel() for p in trainable),
        "weight_bytes": _weight_bytes(model),
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": kind,
        "step_s": step_s,
        "tokens_per_s": args.batch * args.seq / step_s,
        "setup_s": setup_s,
        "final_loss": float(loss),
    }


def _describe(device: str) -> dict[str, Any]:
    """The device (``auto`` resolved) and the versions, from a warm process."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    return {"device": device, "device_name": name, "torch": torch.__version__}


def _write_model(model_config: dict[str, Any], model_dir: str) -> int:
    """A random-init (seed 0) bf16 model saved in ``model_dir``; returns its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(model_config)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters())


def _call(fn: Any, args: tuple, conn: Any) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException:  # report it, whatever it was
        conn.send(("error", traceback.format_exc()))
    conn.close()


#: imported once by the fork server, so each configuration's process starts warm
PRELOAD = ["torch", "transformers", "peft", "bitsandbytes", "framework.backbone", "fw_lora", "fw_qlora"]


def isolated(ctx: Any, fn: Any, *args: Any) -> tuple[str, Any]:
    """``fn(*args)`` in a fresh process forked from the warm server: ("ok", result) or ("error", text)."""
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_call, args=(fn, args, send))
    process.start()
    send.close()
    try:
        outcome = receive.recv()
    except EOFError:  # the process died without reporting (killed, out of memory, ...)
        outcome = ("error", "the benchmark process exited without a result")
    process.join()
    return outcome


# -- the parent: write the model, run every configuration, report ------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def table(results: list[dict[str, Any]]) -> str:
    head = ["config", "weights MiB", "peak MiB", "tokens/s", "step s", "trainable", "loss"]
    rows = [head]
    for r in results:
        if "error" in r:
            rows.append([r["name"], "failed: " + r["error"].strip().splitlines()[-1][:80], "", "", "", "", ""])
            continue
        rows.append([r["name"], _mib(r["weight_bytes"]), _mib(r["peak_memory_bytes"]), f"{r['tokens_per_s']:,.0f}",
                     f"{r['step_s']:.3f}", f"{r['trainable_params']:,}", f"{r['final_loss']:.3f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model shape (default: llama-1b on CUDA, small on CPU)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch", type=int, help="sequences per step (default: the preset's)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default: the preset's)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on")
    parser.add_argument("--autocast", choices=["on", "off"], default="on", help="bf16 autocast (as bf16-mixed)")
    parser.add_argument("--only", nargs="+", choices=CONFIGS, metavar="CONFIG", help=f"a subset of {CONFIGS}")
    parser.add_argument("--json", default="runs/bench_qlora.json", help="write the results here (default: %(default)s)")
    args = parser.parse_args(argv)

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    status, info = isolated(ctx, _describe, args.device)
    if status != "ok":
        print(info, file=sys.stderr)
        return 1
    args.device = info["device"]
    preset_name = args.preset or ("llama-1b" if args.device.startswith("cuda") else "small")
    preset = PRESETS[preset_name]
    args.batch = args.batch or preset["batch"]
    args.seq = args.seq or preset["seq"]
    report: dict[str, Any] = {
        "preset": preset_name, **info, "config": preset["model"], "batch": args.batch, "seq": args.seq,
        "steps": args.steps, "warmup": args.warmup, "r": args.r, "alpha": args.alpha,
        "gradient_checkpointing": args.gradient_checkpointing, "autocast": args.autocast, "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="fw-bench-qlora-") as model_dir:
        print(f"bench_qlora: writing a random-init {preset_name} model ...", flush=True)
        status, params = isolated(ctx, _write_model, preset["model"], model_dir)
        if status != "ok":
            print(params, file=sys.stderr)
            return 1
        report["params"] = params
        for name in args.only or CONFIGS:
            print(f"bench_qlora: {name} ...", flush=True)
            status, result = isolated(ctx, child, name, model_dir, args)
            report["results"].append(result if status == "ok" else {"name": name, "error": result})
            if status != "ok":
                print(result, file=sys.stderr)

    print(f"\n{preset_name} ({report['params'] / 1e6:,.1f} M parameters), {report['device_name']}, "
          f"batch {args.batch} x {args.seq} tokens, r={args.r}, gradient checkpointing {args.gradient_checkpointing}, "
          f"bf16 autocast {args.autocast}; {args.steps} timed steps after {args.warmup} warm-up")
    print(table(report["results"]))
    kind = next((r["peak_memory_kind"] for r in report["results"] if "peak_memory_kind" in r), "")
    print("peak: " + ("CUDA max allocated during training" if kind == "cuda_max_allocated"
                      else "the process's peak RSS (libraries and loading included)"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
