"""What reading selected KV rows from the host tier costs a decode step (GPU only; PYTHONPATH = repo root).

    python3 benchmarks/gpu/host_read_cost.py --out $OUT/host_read_cost_h100.json
    python benchmarks/gpu/host_read_cost.py --plot benchmarks/results/host_read_cost_h100.json  # PNG beside it, no GPU

K and V buffers are SplitRanges (offload/vmm.py) as the server builds them with --asynctls-host-kv-gib: device
rows, then pinned host rows. `sparse_decode` attends k_t selected slots per (request, KV head) of a Qwen3-8B-shaped
layer; a fraction `host` of them lies in host rows. One CUDA graph replays `--layers` layer calls, each with its
own random slots (so the 50 MB L2 does not serve one layer's rows to the next), and the time per layer is the
replay time / layers: what the host share adds to each layer of a decode step at that batch.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton

HKV, G, D = 8, 4, 128  # Qwen3-8B: 8 KV heads, 32 query heads, head dim 128


def random_slots(batch: int, k: int, device_rows: int, host_rows: int, host: float, gen) -> torch.Tensor:
    """[batch, HKV, k] random slots per (row, head) (a repeat now and then does not matter for timing); the last
    round(host * k) of each row are >= device_rows, i.e. in host memory."""
    n_host = round(host * k)
    dev = torch.randint(0, device_rows, (batch, HKV, k - n_host), generator=gen)
    hst = torch.randint(0, host_rows, (batch, HKV, n_host), generator=gen) + device_rows
    return torch.cat([dev, hst], dim=2).to(torch.int32)


def time_graph(fn, iters: int) -> float:
    """Seconds per replay of a CUDA graph of fn()."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()  # compile and warm outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def plot(rec: dict, path: str) -> None:
    """us per layer against the host share, one line per batch, each point labelled with its implied host GB/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for batch in sorted({r["batch"] for r in rec["rows"]}):
        rows = sorted((r for r in rec["rows"] if r["batch"] == batch), key=lambda r: r["host_share"])
        xs, ys = [r["host_share"] for r in rows], [r["us_per_layer"] for r in rows]
        ax.plot(xs, ys, "o-", label=f"batch {batch}")
        for r in rows:
            if r["host_GBps"]:
                ax.annotate(f"{r['host_GBps']:g} GB/s", (r["host_share"], r["us_per_layer"]), fontsize=7,
                            textcoords="offset points", xytext=(-8, 6), ha="right")
    ax.set_yscale("log")
    ax.set_xlabel(f"share of the {rec['rows'][0]['token_budget']} selected rows read from pinned host memory")
    ax.set_ylabel("us per layer (CUDA-graph replay / layers)")
    ax.set_title(f"{rec['gpu']}: sparse_decode, SplitRange K/V; labels: host GB/s", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plot", metavar="JSON", help="only write JSON's PNG beside it (no GPU needed)")
    ap.add_argument("--device-rows", type=int, default=262144)
    ap.add_argument("--host-rows", type=int, default=524288)
    ap.add_argument("--batches", default="1,9")
    ap.add_argument("--token-budget", type=int, default=1024)
    ap.add_argument("--host-shares", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.plot:
        with open(a.plot) as f:
            plot(json.load(f), a.plot.rsplit(".", 1)[0] + ".png")
        return
    if not a.out:
        ap.error("--out is required unless --plot")
    from sglang_asynctls.kernels.sparse_decode import sparse_decode
    from sglang_asynctls.offload.vmm import SplitRange

    rec = {"benchmark": "host_read_cost",
           "command": "python3 benchmarks/gpu/host_read_cost.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "plot"),
           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "shape": {"kv_heads": HKV, "group": G, "head_dim": D, "dtype": "bfloat16"}, "rows": []}
    row_bytes = HKV * D * 2
    ranges = [SplitRange(a.device_rows * row_bytes, a.host_rows * row_bytes) for _ in range(2)]
    k_buf, v_buf = (r.view((a.device_rows + a.host_rows, HKV, D), torch.bfloat16) for r in ranges)
    for buf in (k_buf, v_buf):
        buf.normal_()
    gen = torch.Generator().manual_seed(0)
    for batch in (int(x) for x in a.batches.split(",")):
        q = torch.randn(batch, HKV * G, D, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(batch, HKV * G, D, device="cuda", dtype=torch.bfloat16)
        for host in (float(x) for x in a.host_shares.split(",")):
            slots = [random_slots(batch, a.token_budget, a.device_rows, a.host_rows, host, gen).cuda()
                     for _ in range(a.layers)]

            def step():
                for s in slots:
                    sparse_decode(q, k_buf, v_buf, s, D ** -0.5, out=out)

            sec = time_graph(step, a.iters) / a.layers
            host_bytes = round(host * a.token_budget) * batch * HKV * 2 * D * 2  # K and V rows of one head
            row = {"batch": batch, "token_budget": a.token_budget, "host_share": host,
                   "us_per_layer": round(sec * 1e6, 2), "host_bytes_per_layer": host_bytes,
                   "host_GBps": round(host_bytes / sec / 1e9, 2) if host_bytes else None,
                   "ms_per_36_layers": round(sec * 36e3, 3)}
            rec["rows"].append(row)
            print(json.dumps(row), flush=True)
    for r in ranges:
        r.close()
    with open(a.out, "w") as f:
        json.dump(rec, f, indent=1)
    plot(rec, a.out.rsplit(".", 1)[0] + ".png")


if __name__ == "__main__":
    main()
