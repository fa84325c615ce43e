"""The qualitative claims of fw's seed documents (../shared/seeds: PEFT comparisons, memory
footprints, a taxonomy) that a benchmark matrix can check, checked on its aggregated rows.

Each check needs certain rows (methods by bench name) and is skipped when a matrix lacks
them. A verdict is the measured comparison, not an opinion: ``holds`` is True, False, or
None where a claimed difference is smaller than the noise (cannot tell), and ``evidence``
gives the figures. Latency is "within noise" when the difference is below
:func:`latency_noise`.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

Rows = dict[str, dict[str, Any]]


def latency_noise(rows: Rows, name: str) -> float:
    """The timing noise of ``name``'s latency figures, relative: twice its run's own spread
    (interquartile range over median, base and method timed round-robin), else the spread of
    the (identical) base model's latency across the matrix's runs; at least 2 %."""
    if rows[name].get("latency_spread") is not None:
        return max(0.02, 2 * rows[name]["latency_spread"])
    base = [r["latency_base_s"] for r in rows.values() if r.get("latency_base_s")]
    return max(0.02, 2 * statistics.stdev(base) / statistics.fmean(base)) if len(base) > 2 else 0.05


def _stored(rows: Rows, *names: str) -> tuple[bool, str]:
    values = [rows[n]["stored_params"] for n in names]
    return all(a < b for a, b in zip(values, values[1:])), " < ".join(f"{n} {v:,}" for n, v in zip(names, values))


def _merged_free(rows: Rows, name: str) -> tuple[bool, str]:
    r, noise = rows[name], latency_noise(rows, name)
    change = r["latency_merged_s"] / r["latency_base_s"] - 1
    return abs(change) <= noise, f"{name} merged {change:+.1%} vs base (noise ±{noise:.1%})"


def _slower_than_base(rows: Rows, name: str) -> tuple[bool | None, str]:
    r, noise = rows[name], latency_noise(rows, name)
    change = r["latency_unmerged_s"] / r["latency_base_s"] - 1
    holds = True if change > noise else False if change < -noise else None  # None: within noise, cannot tell
    return holds, f"{name} {change:+.1%} vs base (noise ±{noise:.1%})"


def _less_memory_than_full(rows: Rows, name: str) -> tuple[bool, str]:
    a, b = rows[name]["peak_memory_bytes"], rows["full"]["peak_memory_bytes"]
    return a < b, f"{name} {a / 2**20:,.0f} MiB vs full {b / 2**20:,.0f} MiB ({a / b - 1:+.0%})"


def _faster_step_than_full(rows: Rows, name: str) -> tuple[bool, str]:
    a, b = rows[name]["median_step_seconds"], rows["full"]["median_step_seconds"]
    return a < b, f"{name} {a * 1000:,.0f} ms vs full {b * 1000:,.0f} ms per step ({a / b - 1:+.0%})"


def _near_full(rows: Rows, name: str) -> tuple[bool, str]:
    ratio = rows[name]["score_vs_full"]
    return ratio >= 0.97, f"{name} score {ratio:.3f} × full's"


def _fewest_trainable(rows: Rows, name: str, others: list[str]) -> tuple[bool, str]:
    mine = rows[name]["trainable_params"]
    rest = {o: rows[o]["trainable_params"] for o in others}
    return all(mine <= v for v in rest.values()), f"{name} {mine:,} vs " + ", ".join(f"{o} {v:,}" for o, v in rest.items())


def _least_memory(rows: Rows, name: str, others: list[str]) -> tuple[bool, str]:
    mine = rows[name]["peak_memory_bytes"]
    rest = {o: rows[o]["peak_memory_bytes"] for o in others}
    return all(mine <= v for v in rest.values()), f"{name} {mine / 2**20:,.0f} MiB vs " + ", ".join(
        f"{o} {v / 2**20:,.0f}" for o, v in rest.items())


PEFT_ROWS = ["lora", "ia3", "bitfit", "prefix", "pfeiffer"]

#: (claim as the seeds state it, the rows it needs, the check)
CLAIMS: list[tuple[str, list[str], Callable[[Rows], tuple[bool | None, str]]]] = [
    ("IA³ stores fewer parameters than LoRA, which stores fewer than prefix tuning",
     ["ia3", "lora", "prefix"], lambda r: _stored(r, "ia3", "lora", "prefix")),
    ("Merged LoRA adds no inference latency over the base model", ["lora"], lambda r: _merged_free(r, "lora")),
    ("Merged IA³ adds no inference latency over the base model", ["ia3"], lambda r: _merged_free(r, "ia3")),
    ("Merged BitFit adds no inference latency over the base model", ["bitfit"], lambda r: _merged_free(r, "bitfit")),
    ("Serial adapters add inference latency (extra layers run in sequence)", ["pfeiffer"],
     lambda r: _slower_than_base(r, "pfeiffer")),
    ("Prompt tuning trains the fewest parameters of the PEFT methods", ["prompt", *PEFT_ROWS],
     lambda r: _fewest_trainable(r, "prompt", PEFT_ROWS)),
    ("Prompt tuning has the smallest training memory of the PEFT methods", ["prompt", *PEFT_ROWS],
     lambda r: _least_memory(r, "prompt", PEFT_ROWS)),
    ("LoRA needs less training memory than full fine-tuning", ["lora", "full"], lambda r: _less_memory_than_full(r, "lora")),
    ("Prompt tuning needs less training memory than full fine-tuning", ["prompt", "full"],
     lambda r: _less_memory_than_full(r, "prompt")),
    ("A LoRA training step is faster than a full fine-tuning step", ["lora", "full"], lambda r: _faster_step_than_full(r, "lora")),
    ("LoRA comes near full fine-tuning's task score (≥ 97 %)", ["lora", "full"], lambda r: _near_full(r, "lora")),
]


def check(rows: Rows) -> list[dict[str, Any]]:
    """Every claim whose rows the matrix has: ``{"claim", "holds", "evidence"}``."""
    out = []
    for claim, needs, test in CLAIMS:
        if all(n in rows for n in needs):
            holds, evidence = test(rows)
            out.append({"claim": claim, "holds": holds, "evidence": evidence})
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    if not results:
        return ""
    lines = ["", "## Claims of the seed documents, checked on this matrix", "", "| claim | holds | measured |", "|---|---|---|"]
    verdict = {True: "yes", False: "**no**", None: "cannot tell (within noise)"}
    lines += [f"| {c['claim']} | {verdict[c['holds']]} | {c['evidence']} |" for c in results]
    return "\n".join(lines) + "\n"
