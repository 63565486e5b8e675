"""Issue 3 kernel A/B: one consolidated JSON + bar plot from the per-variant op_latency files that
benchmarks/gpu/issue3_ab.sh writes ($OUT/issue3_ab_VARIANT.json: MLA and GQA at 96k x 8, k_t 1024, one kernel path
switched per variant).

    python3 benchmarks/issue3_ab_report.py DIR/issue3_ab_*.json --build 6c1ade9 \
        --out benchmarks/results/issue3_ab_h100.json          (+ .png beside it)

Per variant: the switches it ran with, the op_latency command (SGLANG_ASYNCTLS_PDL from the recorded config), the
AsyncTLS step median (µs) for MLA and GQA, the summary ratios, the per-stage medians and the step's difference to
the "default" variant. The source files' sha256 are kept, so the numbers can be traced back to them.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path

MODELS = ("mla", "gqa")
STAGES = ("1_block_scores", "2_select_blocks", "3+4_token_logits_and_combine", "5_select_token_slots",
          "6_sparse_decode", "3-5_fine_default", "3-5_fine_recompute")
SHAPE = dict(context=98304, batch=8, token_budget=1024)  # the headline shape issue3_ab.sh times
VERSION_KEYS = ("gpu", "torch", "triton", "sglang")


def _row(rows, model, method):
    for r in rows:
        if r["model"] == model and r["method"] == method and all(r.get(k, v) == v for k, v in SHAPE.items()):
            return r
    raise SystemExit(f"no {method} row for {model} at {SHAPE}")


def variant(path: Path) -> dict:
    data = json.loads(path.read_text())
    name = path.stem.removeprefix("issue3_ab_")
    cfg = data["config"]
    pdl = bool(cfg.get("programmatic_dependent_launch"))
    out = dict(variant=name, source=path.name, source_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
               command=f"SGLANG_ASYNCTLS_PDL={int(pdl)} {data['command']}", date=data["date"],
               switches=dict(kernel_options=cfg.get("kernel_options", {}),
                             wide_group_combine=cfg.get("wide_group_combine"), programmatic_dependent_launch=pdl),
               skipped=cfg.get("skipped", []), summary=data["summary"],
               versions={k: data.get(k) for k in VERSION_KEYS})
    for model in MODELS:
        stages = _row(data["rows"], model, "asynctls_stages")["stages"]
        out[model] = dict(asynctls_us=_row(data["rows"], model, "asynctls")["median_us"],
                          stages_us={s: stages[s]["median_us"] for s in STAGES})
    return out


def consolidate(paths, build: str, command: str, gpu_tests: dict) -> dict:
    variants = [variant(Path(p)) for p in paths]
    by_name = {v["variant"]: v for v in variants}
    versions = {k: sorted({v["versions"][k] for v in variants}) for k in VERSION_KEYS}
    mixed = {k: vals for k, vals in versions.items() if len(vals) > 1}
    if mixed:
        raise SystemExit(f"the variants ran on different setups: {mixed}")
    base = by_name.get("default")
    for v in variants:
        del v["versions"]
        for model in MODELS:
            if base is not None:
                v[model]["minus_default_us"] = v[model]["asynctls_us"] - base[model]["asynctls_us"]
    narrow = {on: [v[m]["stages_us"]["2_select_blocks"] for v in variants for m in MODELS
                   if bool(v["switches"]["kernel_options"].get("select_blocks.NARROW_BITS")) == on]
              for on in (True, False)}
    dates = sorted(v["date"] for v in variants)
    return dict(benchmark="issue3_ab", command=command, date=dates[0], measured_until=dates[-1],
                report_written=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), build=build,
                **{k: vals[0] for k, vals in versions.items()},
                shape=dict(models=list(MODELS), **SHAPE), gpu_tests=gpu_tests,
                select_blocks_us_range=dict(narrow_on=[min(narrow[True]), max(narrow[True])] if narrow[True] else None,
                                            narrow_off=[min(narrow[False]), max(narrow[False])]
                                            if narrow[False] else None),
                variants=variants)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = result["variants"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    x = range(len(variants))
    for i, model in enumerate(MODELS):
        us = [v[model]["asynctls_us"] for v in variants]
        bars = ax.bar([j + (i - 0.5) * 0.4 for j in x], us, width=0.4, label=model.upper())
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(list(x), [v["variant"] for v in variants])
    ax.set_ylabel("AsyncTLS µs per layer step (median)")
    ax.set_title(f"Issue 3 kernel A/B, {result['gpu']}, 96k x 8, k_t 1024 (build {result['build']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="issue3_ab_VARIANT.json files, in the order to report them")
    p.add_argument("--out", default="benchmarks/results/issue3_ab_h100.json")
    p.add_argument("--build", required=True, help="git commit the GPU run used (op_latency does not record it)")
    p.add_argument("--gpu-tests-command", default="", help="the bf16 GPU tests run before the timings")
    p.add_argument("--gpu-tests-result", default="", help="their pytest summary line")
    a = p.parse_args(argv)
    command = shlex.join(["python3", os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    tests = dict(command=a.gpu_tests_command, result=a.gpu_tests_result) if a.gpu_tests_command else None
    result = consolidate(a.files, a.build, command, tests)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    for v in result["variants"]:
        print(f"{v['variant']:>10}  " + "  ".join(f"{m} {v[m]['asynctls_us']:6.2f} µs" for m in MODELS))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
