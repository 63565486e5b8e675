"""Per-layer attention-mass recall of AsyncTLS as a function of that layer's token budget, on calibration text.

    python benchmarks/fidelity_layers.py [--context 2048] [--fraction 8] [--out PATH.json]

One dense prefill per calibration module (`calibrate.CALIBRATION_MODULES`, never the evaluation text); at every
layer the last `--window` positions (as teacher-forced decode rows over the prefill, like the fidelity harness's
code task) go through the two-level selection with k_t = m * context / fraction and k_b = m * the harness's k_b
for each multiplier m (as `--asynctls-layer-budget-scale` scales a layer), and the share of each head's dense
attention held by the selection is recorded. Prints the recall table and the allocation of multipliers (mean 1
over layers, i.e. the same average token budget) that maximizes the mean recall, by exact dynamic programming
over the grid (layers in --keep held at 1, none below --floor); --write-into stores it in a channel JSON as its
`layer_budget_scale`, the schedule `--asynctls-layer-budget-scale auto` (the default) takes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from sglang_asynctls import calibrate, smollm2
from sglang_asynctls import fidelity as fd
from sglang_asynctls import reference as ref
from sglang_asynctls.demo import packaged_channels

MULTIPLIERS = (0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0)  # eighths, for the allocation


def allocate(recall: torch.Tensor, mults, mean: float = 1.0) -> list:
    """recall [layers, M] at multipliers `mults` (multiples of 1/8) -> the per-layer multipliers with the given
    mean that maximize the summed recall (multiple-choice knapsack, exact)."""
    units = [round(m * 8) for m in mults]
    n = recall.shape[0]
    total = round(mean * 8 * n)
    best = {0: (0.0, [])}
    for layer in range(n):
        nxt = {}
        for used, (val, picks) in best.items():
            for j, u in enumerate(units):
                if used + u <= total:
                    cand = (val + recall[layer, j].item(), picks + [j])
                    if used + u not in nxt or cand[0] > nxt[used + u][0]:
                        nxt[used + u] = cand
        best = nxt
    val, picks = best[total]
    return [mults[j] for j in picks]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--fraction", type=int, default=8)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--bound-slack", type=float, default=1.0)
    p.add_argument("--group-score", default="sum")
    p.add_argument("--label-channels", type=int, default=32)
    p.add_argument("--keep", default="", help="layers held at multiplier 1 (e.g. 10-19), the rest allocated")
    p.add_argument("--floor", type=float, default=MULTIPLIERS[0], help="smallest multiplier a layer may get")
    p.add_argument("--candidate-scale", default=None,
                   help="with --write-into: the layer_candidate_scale to store beside the allocation")
    p.add_argument("--write-into", default=None,
                   help="channel JSON to store the allocation in as layer_budget_scale (the packaged default)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    keep = set()
    for part in filter(None, args.keep.split(",")):
        lo, _, hi = part.partition("-")
        keep |= set(range(int(lo), int(hi or lo) + 1))
    start = time.time()
    model, tok = smollm2.load_model(), smollm2.load_tokenizer()
    s = model.shape
    channels = packaged_channels(model, args.label_channels)
    base = fd.Budget.fraction_of(args.context, args.fraction, bound_slack=args.bound_slack,
                                 group_score=args.group_score)
    acc = torch.zeros(s.num_layers, len(MULTIPLIERS))
    docs = 0
    for module in calibrate.CALIBRATION_MODULES:
        ids = torch.tensor(tok(calibrate.stdlib_source(module)).input_ids[: args.context])
        if len(ids) < args.context:
            continue
        qpos = torch.arange(len(ids) - args.window - 1, len(ids) - 1)
        lens = qpos + 1

        def probe(layer, q, kv):
            qq = q[qpos]
            for j, m in enumerate(MULTIPLIERS):
                bud = replace(base, token_budget=int(base.token_budget * m), block_budget=int(base.block_budget * m))
                attn = fd.MethodAttention(kv, fd.Batch(torch.zeros(len(qpos), dtype=torch.long), lens, qpos),
                                          "asynctls", bud,
                                          observe=lambda l, q_, slots, sl: acc[layer, j].add_(
                                              fd.attention_mass(q_, kv.k[l], sl, slots, sm).mean()))
                attn.run(layer, qq)

        sm = s.head_dim ** -0.5
        fd.DocumentKV(model, ids, channels, extra=1, probe=probe)
        docs += 1
    recall = acc / docs
    free = [i for i in range(s.num_layers) if i not in keep]
    picks = [1.0] * s.num_layers
    grid = [j for j, m in enumerate(MULTIPLIERS) if m >= args.floor]
    for i, m in zip(free, allocate(recall[free][:, grid], [MULTIPLIERS[j] for j in grid])):
        picks[i] = m
    schedule = ",".join(f"{i}:{m:g}" for i, m in enumerate(picks) if m != 1.0)
    at1 = recall[:, MULTIPLIERS.index(1.0)]
    opt = torch.tensor([recall[i, MULTIPLIERS.index(m)] for i, m in enumerate(picks)])
    print("layer " + " ".join(f"{m:>6g}" for m in MULTIPLIERS))
    for i in range(s.num_layers):
        print(f"{i:5d} " + " ".join(f"{v:6.3f}" for v in recall[i].tolist()) + f"   pick {picks[i]:g}")
    print(f"mean recall uniform {at1.mean():.4f}  allocated {opt.mean():.4f}  (mean multiplier "
          f"{sum(picks) / len(picks):.3f})\nlayer_budget_scale {schedule}")
    if args.write_into:
        path = Path(args.write_into)
        meta = json.loads(path.read_text())
        meta["layer_budget_scale"] = schedule
        if args.candidate_scale is not None:
            meta["layer_candidate_scale"] = args.candidate_scale
        meta["layer_schedule"] = {"command": " ".join(["python"] + sys.argv), "mean_recall_uniform":
                                  round(at1.mean().item(), 4), "mean_recall_allocated": round(opt.mean().item(), 4)}
        path.write_text(json.dumps(meta) + "\n")
    if args.out:
        result = {"benchmark": "fidelity_layers", "command": " ".join(["python"] + sys.argv),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "config": vars(args) | {"budget": asdict(base),
                                          "modules": list(calibrate.CALIBRATION_MODULES), "docs": docs,
                                          "wall_s": round(time.time() - start, 1)},
                  "multipliers": list(MULTIPLIERS), "recall": recall.tolist(), "allocation": picks,
                  "layer_budget_scale": schedule,
                  "mean_recall_uniform": at1.mean().item(), "mean_recall_allocated": opt.mean().item()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
