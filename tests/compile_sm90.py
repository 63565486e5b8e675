"""Compile kernels for an H100 (sm_90) without a GPU; run by tests/test_kernels_compile_sm90.py in a process
without TRITON_INTERPRET (under the interpreter @triton.jit yields functions the compiler cannot take).

    python tests/compile_sm90.py     # prints one line per kernel, exits non-zero on the first failure
"""

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sglang_asynctls.kernels.block_overlap import _block_overlap_kernel
from sglang_asynctls.kernels.host_cache import _host_cache_lookup_kernel
from sglang_asynctls.kernels.host_prefetch import _host_prefetch_kernel
from sglang_asynctls.kernels.block_scores import _block_scores_kernel
from sglang_asynctls.kernels.index_append import _append_decode_index_kernel
from sglang_asynctls.kernels.index_extend import _index_extend_kernel
from sglang_asynctls.kernels.select_blocks import _select_blocks_kernel
from sglang_asynctls.kernels.select_tokens import _select_tokens_kernel
from sglang_asynctls.kernels.sparse_decode import _sparse_decode_kernel
from sglang_asynctls.kernels.splitk_combine import _splitk_combine_kernel
from sglang_asynctls.kernels.token_logits import _token_logits_kernel

SM90 = GPUTarget("cuda", 90, 32)


def _compile(fn, args, constexprs, num_warps):
    sig = {name: ("constexpr" if name in constexprs else t) for name, t in args}
    triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=SM90, options={"num_warps": num_warps})


def _i32(*names):
    return [(n, "i32") for n in names]


def selection_kernels(key_bits, ahead=0):
    _compile(_select_blocks_kernel,
             [("scores", "*fp32"), ("seq_lens", "*i64"), ("block_ids", "*i32")]
             + _i32("NB", "sink_tokens", "local_window", "stride_sb", "stride_sh", "stride_ob", "stride_oh")
             + [(n, None) for n in ("HKV", "BS", "KB", "NBP", "KBP", "KEY_BITS", "NARROW")],
             dict(HKV=8, BS=64, KB=128, NBP=2048, KBP=128, KEY_BITS=key_bits, NARROW=8 if key_bits == 16 else 0),
             8)  # NARROW 8: the default; 0: the full search only
    for g in (0, 4, 20):  # scores given; logits of a GQA / MLA group with the combine folded in
        _compile(_select_tokens_kernel,
                 [("scores", "*fp32"), ("cand", "*i32"), ("req_to_token", "*i32"), ("req_pool_indices", "*i64"),
                  ("seq_lens", "*i64"), ("out", "*i32")]
                 + _i32("C", "sink_tokens", "local_window", "stride_sb", "stride_sh", "stride_cb", "stride_ch",
                        "stride_rr", "stride_ob", "stride_oh") + [("stats", "*fp32")]
                 + _i32("stride_sg", "stride_tb", "stride_th") + [("ahead", "*i32")] + _i32("stride_ab", "stride_ah")
                 + [(n, None) for n in ("HKV", "FROM_BLOCKS", "BS", "TO_SLOTS", "KT", "CP", "KTP", "KEY_BITS", "G",
                                        "GP", "NSPLIT", "AHEAD", "AHEADP")],
                 dict(HKV=8, FROM_BLOCKS=True, BS=64, TO_SLOTS=True, KT=1024, CP=8192, KTP=1024, KEY_BITS=key_bits,
                      G=g, GP=triton.next_power_of_2(max(g, 1)), NSPLIT=32 if g else 1, AHEAD=ahead,
                      AHEADP=triton.next_power_of_2(max(ahead, 1))),
                 16 if g else 32)  # the launcher's warps


def append_decode_index(d, half_dc, has_rows):
    _compile(_append_decode_index_kernel,
             [("k_buffer", "*bf16"), ("new_loc", "*i64"), ("seq_lens", "*i64"), ("channels", "*i64"),
              ("labels", "*u8"), ("label_scale", "*fp32"), ("kmin", "*bf16"), ("kmax", "*bf16"), ("rows", "*i64")]
             + _i32("stride_ks", "stride_kh", "stride_ch", "stride_ls", "stride_lh", "stride_ss", "stride_sh",
                    "stride_mp", "stride_mh") + [(n, None) for n in ("D", "BLOCK_D", "HALF_DC", "BS", "HAS_ROWS")],
             dict(D=d, BLOCK_D=triton.next_power_of_2(d), HALF_DC=half_dc, BS=64, HAS_ROWS=has_rows), 4)


def index_extend(d, half_dc):
    _compile(_index_extend_kernel,
             [("k_buffer", "*bf16"), ("page_slots", "*i64"), ("page_ids", "*i64"), ("label_slots", "*i64"),
              ("channels", "*i64"), ("labels", "*u8"), ("label_scale", "*fp32"), ("kmin", "*bf16"),
              ("kmax", "*bf16")]
             + _i32("stride_ks", "stride_kh", "stride_pm", "stride_ch", "stride_ls", "stride_lh", "stride_ss",
                    "stride_sh", "stride_mp", "stride_mh") + [(n, None) for n in ("D", "DCH", "HALF_DC", "BS")],
             dict(D=d, DCH=128, HALF_DC=half_dc, BS=64), 4)


