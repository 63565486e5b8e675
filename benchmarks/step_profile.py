"""Where a decode step's GPU time goes: kernel times from a torch-profiler chrome trace (SGLang's
`bench_one_batch --profile --profile-stage decode --profile-activities GPU`), per step, grouped by what they do.

    python3 benchmarks/step_profile.py TRACE.json.gz --steps 3
Kernels inside CUDA-graph replays are recorded by CUPTI like any other. Gaps between kernels are not kernel time:
`idle_us_per_step` is the step's span minus the sum of its kernels (launch gaps, host waits).
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict

# first match wins; names are Triton/CUDA kernel names as the profiler reports them
GROUPS = [
    ("asynctls_index_append", ("_append_decode_index_kernel", "_quantize_labels_kernel", "_block_minmax_kernel")),
    ("asynctls_coarse", ("_block_scores_kernel", "_select_blocks_kernel")),
    ("asynctls_fine", ("_token_logits_kernel", "_token_scores_kernel", "_select_tokens_kernel",
                       "_candidate_slots_kernel")),
    ("asynctls_attention", ("_sparse_decode_kernel", "_splitk_combine_kernel")),
    ("dense_attention", ("_fwd_kernel_stage", "_fwd_grouped_kernel_stage", "BatchDecode", "BatchPrefill",
                         "MergeStates", "create_flashinfer_kv_indices")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitKreduce")),
    ("norm_rope_act", ("rmsnorm", "qknorm", "rope", "act_and_mul", "fused_add")),
    ("kv_store", ("store_kvcache", "set_kv", "write_req_to_token")),
]


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k.lower() in low for k in keys):
            return group
    return "other"


def breakdown(path: str, steps: int) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        raise SystemExit(f"{path}: no GPU kernel events (was --profile-activities GPU given?)")
    by_name, by_group = defaultdict(float), defaultdict(float)
    for e in kernels:
        by_name[e["name"]] += e["dur"]
        by_group[group_of(e["name"])] += e["dur"]
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    busy = sum(by_group.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
    return {"steps": steps, "kernel_launches_per_step": round(len(kernels) / steps, 1),
            "kernel_us_per_step": round(busy / steps, 1), "span_us_per_step": round(span / steps, 1),
            "idle_us_per_step": round((span - busy) / steps, 1),
            "groups_us_per_step": {g: round(t / steps, 1) for g, t in sorted(by_group.items(), key=lambda kv: -kv[1])},
            "top_kernels_us_per_step": {n[:90]: round(t / steps, 1) for n, t in top}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("trace")
    p.add_argument("--steps", type=int, required=True)
    a = p.parse_args()
    print(json.dumps(breakdown(a.trace, a.steps), indent=1))


if __name__ == "__main__":
    main()
