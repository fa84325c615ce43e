"""Qualitative claims (the seed documents': PEFT comparisons, memory footprints, a taxonomy)
checked on a benchmark matrix's aggregated rows.

The claims themselves, with the rows (methods by bench name) each compares, are data of the
bench config (``claims:`` in ``recipes/bench/*.yaml``); this module holds the generic checks
they name. A claim is skipped when the matrix lacks one of its rows. A verdict is the
measured comparison, not an opinion: ``holds`` is True, False, or None where a claimed
difference is smaller than the noise (cannot tell), and ``evidence`` gives the figures.
Latency is "within noise" when the difference is below :func:`latency_noise`.
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


def _memory_reduction(rows: Rows, name: str, expected: float, tolerance: float = 10.0) -> tuple[bool, str]:
    """The seed's "X % less training memory than full fine-tuning", within ``tolerance``
    percentage points."""
    a, b = rows[name]["peak_memory_bytes"], rows["full"]["peak_memory_bytes"]
    reduction = 100 * (1 - a / b)
    return abs(reduction - expected) <= tolerance, (
        f"{name} {a / 2**30:,.2f} GiB vs full {b / 2**30:,.2f} GiB: {reduction:.1f} % less "
        f"(claimed {expected:.1f} %, ±{tolerance:g} points)")


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


#: the checks a bench config's ``claims`` can name: (check(rows, *its rows[, others]), rows it
#: always needs besides the claim's own)
CHECKS: dict[str, tuple[Callable[..., tuple[bool | None, str]], list[str]]] = {
    "stored_fewer_in_order": (_stored, []),
    "merged_adds_no_latency": (_merged_free, []),
    "slower_than_base": (_slower_than_base, []),
    "less_memory_than_full": (_less_memory_than_full, ["full"]),
    "memory_reduction_vs_full": (_memory_reduction, ["full"]),
    "faster_step_than_full": (_faster_step_than_full, ["full"]),
    "near_full_score": (_near_full, ["full"]),
    "fewest_trainable": (_fewest_trainable, []),
    "least_memory": (_least_memory, []),
}


def validate(claims: list[dict[str, Any]], where: str) -> None:
    """Each claim of a bench config names a known check, the rows it needs, and its text."""
    for i, claim in enumerate(claims):
        if not isinstance(claim, dict) or not {"claim", "check", "rows"} <= claim.keys():
            raise ValueError(f"{where}: claims[{i}]: expected a mapping with claim, check and rows (and optionally others)")
        if claim["check"] not in CHECKS:
            raise ValueError(f"{where}: claims[{i}].check: unknown {claim['check']!r}; known: {', '.join(CHECKS)}")
        for key in ("expected", "tolerance"):  # a claimed figure (e.g. a reduction in %) and its slack
            if key in claim and not isinstance(claim[key], (int, float)):
                raise ValueError(f"{where}: claims[{i}].{key}: expected a number, got {claim[key]!r}")


def check(rows: Rows, claims: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every claim whose rows the matrix has: ``{"claim", "holds", "evidence"}``. ``claims``
    come from the bench config: ``{claim: text, check: name in CHECKS, rows: [...], others: [...]}``,
    with ``expected`` (and ``tolerance``) for checks of a claimed figure."""
    out = []
    for claim in claims:
        others = list(claim.get("others", []))
        test, needs = CHECKS[claim["check"]]
        figures = {k: claim[k] for k in ("expected", "tolerance") if k in claim}
        if all(n in rows for n in [*claim["rows"], *others, *needs]):
            args = [*claim["rows"], others] if others else claim["rows"]
            holds, evidence = test(rows, *args, **figures)
            out.append({"claim": claim["claim"], "holds": holds, "evidence": evidence})
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    if not results:
        return ""
    lines = ["", "## Claims of the seed documents, checked on this matrix", "", "| claim | holds | measured |", "|---|---|---|"]
    verdict = {True: "yes", False: "**no**", None: "cannot tell (within noise)"}
    lines += [f"| {c['claim']} | {verdict[c['holds']]} | {c['evidence']} |" for c in results]
    return "\n".join(lines) + "\n"