def block_scores(d1, d2, g, group_max):
    # the launcher's shapes: one 64-block tile per program, channels in chunks of 128
    _compile(_block_scores_kernel,
             [("q", "*bf16"), ("kmin", "*bf16"), ("kmax", "*bf16"), ("block_table", "*i32"), ("seq_lens", "*i64"),
              ("scores", "*fp32"), ("NB", "i32")]
             + _i32("stride_qb", "stride_qh", "stride_ke", "stride_kh", "stride_tb", "stride_sb", "stride_sh")
             + [("slack", "fp32")]
             + [(n, None) for n in ("HKV", "G", "BS", "GP", "D1", "D2", "DCH", "BLOCK_N", "GROUP_MAX")],
             dict(HKV=8 if g == 4 else 1, G=g, BS=64, GP=max(16, triton.next_power_of_2(g)) if group_max
                  else triton.next_power_of_2(g), D1=d1, D2=d2, DCH=min(d1, 128), BLOCK_N=64, GROUP_MAX=group_max),
             8 if d2 == 0 else 4)


def token_logits(g, half_dc):
    _compile(_token_logits_kernel,
             [("q", "*bf16"), ("labels", "*u8"), ("label_scale", "*fp32"), ("channels", "*i64"),
              ("req_to_token", "*i32"), ("req_pool_indices", "*i64"), ("seq_lens", "*i64"), ("cand", "*i32"),
              ("logits", "*fp32"), ("stats", "*fp32"), ("sm_scale", "fp32"), ("C", "i32")]
             + _i32("stride_qb", "stride_qh", "stride_ls", "stride_lh", "stride_ss", "stride_sh", "stride_ch",
                    "stride_rr", "stride_cb", "stride_ch2", "stride_ob", "stride_oh", "stride_og", "stride_tb",
                    "stride_th", "stride_ts")
             + [(n, None) for n in ("HKV", "G", "GP", "HDC", "FROM_BLOCKS", "BS", "SPLIT_C", "BLOCK_C", "USE_DOT")],
             dict(HKV=8 if g == 4 else 1, G=g, GP=max(16, triton.next_power_of_2(g)), HDC=half_dc, FROM_BLOCKS=True,
                  BS=64, SPLIT_C=256, BLOCK_C=128, USE_DOT=True), 4)


def sparse_decode(d1, d2, dv, g, ndv=1, cached=False):
    _compile(_sparse_decode_kernel,
             [("q", "*bf16"), ("k_buffer", "*bf16"), ("v_buffer", "*bf16"), ("token_slots", "*i32"),
              ("mid_o", "*fp32"), ("mid_lse", "*fp32"), ("sm_scale", "fp32"), ("K", "i32")]
             + _i32("stride_qb", "stride_qh", "stride_ks", "stride_kh", "stride_vs", "stride_vh", "stride_tb",
                    "stride_th", "stride_mb", "stride_mh", "stride_ms", "stride_lb", "stride_lh")
             + [("cache_k", "*bf16"), ("cache_v", "*bf16"), ("cache_ref", "*i32")]
             + [(n, None) for n in ("HKV", "G", "NHB", "BLOCK_H", "D1", "D2", "DV", "V_IS_K", "SPLIT_K", "BLOCK_N",
                                    "NDV", "CACHED")],
             dict(HKV=8 if g == 4 else 1, G=g, NHB=1, BLOCK_H=max(16, triton.next_power_of_2(g)), D1=d1, D2=d2,
                  DV=dv // ndv, V_IS_K=d2 > 0 and ndv == 1, SPLIT_K=128, BLOCK_N=32 if d2 else 64, NDV=ndv,
                  CACHED=cached),
             8 if d2 else 4)


def host_cache_lookup(lines, block_k, ahead):
    _compile(_host_cache_lookup_kernel,
             [("token_slots", "*i32"), ("rows", "*i64"), ("seq_lens", "*i64"), ("active", "*i1"), ("tags", "*i32"),
              ("stamps", "*i32"), ("claims", "*i32"), ("cache_ref", "*i32"), ("counters", "*i64"),
              ("fetched", "*i8")]
             + _i32("host_from", "K", "stride_tb", "stride_th", "stride_ob", "stride_oh")
             + [(n, None) for n in ("HKV", "R", "W", "BLOCK_K", "COUNT", "C_ROWS", "C_HOST", "C_HITS",
                                    "C_FILLS", "C_STEPS", "AHEAD", "C_AHEAD")],
             dict(HKV=8, R=lines, W=8, BLOCK_K=block_k, COUNT=True, C_ROWS=0, C_HOST=1, C_HITS=2, C_FILLS=3,
                  C_STEPS=4, AHEAD=ahead, C_AHEAD=5), 4)


