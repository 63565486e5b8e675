"""Scoring helpers, aggregation into rows/summary, and the plot for benchmarks/fidelity.py."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Dict, List, Sequence, Tuple

import torch

RETRIEVAL = ("passkey", "multikey", "multivalue")
METHODS = ("dense", "quest", "token_only", "asynctls")
COLORS = {"dense": "C0", "quest": "C1", "token_only": "C2", "asynctls": "C3"}
GOALS = {"retrieval_ratio_vs_dense": 0.99, "top1_agreement": 0.97, "attention_mass_recall": 0.95}


def line_spans(tok, targets: torch.Tensor) -> List[Tuple[int, int]]:
    """[start, end) index ranges of whole lines inside a window of target tokens: each ends at a token holding a
    newline (that token included); lines of < 3 tokens or only whitespace are skipped."""
    text = [tok.decode([int(t)]) for t in targets]
    ends = [i for i, s in enumerate(text) if "\n" in s]
    spans = []
    for a, b in zip(ends, ends[1:]):
        line = "".join(text[a + 1:b + 1])
        if b - a >= 3 and line.strip():
            spans.append((a + 1, b + 1))
    return spans


def lines_correct(spans: Sequence[Tuple[int, int]], correct: torch.Tensor) -> List[int]:
    """[lines whose every target token is the argmax, lines]"""
    return [sum(bool(correct[a:b].all()) for a, b in spans), len(spans)]


def _retrieval_rows(samples) -> List[dict]:
    groups = defaultdict(list)
    for s in samples:
        if s["task"] in RETRIEVAL:
            groups[(s["task"], s["context"], s["budget"], s["method"])].append(s["score"])
    return [dict(task=t, context=c, budget=b, method=m, metric="score", n=len(v), mean=mean(v), min=min(v),
                 max=max(v)) for (t, c, b, m), v in sorted(groups.items(), key=str)]


def _code_rows(samples) -> List[dict]:
    groups = defaultdict(list)
    for s in samples:
        if s["task"] == "code":
            groups[(s["context"], s["budget"], s["method"])].append(s)
    rows = []
    for (c, b, m), v in sorted(groups.items(), key=str):
        for metric in ("top1", "kl"):
            vals = [s[metric] for s in v]
            rows.append(dict(task=metric, context=c, budget=b, method=m, metric=metric, n=len(vals),
                             mean=mean(vals), min=min(vals), max=max(vals)))
        ok, tot = (sum(s["next_line"][i] for s in v) for i in (0, 1))
        rows.append(dict(task="next_line", context=c, budget=b, method=m, metric="exact_match", n=tot,
                         mean=ok / max(1, tot), correct=ok))
        if m != "dense":
            layers = torch.tensor([s["recall_per_layer"] for s in v])  # [docs, layers]
            rows.append(dict(task="attention_mass_recall", context=c, budget=b, method=m, metric="recall",
                             n=len(v), mean=layers.mean().item(), min=layers.mean(0).min().item(),
                             max=layers.mean(0).max().item(), per_layer=layers.mean(0).tolist()))
    return rows


def _pooled(samples, budget: str) -> Dict[str, Dict[str, float]]:
    """task -> method -> score pooled over contexts (dense rows included under every budget)."""
    out: Dict[str, Dict[str, float]] = defaultdict(dict)
    for m in METHODS:
        b = "dense" if m == "dense" else budget
        sel = [s for s in samples if s["method"] == m and s["budget"] == b]
        for t in RETRIEVAL:
            vals = [s["score"] for s in sel if s["task"] == t]
            if vals:
                out[t][m] = mean(vals)
        code = [s for s in sel if s["task"] == "code"]
        if code:
            out["top1_agreement"][m] = mean(s["top1"] for s in code)
            out["mean_kl"][m] = mean(s["kl"] for s in code)
            ok, tot = (sum(s["next_line"][i] for s in code) for i in (0, 1))
            out["next_line"][m] = ok / max(1, tot)
            if m != "dense":
                out["attention_mass_recall"][m] = torch.tensor([s["recall_per_layer"] for s in code]).mean().item()
    return dict(out)


def _beats(scores: Dict[str, Dict[str, float]], a: str, b: str) -> Dict[str, bool]:
    """Per task: method a at least as good as method b (lower is better only for KL)."""
    return {t: (v[a] <= v[b] if t == "mean_kl" else v[a] >= v[b]) for t, v in scores.items() if a in v and b in v}


def _get(scores, task, method):
    return scores.get(task, {}).get(method)


def summarize(samples: List[dict], fractions: Sequence[int], num_layers: int) -> dict:
    head = f"1/{fractions[0]}"
    scores = {f"1/{f}": _pooled(samples, f"1/{f}") for f in fractions}
    s = scores[head]
    ratios = {t: s[t]["asynctls"] / s[t]["dense"] if s[t]["dense"] else None
              for t in RETRIEVAL if _get(s, t, "asynctls") is not None}
    code = [x for x in samples if x["task"] == "code" and x["method"] == "asynctls" and x["budget"] == head]
    per_layer = torch.tensor([x["recall_per_layer"] for x in code]).mean(0) if code else torch.zeros(num_layers)
    beats = _beats(s, "asynctls", "quest")
    summary = {
        "budget": head,
        "retrieval_ratio_vs_dense": min((r for r in ratios.values() if r is not None), default=None),
        "retrieval_ratio_per_task": ratios,
        "top1_agreement": s.get("top1_agreement", {}).get("asynctls"),
        "mean_kl": s.get("mean_kl", {}).get("asynctls"),
        "attention_mass_recall": s.get("attention_mass_recall", {}).get("asynctls"),
        "attention_mass_recall_per_layer": [round(v, 4) for v in per_layer.tolist()],
        "next_line_ratio_vs_dense": (s["next_line"]["asynctls"] / s["next_line"]["dense"]
                                     if _get(s, "next_line", "dense") and _get(s, "next_line", "asynctls") is not None
                                     else None),
        "beats_quest_all_tasks": all(beats.values()) if beats else None, "beats_quest_per_task": beats,
        "scores": scores, "goals": GOALS,
    }
    summary["meets_goals"] = {k: summary[k] is not None and summary[k] >= g for k, g in GOALS.items()}
    return {"rows": _retrieval_rows(samples) + _code_rows(samples), "summary": summary, "samples": samples}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = result["summary"]["scores"]
    budgets = list(scores)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    tasks = [t for t in (*RETRIEVAL, "next_line", "top1_agreement") if t in scores[budgets[0]]]
    width = 0.8 / (len(METHODS) * len(budgets))
    for j, b in enumerate(budgets):
        for i, m in enumerate(METHODS):
            if m == "dense" and j:
                continue
            xs = [k + (j * len(METHODS) + i) * width for k in range(len(tasks))]
            ys = [scores[b][t].get(m, 0.0) for t in tasks]
            axes[0].bar(xs, ys, width, label=m if m == "dense" else f"{m} {b}", alpha=1.0 - 0.5 * j,
                        color=COLORS[m])
    axes[0].set_xticks([k + 0.4 for k in range(len(tasks))], tasks, rotation=15)
    axes[0].set_title("task score (pooled over contexts)")
    axes[0].legend(fontsize=7)
    for j, (b, style) in enumerate(zip(budgets, ("-", "--"))):
        for m in METHODS[1:]:
            kl = scores[b].get("mean_kl", {}).get(m)
            if kl is not None:
                axes[1].bar(f"{m}\n{b}", kl, color=COLORS[m], alpha=1.0 - 0.5 * j)
        for m in METHODS[1:]:
            rows = [r for r in result["rows"] if r["task"] == "attention_mass_recall" and r["method"] == m
                    and r["budget"] == b]
            if rows:
                layers = torch.tensor([r["per_layer"] for r in rows]).mean(0)
                axes[2].plot(layers.tolist(), style, color=COLORS[m], label=f"{m} {b}")
    axes[1].set_title("mean KL(dense || method), nats")
    axes[1].tick_params(axis="x", labelsize=7)
    axes[2].set_title("attention-mass recall per layer")
    axes[2].set_xlabel("layer")
    axes[2].legend(fontsize=7)
    model = Path(result["config"].get("model") or "SmolLM2-135M").name
    fig.suptitle(f"{model} fidelity ({result['config']['mode']}, {result['gpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # re-draw a result's plot: python benchmarks/fidelity_report.py RESULT.json
    import json
    import sys

    plot(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[1]).with_suffix(".png"))
