"""Triton kernels of AsyncTLS; each has a pure-torch twin of the same name in `sglang_asynctls.reference`.

Notations for shapes: see `sglang_asynctls/reference.py` (B, Hq, Hkv, G, D, Dv, S, BS, NB, Kb, Kt, Dc).
"""