def host_prefetch(d, dv, block, lag):
    """The launcher's tiles for P + K entries (block) of a GQA (D = Dv = 128) or MLA latent (576, V is K) row."""
    _compile(_host_prefetch_kernel,
             [("ahead_slots", "*i32"), ("token_slots", "*i32"), ("cache_ref", "*i32"), ("rows", "*i64"),
              ("seq_lens", "*i64"), ("active", "*i1"), ("tags", "*i32"), ("stamps", "*i32"), ("claims", "*i32"),
              ("fetched", "*i8"), ("ahead_ref", "*i32"), ("k_buffer", "*bf16"), ("v_buffer", "*bf16"),
              ("cache_k", "*bf16"), ("cache_v", "*bf16"), ("counters", "*i64")]
             + _i32("host_from", "P", "K", "stride_ab", "stride_ah", "stride_tb", "stride_th", "stride_ks",
                    "stride_kh", "stride_vs", "stride_vh", "stride_ob", "stride_oh")
             + [(n, None) for n in ("HKV", "R", "W", "BLOCK", "LAG", "D", "DV", "DCH", "V_IS_K", "COUNT",
                                    "C_FETCHED")],
             dict(HKV=8 if d == 128 else 1, R=2048, W=8, BLOCK=block, LAG=lag, D=d, DV=dv,
                  DCH=max(16, min(64, 8192 // block)), V_IS_K=d != dv, COUNT=True, C_FETCHED=6),
             4 if block <= 256 else 8)


def block_overlap(kb):
    _compile(_block_overlap_kernel,
             [("blocks", "*i32"), ("rows", "*i64"), ("active", "*i1"), ("prev", "*i32"), ("counters", "*i64")]
             + _i32("KB", "KBM", "stride_bb", "stride_bh", "stride_pr", "stride_ph")
             + [(n, None) for n in ("HKV", "BLOCK_KB", "BLOCK_J", "COUNT", "C_NUM", "C_DEN")],
             dict(HKV=8, BLOCK_KB=kb, BLOCK_J=max(16, min(64, 8192 // kb)), COUNT=True, C_NUM=7, C_DEN=8), 4)


def splitk_combine(dv, has_rows):
    _compile(_splitk_combine_kernel,
             [("mid_o", "*fp32"), ("mid_lse", "*fp32"), ("out", "*bf16"), ("out_rows", "*i1"), ("NSPLIT", "i32")]
             + _i32("stride_mb", "stride_mh", "stride_ms", "stride_lb", "stride_lh", "stride_ob", "stride_oh")
             + [(n, None) for n in ("HQ", "DV", "NSP", "HAS_ROWS")],
             dict(HQ=32, DV=dv, NSP=16, HAS_ROWS=has_rows), 4)


def attention_kernels():
    for d1, d2, dv, g, half_dc in ((128, 0, 128, 4, 16), (512, 64, 512, 20, 64)):
        token_logits(g, half_dc)
        print(f"token_logits (G={g}): compiled for sm_90")
        for cached in (False, True):
            sparse_decode(d1, d2, dv, g, cached=cached)
            print(f"sparse_decode (D={d1}+{d2}, G={g}, host-row cache={cached}): compiled for sm_90")
        if d2:
            sparse_decode(d1, d2, dv, g, ndv=4)
            print(f"sparse_decode (D={d1}+{d2}, G={g}, dv_chunks=4): compiled for sm_90")
        for has_rows in (False, True):
            splitk_combine(dv, has_rows)
            print(f"splitk_combine (Dv={dv}, out_rows={has_rows}): compiled for sm_90")


if __name__ == "__main__":
    for d1, d2, g in ((128, 0, 4), (512, 64, 20)):  # Qwen3-8B GQA, GLM-4.7-Flash MLA latent
        for group_max in (False, True):
            block_scores(d1, d2, g, group_max)
            print(f"block_scores (D={d1}+{d2}, G={g}, max={group_max}): compiled for sm_90")
    for key_bits in (16, 31):
        selection_kernels(key_bits)
        print(f"select_blocks, select_tokens (key_bits={key_bits}): compiled for sm_90")
    selection_kernels(16, ahead=128)
    print("select_tokens (near-misses ahead=128): compiled for sm_90")
    for d, half_dc in ((128, 16), (576, 64)):  # GQA (Qwen3-8B) and the MLA latent
        append_decode_index(d, half_dc, has_rows=d == 128)  # rows: page size 1 (per-request block rows)
        print(f"append_decode_index (D={d}): compiled for sm_90")
        index_extend(d, half_dc)
        print(f"index_extend (D={d}): compiled for sm_90")
    attention_kernels()
    for d, dv, block, lag in ((128, 128, 2048, True), (576, 512, 2048, True), (128, 128, 128, False)):
        host_prefetch(d, dv, block, lag)
        print(f"host_prefetch (D={d}, {block} entries, lag={lag}): compiled for sm_90")
    for kb in (128, 256):
        block_overlap(kb)
        print(f"block_overlap (Kb={kb}): compiled for sm_90")
    for lines, ahead in ((2048, True), (0, False), (2048, False)):
        host_cache_lookup(lines, 1024, ahead)
        print(f"host_cache_lookup (R={lines}, K=1024{', prefetch' if ahead else ''}): compiled for sm_90")
