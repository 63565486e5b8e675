"""Teacher-forced retrieval screen: many AsyncTLS variants over the fidelity harness's retrieval prompts, fast.

    python benchmarks/fidelity_tf_retrieval.py --variant NAME="--bound-slack 0.5 --group-score max" [...]
        [--contexts 2048,4096] [--fraction 8] [--out PATH.json]

A tuning screen, not the measurement: `benchmarks/fidelity.py` decodes greedily, this teacher-forces. Per question
of the full plan's retrieval prompts (same tasks, depths and seeds as `benchmarks/fidelity.py`) one dense prefill of
prompt + answer; the positions that predict the answer tokens then decode at once through each variant (window
rows, as the harness's code task) and the question counts as answered when every answer token is the argmax.
Greedy decode answers exactly when this holds, except that greedy decode feeds its own (sparse) K/V of the earlier
answer tokens where this feeds the dense prefill's. Variants take the harness's flags (--bound-slack,
--group-score, --label-channels, --block-size, --candidate-ratio, --layer-budget-scale, --layer-candidate-scale,
--dense-layers); prompts
whose variants need another index (block size, label channels) are prefilled once per index.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from sglang_asynctls import needles, smollm2
from sglang_asynctls import fidelity as fd
from sglang_asynctls.config import AsyncTLSConfig
from sglang_asynctls.demo import packaged_channels

sys.path.insert(0, str(Path(__file__).parent))
from fidelity import PLANS, depths  # noqa: E402


def variant_args(text: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--bound-slack", type=float, default=1.0)
    p.add_argument("--group-score", default="sum")
    p.add_argument("--label-channels", type=int, default=32)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--candidate-ratio", type=int, default=4)
    p.add_argument("--layer-budget-scale", default="")
    p.add_argument("--dense-layers", default="")
    p.add_argument("--layer-candidate-scale", default="")
    return p.parse_args(shlex.split(text))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", required=True, help='NAME="harness flags" (repeatable)')
    p.add_argument("--contexts", default="2048,4096")
    p.add_argument("--fraction", type=int, default=8)
    p.add_argument("--tasks", default=",".join(needles.TASKS))
    p.add_argument("--only", default=None,
                   help="diagnosis: only these questions, comma-separated TASK:CONTEXT:PROMPT:QUESTION indices")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    start = time.time()
    model, tok = smollm2.load_model(), smollm2.load_tokenizer()
    n_layers = model.shape.num_layers
    variants = {}
    for v in args.variant:
        name, _, flags = v.partition("=")
        variants[name] = variant_args(flags)
    by_index = defaultdict(list)  # (block size, label channels) -> variant names
    for name, va in variants.items():
        by_index[(va.block_size, va.label_channels)].append(name)
    channels = {dc: packaged_channels(model, dc) for _, dc in by_index}
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        sizes = PLANS["full"][context]
        for task in args.tasks.split(","):
            for k in range(sizes[task]):
                if only is not None and not any(o.startswith(f"{task}:{context}:{k}:") for o in only):
                    continue
                depth = depths(sizes[task])[k]
                t = needles.TASKS[task](tok, context, depth, seed=1000 * k + context, straddle=bool(k % 2))
                for qi, (q, answer) in enumerate(t.questions):
                    if only is not None and f"{task}:{context}:{k}:{qi}" not in only:
                        continue
                    ans = torch.tensor(tok(" " + answer).input_ids)
                    ids = torch.cat([t.context_ids, q, ans])
                    first = len(t.context_ids) + len(q) - 1
                    pos = torch.arange(first, first + len(ans))
                    row = dict(task=task, context=context, depth=round(depth, 3), question=qi, answer=answer)
                    for (bs, dc), names in by_index.items():
                        kv = fd.DocumentKV(model, ids, channels[dc], extra=len(pos), block_size=bs,
                                           logit_positions=pos)
                        row.setdefault("dense", bool((kv.prefill_logits.argmax(-1) == ids[pos + 1]).all()))
                        batch = kv.window_rows(pos)
                        for name in names:
                            va = variants[name]
                            cfg = AsyncTLSConfig(layer_budget_scale=va.layer_budget_scale,
                                                 layer_candidate_scale=va.layer_candidate_scale)
                            budget = fd.Budget.fraction_of(
                                context, args.fraction, candidate_ratio=va.candidate_ratio, block_size=bs,
                                bound_slack=va.bound_slack, group_score=va.group_score, layer_scale=cfg.layer_scale(),
                                candidate_scale=cfg.layer_scale("layer_candidate_scale"), num_layers=n_layers)
                            dense = frozenset(int(x) for x in va.dense_layers.split(",") if x)
                            attn = fd.MethodAttention(kv, batch, "asynctls", budget, dense)
                            logits = model.decode(ids[pos], pos, attn)
                            row[name] = bool((logits.argmax(-1) == ids[pos + 1]).all())
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    totals = {name: {} for name in ["dense", *variants]}
    for name in totals:
        for task in args.tasks.split(","):
            sel = [r for r in rows if r["task"] == task]
            totals[name][task] = f"{sum(r[name] for r in sel)}/{len(sel)}"
    for name, t in totals.items():
        print(f"{name:24s} " + "  ".join(f"{k} {v}" for k, v in t.items()))
    if args.out:
        result = {"benchmark": "fidelity_tf_retrieval", "command": " ".join(["python"] + sys.argv),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "config": vars(args) | {"wall_s": round(time.time() - start, 1)}, "totals": totals, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
