"""How much faster a decode step can get by changing attention alone, from profiled e2e rows.

    python3 benchmarks/step_ceiling.py --rows e2e_rows.jsonl --point 4x49152 --json OUT.json   (+ OUT.png)

Reads the flashinfer and asynctls rows of one point that `e2e_throughput.py run --profile-dir` wrote (each with a
`step_breakdown`). FlashInfer's step minus its attention kernels is what no attention path changes (weights' GEMMs,
norms, sampling, launch gaps), so step / rest is the speed-up with free attention, and step / 2 - rest the
attention time a step may take for 2x. Step times are the first run of each process (the profiler covers the second).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ATTENTION_GROUPS = ("asynctls_fine", "asynctls_coarse", "asynctls_attention", "asynctls_index_append",
                    "dense_attention")


def ceiling(rows: dict, layers: int) -> dict:
    fi, at = rows["flashinfer"], rows["asynctls"]
    g_fi, g_at = fi["step_breakdown"]["groups_us_per_step"], at["step_breakdown"]["groups_us_per_step"]
    fi_step = fi["median_decode_latency_runs_s"][0] * 1e6
    at_step = at["median_decode_latency_runs_s"][0] * 1e6
    rest = fi_step - g_fi["dense_attention"]
    ours = sum(g_at.get(k, 0.0) for k in ATTENTION_GROUPS)
    return {"flashinfer_step_us": round(fi_step, 1), "asynctls_step_us": round(at_step, 1),
            "speedup_first_runs": round(fi_step / at_step, 3),
            "flashinfer_attention_kernels_us_per_step": g_fi["dense_attention"],
            "non_attention_us_per_step": round(rest, 1),
            "ceiling_speedup_if_attention_were_free": round(fi_step / rest, 3),
            "attention_budget_for_2x_us_per_step": round(fi_step / 2 - rest, 1),
            "attention_budget_for_2x_us_per_layer": round((fi_step / 2 - rest) / layers, 1),
            "asynctls_attention_kernels_us_per_step": round(ours, 1),
            "asynctls_attention_kernels_us_per_layer": round(ours / layers, 1)}


def plot(rows: dict, derived: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    groups = sorted({g for r in rows.values() for g in r["step_breakdown"]["groups_us_per_step"]})
    bottom = {m: 0.0 for m in rows}
    for g in groups:
        vals = [rows[m]["step_breakdown"]["groups_us_per_step"].get(g, 0.0) / 1e3 for m in rows]
        ax.bar(list(rows), vals, bottom=[bottom[m] for m in rows], label=g)
        for m, v in zip(rows, vals):
            bottom[m] += v
    ax.axhline(derived["flashinfer_step_us"] / 2e3, color="k", ls="--", lw=1, label="2x target (step)")
    ax.set_ylabel("ms per decode step (profiled kernels)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", required=True, help="jsonl of e2e_throughput.py rows with step_breakdown")
    p.add_argument("--point", default="4x49152", help="BATCHxINPUT_LEN")
    p.add_argument("--layers", type=int, default=36, help="decoder layers of the model (Qwen3-8B: 36)")
    p.add_argument("--json", required=True)
    p.add_argument("--provenance", default="", help="free text recorded as is (lease, build)")
    p.add_argument("--meta", default="{}", help="JSON of where the rows ran (gpu, torch, triton, sglang, date): "
                                                  "the rows themselves do not record it")
    args = p.parse_args(argv)
    b, n = map(int, args.point.split("x"))
    rows = {r["method"]: r for r in map(json.loads, open(args.rows))
            if r.get("batch") == b and r.get("input_len") == n and "step_breakdown" in r}
    missing = {"flashinfer", "asynctls"} - set(rows)
    if missing:
        p.error(f"no profiled row for {sorted(missing)} at {args.point} in {args.rows}")
    derived = ceiling(rows, args.layers)
    command = ["python3", "benchmarks/step_ceiling.py"] + (argv or sys.argv[1:])
    out = {"benchmark": "step_ceiling", "command": " ".join(command),
           **json.loads(args.meta), "point": args.point, "provenance": args.provenance,
           "commands": {m: r.get("command") for m, r in rows.items()},
           "rows": [{k: v for k, v in r.items() if k != "log"} for r in rows.values()], "derived": derived}
    path = Path(args.json)
    path.write_text(json.dumps(out, indent=1) + "\n")
    plot(rows, derived, path.with_suffix(".png"), f"{args.point}: free attention -> "
         f"{derived['ceiling_speedup_if_attention_were_free']}x at most")
    print(json.dumps(derived, indent=1))


if __name__ == "__main__":
    main()
