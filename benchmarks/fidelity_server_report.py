"""Scoring, summary and plot of benchmarks/fidelity_server.py runs (one run = one server launch).

A sample is one prompt under one budget: correct (the needle's answer in the completion, or the code line
completed exactly) and agrees (the completion is the dense launch's, token for token where the server returned
ids). Summary keys per (context, budget 1/f), e.g. 32k at 1/32:
    retrieval_ratio_vs_dense_32k_b32   min over needle tasks of sparse accuracy / dense accuracy (a task dense
                                       never answers is left out; null when none is left)
    agreement_32k_b32                  share of prompts right exactly when dense is right on them
    identical_32k_b32                  share of prompts whose completion equals dense's, token for token
    code_completion_ratio_32k_b32      code accuracy / dense code accuracy (null when dense got none)
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Dict, List, Optional, Sequence

from fidelity_server_prompts import NEEDLE_TASKS, TASKS, correct, prompts_per_task


def budget_label(fraction: Optional[int], block_budget: Optional[int] = None) -> str:
    """"dense", "1/32", or "1/32 kb128" for a run whose k_b is not the default 4 k_t / 64."""
    if fraction is None:
        return "dense"
    return f"1/{fraction}" + (f" kb{block_budget}" if block_budget else "")


def _budget_order(label: str) -> tuple:
    if label == "dense":
        return (0, 0)
    frac, _, kb = label[2:].partition(" kb")
    return (int(frac), int(kb or 0))


def _same(a: dict, b: dict) -> bool:
    if a.get("output_ids") is not None and b.get("output_ids") is not None:
        return a["output_ids"] == b["output_ids"]
    return a["text"] == b["text"]


def samples(prompts: Sequence[dict], runs: Sequence[dict]) -> List[dict]:
    """One row per prompt and budget it was served at; a prompt that failed in a run is `error`, not wrong."""
    by_id = {p["id"]: p for p in prompts}
    dense = next((r for r in runs if r["token_budget"] is None), None)
    if dense is None:
        raise ValueError("no dense run (a launch without --token-budget) among the runs")
    dense_out = dense["outputs"]
    rows = []
    for run in runs:
        for pid, out in run["outputs"].items():
            p = by_id[pid]
            fraction = run["served"].get(str(p["context"])) if run["token_budget"] is not None else None
            if run["token_budget"] is not None and fraction is None:
                continue  # served for another context's budget
            row = dict(id=pid, task=p["task"], context=p["context"], label=run["label"], error=out.get("error"),
                       budget=budget_label(fraction, run.get("block_budget")))
            if not row["error"]:
                d = dense_out.get(pid)
                known = d is not None and not d.get("error")
                row.update(correct=correct(p, out["text"]), completion=out["text"],
                           agrees=_same(out, d) if known else None)
                row["consistent"] = row["correct"] == correct(p, d["text"]) if known else None
            rows.append(row)
    return rows


def scores(rows: Sequence[dict]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """context -> budget -> task -> accuracy over the prompts that returned."""
    acc = defaultdict(list)
    for r in rows:
        if not r["error"]:
            acc[(r["context"], r["budget"], r["task"])].append(r["correct"])
    out: Dict[str, Dict[str, Dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for (c, b, t), v in sorted(acc.items(), key=str):
        out[str(c)][b][t] = mean(v)
    return {c: dict(b) for c, b in out.items()}


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return None if num is None or not den else num / den


def summarize(prompts: Sequence[dict], runs: Sequence[dict], fractions: Sequence[int]) -> dict:
    rows = samples(prompts, runs)
    sc = scores(rows)
    summary: Dict[str, object] = {"prompts_per_task": min(prompts_per_task(prompts).values()),
                                  "prompts_per_task_by_task": prompts_per_task(prompts)}
    for c, by_budget in sc.items():
        dense = by_budget.get("dense", {})
        for f in fractions:
            for label in sorted((b for b in by_budget if b.split(" ")[0] == budget_label(f)), key=_budget_order):
                sparse = by_budget[label]
                kb = label.partition(" kb")[2]
                key = f"{int(c) // 1024}k_b{f}" + (f"_kb{kb}" if kb else "")
                per_task = {t: _ratio(sparse.get(t), dense.get(t)) for t in NEEDLE_TASKS if t in sparse}
                known = [v for v in per_task.values() if v is not None]
                here = [r for r in rows if r["context"] == int(c) and r["budget"] == label
                        and not r["error"] and r["agrees"] is not None]
                summary[f"retrieval_ratio_vs_dense_{key}"] = min(known) if known else None
                summary[f"retrieval_ratio_per_task_{key}"] = per_task
                summary[f"agreement_{key}"] = mean(r["consistent"] for r in here) if here else None
                summary[f"identical_{key}"] = mean(r["agrees"] for r in here) if here else None
                summary[f"code_completion_ratio_{key}"] = _ratio(sparse.get("code"), dense.get("code"))
    summary["errors"] = sum(1 for r in rows if r["error"])
    return {"summary": summary, "scores": sc, "samples": rows}


def plot(result: dict, path: Path, title: str) -> None:
    """Accuracy vs budget, one panel per task, one line per context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = result["scores"]
    budgets = sorted({b for c in sc.values() for b in c}, key=_budget_order)
    tasks = [t for t in TASKS if any(t in v for c in sc.values() for v in c.values())]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.6), sharey=True, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for c in sorted(sc, key=int):
            xs = [i for i, b in enumerate(budgets) if task in sc[c].get(b, {})]
            ax.plot(xs, [sc[c][budgets[i]][task] for i in xs], "o-", label=f"{int(c) // 1024}k")
        ax.set_xticks(range(len(budgets)), budgets)
        ax.set_title(task)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("token budget (of the context)")
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
