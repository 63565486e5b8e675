"""Issue 5's ceiling on this host: how much KV the offload tier can hold in pinned host memory.

    python3 benchmarks/host_pinned_capacity.py --json $OUT/host_pinned_capacity_h100.json [--step-gib 4 --cap-gib 120]
                                                                                             (+ .png)

Pins host memory in steps (torch.empty(pin_memory=True)) until an allocation fails, MemAvailable would drop below
--reserve-gib (the process must not be OOM-killed mid-run), or --cap-gib; then times one pinned host->device copy
of a step. Converts the pinned total into 96k requests of a model's KV (default Qwen3-8B: 36 layers, 8 KV heads,
head dim 128, bf16 K and V = 144 KiB per token). The JSON is rewritten after every step, so a killed run still
leaves its last good figure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import torch

from host_env import environment


def meminfo() -> dict:
    """/proc/meminfo in GiB (MemTotal, MemAvailable, ...)."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0]) / 2**20  # kB -> GiB
    return out


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    return layers * kv_heads * head_dim * 2 * dtype_bytes  # K and V


def plot(record: dict, path: str) -> None:
    """Pinned GiB against the KV of N 96k requests."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = record["kv_gib_per_request"]
    n = int(record["pinned_gib"] // per) + 2
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(1, n + 1), [per * i for i in range(1, n + 1)], color="tab:blue", label="KV of N requests (GiB)")
    ax.axhline(record["pinned_gib"], color="k", ls="--", label=f"pinned before the reserve: {record['pinned_gib']} GiB")
    ax.set_xlabel(f"concurrent {record['config']['context']}-token requests")
    ax.set_ylabel("GiB")
    ax.set_title(f"{record['gpu']} host: {record['requests_96k_in_pinned']} requests fit in pinned memory", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--step-gib", type=float, default=4.0)
    p.add_argument("--cap-gib", type=float, default=120.0)
    p.add_argument("--reserve-gib", type=float, default=6.0, help="stop before MemAvailable falls below this")
    p.add_argument("--context", type=int, default=98304)
    p.add_argument("--kv-shape", default="36,8,128", help="layers,kv_heads,head_dim of the served model")
    args = p.parse_args(argv)
    layers, kv_heads, head_dim = (int(x) for x in args.kv_shape.split(","))
    per_request = kv_bytes_per_token(layers, kv_heads, head_dim) * args.context
    step = int(args.step_gib * 2**30)
    record = {"benchmark": "host_pinned_capacity", "command": " ".join(["python3"] + sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **environment(), "meminfo_before_gib": {k: round(v, 2) for k, v in meminfo().items()
                                                      if k in ("MemTotal", "MemAvailable", "HugePages_Total")},
              "config": vars(args), "kv_gib_per_request": round(per_request / 2**30, 3)}
    chunks, stop = [], "cap"
    start = time.time()
    while (len(chunks) + 1) * args.step_gib <= args.cap_gib:
        if meminfo()["MemAvailable"] - args.step_gib < args.reserve_gib:
            stop = "reserve"
            break
        try:
            chunks.append(torch.empty(step, dtype=torch.uint8, pin_memory=True))
        except RuntimeError as e:  # cudaHostAlloc refused
            stop = f"alloc failed: {str(e).splitlines()[0][:160]}"
            break
        pinned = len(chunks) * step
        record |= {"pinned_gib": round(pinned / 2**30, 1), "stopped_by": "running",
                   "requests_96k_in_pinned": pinned // per_request,
                   "meminfo_now_gib": round(meminfo()["MemAvailable"], 2)}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"pinned {record['pinned_gib']} GiB, MemAvailable {record['meminfo_now_gib']} GiB", flush=True)
    record["stopped_by"] = stop
    record["pin_seconds"] = round(time.time() - start, 1)
    if chunks:  # the pinned pages are real: one step host->device at full speed
        dev = torch.empty(step, dtype=torch.uint8, device="cuda")
        dev.copy_(chunks[-1], non_blocking=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(chunks[-1], non_blocking=True)
        torch.cuda.synchronize()
        record["h2d_gb_per_s_last_chunk"] = round(step / (time.perf_counter() - t0) / 1e9, 1)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1)
    plot(record, args.json.rsplit(".", 1)[0] + ".png")
    print(json.dumps({k: v for k, v in record.items() if k not in ("config",)}, indent=1))


if __name__ == "__main__":
    main()
