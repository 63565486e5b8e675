"""Shared inputs and checks for the kernel tests (tests/test_kernels_*.py)."""

import torch

from sglang_asynctls import reference as R

# small dims: the CPU runs kernels in the Triton interpreter; MLA keeps its shape (D = 2^a + 2^b, V = K[:Dv])
SHAPES = {"gqa": dict(hq=8, hkv=2, d=32, dc=8), "mha": dict(hq=3, hkv=3, d=16, dc=4),
          "mla": dict(hq=5, hkv=1, d=80, dv=64, dc=16, mla=True)}
GPU_SHAPES = {"gqa": dict(hq=32, hkv=8, d=128, dc=32), "mla": dict(hq=20, hkv=1, d=576, dv=512, dc=128, mla=True)}
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def make_cache(lens, hq, hkv, d, dv=None, dc=8, bs=8, mla=False, dtype=torch.float32, device="cpu", seed=0):
    """KV pool with permuted slots for requests of `lens` at scattered req_to_token rows, and its index."""
    g = torch.Generator().manual_seed(seed)
    dv = dv or d
    total = sum(lens) + 7
    k = torch.randn(total, hkv, d, generator=g).to(dtype)
    v = k[..., :dv] if mla else torch.randn(total, hkv, dv, generator=g).to(dtype)
    perm = torch.randperm(total, generator=g)
    rows = torch.arange(len(lens)) * 2 + 1
    r2t = torch.zeros(2 * len(lens) + 1, max(lens) + 3, dtype=torch.int32)
    start = 0
    for row, n in zip(rows.tolist(), lens):
        r2t[row, :n] = perm[start:start + n].to(torch.int32)
        start += n
    channels = torch.stack([torch.randperm(d, generator=g)[:dc] for _ in range(hkv)])
    q = torch.randn(len(lens), hq, d, generator=g).to(dtype)
    c = dict(q=q, k=k, v=v, r2t=r2t, rows=rows, seq_lens=torch.tensor(lens), channels=channels)
    c = {n: t.to(device) for n, t in c.items()}
    if mla:
        c["v"] = c["k"][..., :dv]
    c["index"] = R.build_index(c["k"], c["r2t"], c["rows"], c["seq_lens"], c["channels"], bs)
    c["bs"] = bs
    c["sm_scale"] = d ** -0.5
    return c


def method_args(c):
    kmin, kmax, table, labels, scale = c["index"]
    return (c["q"], c["k"], c["v"], c["r2t"], c["rows"], c["seq_lens"], kmin, kmax, table, labels, scale,
            c["channels"])


# the selection kernels compare priorities at bfloat16 resolution (kernels/_topk.py, KEY_BITS = 16)
KEY_RTOL = 2.0 ** -7


def assert_topk_set(picked, candidates, priority, budget, tol=0.0, rtol=KEY_RTOL):
    """picked: [..., K] ids (-1 padded) drawn from candidates [..., C] (ids, -1 invalid) with priorities
    [..., C] (+inf forced, -inf never). Checks the set is a valid top-`budget` up to ties within `tol` +
    `rtol` * |priority|: distinct, the right size, and no left-out candidate beats a picked one by more."""
    picked, candidates, priority = picked.cpu().long(), candidates.cpu().long(), priority.cpu().double()
    for i in range(picked.shape[0]):
        for h in range(picked.shape[1]):
            sel = picked[i, h][picked[i, h] >= 0]
            ok = (candidates[i, h] >= 0) & (priority[i, h] > float("-inf"))
            assert len(sel) == min(budget, int(ok.sum())), (i, h, len(sel))
            assert len(set(sel.tolist())) == len(sel)
            chosen = torch.isin(candidates[i, h], sel) & ok
            assert int(chosen.sum()) == len(sel), "picked an invalid candidate"
            if len(sel) and bool((ok & ~chosen).any()):
                worst_in = priority[i, h][chosen].min()
                best_out = priority[i, h][ok & ~chosen].max()
                slack = tol + rtol * max(abs(float(best_out)), abs(float(worst_in)))
                assert best_out <= worst_in + slack or worst_in == float("inf"), (i, h, float(best_out),
                                                                                   float(worst_in))
