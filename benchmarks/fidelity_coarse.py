"""Coarse-score variants on SmolLM2, prefill only: how much of the dense attention (and of the needle) survives
the two-level selection when only the block score changes.

    python benchmarks/fidelity_coarse.py [--context 2048] [--prompts 4] [--code 2] [--out PATH.json]

Per prompt one dense prefill of prompt + answer (teacher forcing); at every layer the queries that predict the
answer tokens (retrieval prompts: passkey, multikey, multivalue at `fidelity.depths`) or the last 32 positions
(code files) go through coarse selection with each variant's block scores, then the unchanged fine stage
(`reference.fine_select`, INT4 labels) at the fidelity harness's budgets (`fidelity.Budget.fraction_of`).
Metrics, pooled over queries, layers and query heads:
    recall          share of each head's dense attention held by the selected tokens (as in benchmarks/fidelity.py)
    needle_recall   over heads with >= 0.2 of their attention on the asked needle: share of that needle mass kept
    needle_blocks   share of those heads whose candidate blocks hold >= half of their needle mass
Variants: the reference's block_scores(bound_slack, group_score); "heavyN" (the bound over the N calibrated
heaviest channels only); "block_mass" (the dense attention mass per block: an oracle no index can compute).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from sglang_asynctls import calibrate, needles, smollm2
from sglang_asynctls import fidelity as fd
from sglang_asynctls import reference as ref
from sglang_asynctls.demo import packaged_channels

RETRIEVAL_HEAD = 0.2  # needle mass above which a head counts as retrieving it
NEEDLE_SPAN = {"passkey": 27, "multikey": 18, "multivalue": 18}  # tokens of "\n<needle sentence>\n" (about)


def variants(ranking: torch.Tensor) -> dict:
    """name -> scores(q [B, Hq, D], idx, seq_lens, layer, probs) -> [B, Hkv, NB]."""
    def reference(slack, group):
        return lambda q, idx, lens, layer, probs: ref.block_scores(q, idx.kmin, idx.kmax, idx.table.expand(
            len(q), -1), lens, 64, slack, group)

    def heavy(n):
        def f(q, idx, lens, layer, probs):
            hkv, d = ranking.shape[1:]
            keep = torch.zeros(hkv, d).scatter_(1, ranking[layer][:, :n], 1.0)
            return reference(1.0, "sum")(q * keep.repeat_interleave(q.shape[1] // hkv, 0), idx, lens, layer, probs)
        return f

    def block_mass(q, idx, lens, layer, probs):
        b, hkv, _, n = probs.shape
        nbk = int(lens.min()) // 64
        s = torch.full((b, hkv, idx.table.shape[1]), ref.NEG_INF)
        s[:, :, :nbk] = probs[..., : nbk * 64].sum(2).view(b, hkv, nbk, 64).sum(-1)
        return s

    out = {f"{g}_s{s:g}": reference(s, g) for g in ("sum", "max") for s in (1.0, 0.75, 0.5, 0.25, 0.0)}
    return out | {"heavy16": heavy(16), "heavy32": heavy(32), "block_mass": block_mass}


class Pool:
    def __init__(self):
        self.acc = {}

    def add(self, key, held, needle_mass, needle_held, needle_in_blocks):
        a = self.acc.setdefault(key, [0.0, 0, 0.0, 0.0, 0, 0])
        ret = needle_mass >= RETRIEVAL_HEAD
        a[0] += held.sum().item()
        a[1] += held.numel()
        a[2] += needle_held[ret].sum().item()
        a[3] += needle_mass[ret].sum().item()
        a[4] += int((needle_in_blocks >= 0.5 * needle_mass)[ret].sum())
        a[5] += int(ret.sum())

    def summary(self) -> dict:
        return {f"{f}/{name}": dict(recall=round(a[0] / a[1], 4),
                                    needle_recall=round(a[2] / a[3], 4) if a[3] else None,
                                    needle_blocks=f"{a[4]}/{a[5]}")
                for (f, name), a in sorted(self.acc.items())}


def evaluate(model, channels, ids, qpos, needle, context, table_of, pool):
    s = model.shape
    g, hkv, d = s.group_size, s.num_kv_heads, s.head_dim
    lens, sm = qpos + 1, d ** -0.5

    def probe(layer, q, kv):
        idx, qq, b, n = kv.index[layer], q[qpos], len(qpos), int(lens.max())
        logits = torch.einsum("bhgd,lhd->bhgl", qq.view(b, hkv, g, d), kv.k[layer][:n]) * sm
        probs = torch.softmax(logits.masked_fill(torch.arange(n)[None, None, None] >= lens[:, None, None, None],
                                                 ref.NEG_INF), -1)  # [B, Hkv, G, n]
        on_needle = torch.zeros(n)
        if needle is not None:
            on_needle[needle] = 1.0
        nm = probs * on_needle
        for f in (8, 16):
            bud = fd.Budget.fraction_of(context, f)
            for name, score in table_of.items():
                blocks = ref.select_blocks(score(qq, idx, lens, layer, probs), lens, 64, bud.block_budget,
                                           bud.sink_tokens, bud.local_window)
                cand = ref.candidate_positions(blocks, lens, 64)
                slots = ref.fine_select(qq, idx.labels, idx.scale, kv.channels[layer], kv.req_to_token,
                                        torch.zeros(b, dtype=torch.long), lens, cand, token_budget=bud.token_budget,
                                        sink_tokens=bud.sink_tokens, local_window=bud.local_window, sm_scale=sm)
                sel, in_blocks = (torch.zeros(b, hkv, n + 1).scatter_(2, torch.where(x >= 0, x.long(), n), 1.0)
                                  [..., None, :n] for x in (slots, cand))
                pool.add((f"1/{f}", name), (probs * sel).sum(-1), nm.sum(-1), (nm * sel).sum(-1),
                         (nm * in_blocks).sum(-1))

    fd.DocumentKV(model, ids, channels, extra=1, probe=probe)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--prompts", type=int, default=4, help="depths per retrieval task (multivalue: every other)")
    p.add_argument("--code", type=int, default=2, help="code files (calibrate.EVALUATION_MODULES)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    start = time.time()
    model, tok = smollm2.load_model(), smollm2.load_tokenizer()
    ranking = packaged_channels(model, model.shape.head_dim)
    channels, table_of, pool = ranking[:, :, :32].contiguous(), variants(ranking), Pool()
    for k, depth in enumerate(depths(args.prompts)):
        for task in needles.TASKS:
            if task == "multivalue" and k % 2:
                continue
            t = needles.TASKS[task](tok, args.context, depth, seed=1000 * k + args.context, straddle=bool(k % 2))
            answer = torch.tensor(tok(" " + t.questions[0][1]).input_ids)
            prompt = t.prompt(0)
            qpos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(answer))
            needle = torch.arange(t.needle_positions[0], t.needle_positions[0] + NEEDLE_SPAN[task])
            evaluate(model, channels, torch.cat([prompt, answer]), qpos, needle, args.context, table_of, pool)
    for module in calibrate.EVALUATION_MODULES[: args.code]:
        ids = torch.tensor(tok(calibrate.stdlib_source(module)).input_ids[: args.context])
        evaluate(model, channels, ids, torch.arange(len(ids) - 33, len(ids) - 1), None, args.context, table_of,
                 pool)
    result = {"benchmark": "fidelity_coarse", "command": " ".join(["python"] + sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "config": vars(args) | {"wall_s": round(time.time() - start, 1)}, "variants": pool.summary()}
    for key, row in result["variants"].items():
        print(f"{key:16s} recall {row['recall']:.4f}  needle_recall {row['needle_recall']}  "
              f"needle_blocks {row['needle_blocks']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def depths(n: int):  # as benchmarks/fidelity.py spreads needles
    return [0.05 + 0.9 * k / max(1, n - 1) for k in range(n)]


if __name__ == "__main__":
    main()
