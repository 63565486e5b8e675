"""GPU probe for the offload route in docs/offload.md: one virtual address range whose first part is device memory
and whose second part is pinned host memory (CUDA VMM: cuMemAddressReserve + cuMemCreate on DEVICE and on HOST
locations, mapped back to back), viewed as one CUDA tensor. Checks that torch copies and a Triton kernel read and
write across the boundary, and times what the route depends on: device writes into the host part (prefill) and
scattered 256-byte reads from it (a decode gathering K rows). Writes a JSON record; run on the GPU host only
(PYTHONPATH=repo root).

    python3 benchmarks/gpu/vmm_probe.py --host-gib 8 --out $OUT/vmm_probe.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton
import triton.language as tl

from sglang_asynctls.offload.vmm import SplitRange


@triton.jit
def _gather_rows(src, idx, dst, ROW: tl.constexpr):
    """dst[i, :] = src[idx[i], :] (rows of ROW int16 = 2*ROW bytes): a decode reading scattered K rows."""
    i = tl.program_id(0)
    r = tl.load(idx + i).to(tl.int64)
    cols = tl.arange(0, ROW)
    tl.store(dst + i.to(tl.int64) * ROW + cols, tl.load(src + r * ROW + cols))


def _time(fn, iters: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device-gib", type=float, default=2.0)
    ap.add_argument("--host-gib", type=float, default=8.0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rec = {"command": "python3 benchmarks/gpu/vmm_probe.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                    for k, v in vars(a).items()),
           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda_runtime": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    t0 = time.perf_counter()
    rng = SplitRange(int(a.device_gib * 2**30), int(a.host_gib * 2**30))
    rec["map_s"] = round(time.perf_counter() - t0, 3)
    whole = rng.view((rng.size // 2,), torch.int16)
    dev_n = rng.device_bytes // 2
    rec["device_bytes"], rec["host_bytes"] = rng.device_bytes, rng.size - rng.device_bytes

    # torch writes and reads across the boundary
    probe = torch.arange(4096, device="cuda", dtype=torch.int16)
    whole[dev_n - 2048: dev_n + 2048].copy_(probe)
    rec["torch_copy_across_boundary_ok"] = bool(torch.equal(whole[dev_n - 2048: dev_n + 2048].clone(), probe))

    # Triton gather of rows on both sides of the boundary
    row = 128  # 256 bytes: one K head row of a 128-dim bf16 model
    rows_total = whole.numel() // row
    src = whole[: rows_total * row]
    ref_rows = torch.randint(-30000, 30000, (1024, row), device="cuda", dtype=torch.int16)
    at = torch.cat([torch.arange(dev_n // row - 512, dev_n // row + 512, device="cuda")])
    src.view(rows_total, row)[at] = ref_rows
    out = torch.empty_like(ref_rows)
    _gather_rows[(1024,)](src, at.to(torch.int32), out, ROW=row)
    torch.cuda.synchronize()
    rec["triton_gather_across_boundary_ok"] = bool(torch.equal(out, ref_rows))

    # bandwidths into / out of the host part
    host_part = whole[dev_n:]
    n_write = min(host_part.numel(), 2**30)  # 2 GiB
    fill = torch.randint(-100, 100, (n_write,), device="cuda", dtype=torch.int16)
    s = _time(lambda: host_part[:n_write].copy_(fill))
    rec["device_to_host_part_copy_GBps"] = round(n_write * 2 / s / 1e9, 2)
    s = _time(lambda: fill.copy_(host_part[:n_write]))
    rec["host_part_to_device_copy_GBps"] = round(n_write * 2 / s / 1e9, 2)
    host_rows = host_part.numel() // row
    for n in (4096, 65536, 262144):
        idx = (torch.randperm(host_rows, device="cuda")[:n] + dev_n // row).to(torch.int32)
        dst = torch.empty(n, row, device="cuda", dtype=torch.int16)
        s = _time(lambda: _gather_rows[(n,)](src, idx, dst, ROW=row), iters=10)
        rec[f"triton_scattered_256B_rows_from_host_{n}_GBps"] = round(n * row * 2 / s / 1e9, 2)
        rec[f"triton_scattered_256B_rows_from_host_{n}_us"] = round(s * 1e6, 1)
        idx_d = torch.randperm(dev_n // row, device="cuda")[:n].to(torch.int32)
        s = _time(lambda: _gather_rows[(n,)](src, idx_d, dst, ROW=row), iters=10)
        rec[f"triton_scattered_256B_rows_from_device_{n}_us"] = round(s * 1e6, 1)
    rng.close()
    print(json.dumps(rec, indent=1))
    with open(a.out, "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
