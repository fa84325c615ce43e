"""Aggregate a benchmark's runs per method: results.json (every raw figure and the
aggregates), results.md (the table, fw/PEFT ratios) and PNG plots."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any, Callable

from framework.bench import claims


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _std(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)


def _peak_memory(record: dict[str, Any]) -> float:
    return record.get("train_peak_memory_bytes", record["peak_memory_bytes"])


def paired_ratio(fw_runs: list[dict[str, Any]], peft_runs: list[dict[str, Any]],
                 figure: Callable[[dict[str, Any]], float | None]) -> float | None:
    """fw / PEFT as the median over seeds of the ratio of the two runs with the same seed (run
    back to back), so one run caught in a slow spell of the machine does not set the ratio."""
    peft_by_seed = {r["seed"]: r for r in peft_runs}
    pairs = [(figure(r), figure(peft_by_seed[r["seed"]])) for r in fw_runs if r["seed"] in peft_by_seed]
    ratios = [fw / peft for fw, peft in pairs if fw and peft]
    return statistics.median(ratios) if ratios else None


def score_key(record: dict[str, Any]) -> str:
    metrics = record["metrics"]
    for key in ("test/accuracy", "test/perplexity", "test/loss", "val/accuracy", "val/loss"):
        if key in metrics:
            return key
    raise KeyError(f"no test or validation metric in run {record['method']}/seed {record['seed']}: {sorted(metrics)}")


def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by_method: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_method.setdefault(record["method"], []).append(record)
    rows = {}
    for name, runs in by_method.items():
        key = score_key(runs[0])
        scores = [r["metrics"][key] for r in runs]
        curves = [r["train_losses"] for r in runs if r["train_losses"]]
        length = min((len(c) for c in curves), default=0)
        # training consistency: the spread across seeds of the loss curve, averaged over steps
        curve_std = _mean([_std([c[i] for c in curves]) for i in range(length)]) if len(curves) > 1 else None
        params = runs[0]["params"]
        rows[name] = {
            "reference_of": runs[0].get("reference_of"),
            "seeds": [r["seed"] for r in runs],
            "trainable_params": params["trainable_params"],
            "trainable_pct": 100 * params["trainable_params"] / params["backbone_params"],
            "stored_params": params["stored_params"],
            "stored_pct": 100 * params["stored_params"] / params["backbone_params"],
            "peak_memory_bytes": _mean([_peak_memory(r) for r in runs]),
            "memory_above_start_bytes": _mean([r.get("train_memory_above_start_bytes") for r in runs]),
            "memory_measure": runs[0]["peak_memory_measure"],
            "median_step_seconds": _mean([r.get("median_step_seconds") for r in runs]),
            "examples_per_second": _mean([r.get("train_examples_per_second") for r in runs]),
            "latency_base_s": _mean([r.get("latency_base_s") for r in runs]),
            "latency_unmerged_s": _mean([r.get("latency_unmerged_s") for r in runs]),
            "latency_merged_s": _mean([r.get("latency_merged_s") for r in runs]),
            "latency_spread": _mean([r.get("latency_spread") for r in runs]),
            "checkpoint_bytes": _mean([r["checkpoint_bytes"] for r in runs]),
            "score_metric": key,
            "score_mean": _mean(scores),
            "score_std": _std(scores),
            "loss_curve_std": curve_std,
        }
    full = next((row for name, row in rows.items() if name == "full"), None)
    for name, row in rows.items():
        row["score_vs_full"] = row["score_mean"] / full["score_mean"] if full and full["score_mean"] else None
        ref = rows.get(row["reference_of"] or "")
        if ref:  # this row is PEFT's implementation of `reference_of`: fw / PEFT
            fw_runs, peft_runs = by_method[row["reference_of"]], by_method[name]
            ref["fw_over_peft_step_time"] = paired_ratio(fw_runs, peft_runs, lambda r: r.get("median_step_seconds"))
            ref["fw_over_peft_memory"] = paired_ratio(fw_runs, peft_runs, _peak_memory)
    floor = rows.get("linear_probe")
    for row in rows.values():
        if floor and floor["median_step_seconds"]:
            row["step_time_over_frozen_floor"] = row["median_step_seconds"] / floor["median_step_seconds"]
    return rows


def _fmt(value: Any, scale: float = 1.0, digits: int = 2) -> str:
    return "–" if value is None else f"{value * scale:,.{digits}f}"


def markdown(rows: dict[str, dict[str, Any]], title: str) -> str:
    head = ("| method | trainable | stored | peak mem MiB (rise) | step ms | ex/s | ×floor | fw/PEFT step | fw/PEFT mem "
            "| latency ms base / unmerged / merged | ckpt MiB | score ± std | vs full | loss-curve std |")
    lines = [f"# {title}", "", head, "|" + "---|" * 14]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['trainable_params']:,} ({r['trainable_pct']:.3f} %) | {r['stored_params']:,} ({r['stored_pct']:.3f} %) "
            f"| {_fmt(r['peak_memory_bytes'], 2**-20, 0)} ({_fmt(r['memory_above_start_bytes'], 2**-20, 0)}) "
            f"| {_fmt(r['median_step_seconds'], 1000, 0)} | {_fmt(r['examples_per_second'], 1, 1)} "
            f"| {_fmt(r.get('step_time_over_frozen_floor'))} | {_fmt(r.get('fw_over_peft_step_time'))} "
            f"| {_fmt(r.get('fw_over_peft_memory'))} "
            f"| {_fmt(r['latency_base_s'], 1000, 1)} / {_fmt(r['latency_unmerged_s'], 1000, 1)} / {_fmt(r['latency_merged_s'], 1000, 1)} "
            f"| {_fmt(r['checkpoint_bytes'], 2**-20, 2)} | {_fmt(r['score_mean'], 1, 4)} ± {_fmt(r['score_std'], 1, 4)} "
            f"| {_fmt(r['score_vs_full'], 1, 3)} | {_fmt(r['loss_curve_std'], 1, 4)} |"
        )
    metric = next(iter(rows.values()))["score_metric"] if rows else ""
    lines += ["", f"score: {metric}, mean over seeds. Memory: {next(iter(rows.values()))['memory_measure'] if rows else ''}; "
              "(rise) = peak minus the process's memory at fit start. ×floor: step time over the linear probe's "
              "(the same frozen backbone, only the head training). fw/PEFT: fw's row over Hugging Face PEFT's "
              "implementation in the same loop, data and batch: the median over seeds of the ratio of the two "
              "runs with the same seed (below 1: fw is faster/lighter)."]
    return "\n".join(lines) + "\n"


def plots(rows: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = list(rows)
    is_peft = {n: rows[n]["reference_of"] in rows for n in names}  # PEFT's implementation of a fw row
    colour = {n: f"C{i % 10}" for i, n in enumerate(n for n in names if not is_peft[n])}
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        r = rows[name]
        point = (max(r["trainable_pct"], 1e-4), r["score_mean"])
        c = colour[r["reference_of"] if is_peft[name] else name]
        ax.errorbar(*point, yerr=r["score_std"] or 0, fmt="o", capsize=3, color=c, mfc="none" if is_peft[name] else c)
        if not is_peft[name]:  # its PEFT twin sits on (nearly) the same point
            ax.annotate(name, point, fontsize=8, xytext=(3, 3), textcoords="offset points")
    if any(is_peft.values()):
        ax.text(0.01, 0.01, "hollow: Hugging Face PEFT's implementation of the same method", fontsize=7, transform=ax.transAxes)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of backbone, log)")
    ax.set_ylabel(next(iter(rows.values()))["score_metric"])
    ax.set_title("task score vs trainable parameters")
    fig.tight_layout()
    paths.append(out / "score_vs_params.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.barh(names, [(rows[n]["peak_memory_bytes"] or 0) / 2**20 for n in names],
            color=["tab:orange" if is_peft[n] else "tab:blue" for n in names])
    ax.set_xlabel(f"peak training memory, MiB ({next(iter(rows.values()))['memory_measure']})")
    ax.set_title("peak memory per method")
    fig.tight_layout()
    paths.append(out / "peak_memory.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def write(records: list[dict[str, Any]], out: Path, title: str,
          claim_list: list[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records)
    checked = claims.check(rows, claim_list or [])
    (out / "results.json").write_text(json.dumps({"runs": records, "methods": rows, "claims": checked}, indent=2) + "\n")
    (out / "results.md").write_text(markdown(rows, title) + claims.markdown(checked))
    plots(rows, out)
    return rows


def to_wandb(rows: dict[str, dict[str, Any]], out: Path, wandb_args: dict[str, Any]) -> None:
    """The aggregated table (and the plots) as one W&B run of the benchmark's group; offline
    when no W&B credentials are found, as fw's runs are."""
    import wandb

    from framework.wandb_credentials import wandb_has_credentials

    args = dict(wandb_args)
    offline = args.pop("offline", None)
    if offline or (offline is None and "WANDB_MODE" not in os.environ and not wandb_has_credentials()):
        args["mode"] = "offline"
    keys = list(dict.fromkeys(k for row in rows.values() for k in row))  # rows differ (ratios, floor)
    cell = lambda v: json.dumps(v) if isinstance(v, list) else v  # noqa: E731
    table = wandb.Table(columns=["method", *keys], data=[[name, *(cell(row.get(k)) for k in keys)] for name, row in rows.items()])
    run = wandb.init(dir=str(out), group=out.name, name=f"{out.name}/results", job_type="bench", **args)
    run.log({"results": table, **{p.stem: wandb.Image(str(p)) for p in sorted(out.glob("*.png"))}})
    run.finish()
