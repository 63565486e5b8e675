"""Coarse-stage launch shapes on the GPU at 96k x 8: block_scores (tile size, warps, programs per KV group) and
select_blocks (warps), each captured alone in a CUDA graph with L2 flushed (op_latency's Timer and inputs), and the
two together. The previous MLA default (64-block tiles in 128-channel chunks, 4 warps, one tile per program) is the
row `block_scores_n64_w4_splits0`, since a program count at or above the tile count takes the one-tile path.

    python3 benchmarks/coarse_tune.py                     # MLA and GQA, writes results/coarse_tune_h100.json
    python3 benchmarks/coarse_tune.py --models mla --iters 50
"""

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from host_env import environment  # noqa: E402
from op_latency import BS, KB, SINK, WINDOW, Timer, make_case  # noqa: E402
from sglang_asynctls import reference as R  # noqa: E402
from sglang_asynctls.kernels.asynctls_decode import coarse_select  # noqa: E402
from sglang_asynctls.kernels.block_scores import _launch_shape, block_scores  # noqa: E402
from sglang_asynctls.kernels.select_blocks import select_blocks  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# (block_n, num_warps) x programs per KV group; 0 = the launcher's choice
SHAPES = {"mla": [(16, 8), (16, 4), (8, 4), (32, 8), (64, 4)], "gqa": [(64, 8), (64, 4), (32, 8)]}
SPLITS = {"mla": [0, 16, 24, 33, 48, 66, 96], "gqa": [0, 6, 12]}


def check(c, scores):
    """Max relative error of the default launch against reference.block_scores (fp32 math on the bf16 index)."""
    ref = R.block_scores(c["q"], c["kmin"], c["kmax"], c["table"], c["seq_lens"], BS)
    fin = ref.isfinite()
    assert torch.equal(fin, scores.isfinite())
    return float(((scores[fin] - ref[fin]).abs() / ref[fin].abs().clamp(min=1.0)).max())


def tune(model, timer, ctx, batch):
    c = make_case(model, ctx, batch)
    q, lens, args = c["q"], c["seq_lens"], (c["q"], c["kmin"], c["kmax"], c["table"], c["seq_lens"], BS)
    rows = {}
    for block_n, warps in SHAPES[model]:
        for splits in SPLITS[model]:
            shape = _launch_shape(q.shape[2], c["table"].shape[1], q.shape[0] * c["kmin"].shape[1], block_n, warps,
                                  splits, q.device)
            t = timer(lambda: block_scores(*args, block_n=block_n, num_warps=warps, num_splits=splits))
            rows[f"block_scores_n{block_n}_w{warps}_splits{splits}"] = dict(t, launch=shape)
    scores = block_scores(*args)
    rows["block_scores_default"] = dict(timer(lambda: block_scores(*args)),
                                        max_rel_err_vs_reference=check(c, scores))
    for warps in (1, 2, 4, 8):
        rows[f"select_blocks_w{warps}"] = timer(lambda: select_blocks(scores, lens, BS, KB, SINK, WINDOW,
                                                                      num_warps=warps))
    rows["coarse_select_default"] = timer(lambda: coarse_select(
        *args[:5], block_size=BS, block_budget=KB, sink_tokens=SINK, local_window=WINDOW))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="mla,gqa")
    p.add_argument("--context", type=int, default=98304)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default="coarse_tune_h100")
    a = p.parse_args()
    timer = Timer(a.iters, a.warmup)
    result = dict(benchmark="coarse_tune", command=" ".join(["python3"] + sys.argv),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  **environment(), context=a.context, batch=a.batch, rows={})
    for model in a.models.split(","):
        result["rows"][model] = tune(model, timer, a.context, a.batch)
        for name, r in sorted(result["rows"][model].items(), key=lambda kv: kv[1]["median_us"]):
            print(f"{model} {name:42s} {r['median_us']:7.1f} us  {r.get('launch', '')}", flush=True)
        torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, a.name + ".json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
