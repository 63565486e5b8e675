"""Fine level, composed: label scores of the candidates (`token_logits` + softmax combine, both split over the
candidates so a few KV groups still fill the GPU), then top-Kt with the slot lookup fused (`select_token_slots`)."""

from typing import Optional

import torch

from sglang_asynctls import reference

from .select_tokens import MAX_FUSED_CANDIDATES, select_token_slots, select_tokens
from .token_logits import token_logits
from .token_scores import candidate_scores
from .token_scores_recompute import token_scores_recompute


# Widest KV group whose softmax combine is folded into the top-Kt kernel (see fine_select_candidates).
FOLD_COMBINE_MAX_GROUP = 8
# How wider groups combine: "recompute" (two passes over the labels, token_scores_recompute) or "logits" (the
# [B, Hkv, G, C] logits written and read back). H100 MLA 96k x 8, stages 3-5: 40.6 us with logits, 52.5 with
# recompute (issue3_ab_h100.json), so logits stays the default.
WIDE_GROUP_COMBINE = "logits"
COMBINES = ("fold", "logits", "recompute")


def fine_select_candidates(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens, candidates,
                           *, block_size, token_budget, sink_tokens, local_window, sm_scale,
                           out: Optional[torch.Tensor] = None, combine: Optional[str] = None) -> torch.Tensor:
    """`fine_select` over candidates given as positions [B, Hkv, C] (block_size == 0) or as block ids
    [B, Hkv, Kb] (block_size > 0: all Kb * block_size positions of those blocks, as `candidate_positions`).
    Returns KV slots [B, Hkv, Kt] int32, -1 padded.

    combine, how the group-mean softmax is formed before the top-Kt (`select_token_slots`):
    "fold": `token_logits`, then the top-Kt kernel reads all G logit rows (two launches); "logits": the combine in
    `token_scores`' own launch (three); "recompute": `token_scores_recompute`, statistics then logits recomputed
    from the labels (three, no logits buffer). The fold runs in the one program per KV group: on the H100 at
    96k x 8 it wins at G = 4 (38.4 vs 43.3 us for the fine stage) and loses at the MLA's G = 20 (64.7 vs 44.5), so
    by default (None) groups of at most FOLD_COMBINE_MAX_GROUP heads fold and wider ones use WIDE_GROUP_COMBINE."""
    if combine is None:
        combine = "fold" if q.shape[1] // channels.shape[0] <= FOLD_COMBINE_MAX_GROUP else WIDE_GROUP_COMBINE
    assert combine in COMBINES, combine
    kw = dict(block_size=block_size, token_budget=token_budget, sink_tokens=sink_tokens,
              local_window=local_window, out=out)
    args = (q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens, candidates, sm_scale)
    if combine == "fold":
        logits, stats = token_logits(*args, block_size=block_size)
        return select_token_slots(logits, candidates, req_to_token, req_pool_indices, seq_lens, stats=stats, **kw)
    scores = (token_scores_recompute if combine == "recompute" else candidate_scores)(*args, block_size=block_size)
    return select_token_slots(scores, candidates, req_to_token, req_pool_indices, seq_lens, **kw)


def fine_select(q: torch.Tensor, labels: torch.Tensor, label_scale: torch.Tensor, channels: torch.Tensor,
                req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                positions: torch.Tensor, *, token_budget: int, sink_tokens: int, local_window: int,
                sm_scale: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fine stage over candidate positions [B, Hkv, C] (see `reference.fine_select`): [B, Hkv, Kt] int32 slots.

    Up to MAX_FUSED_CANDIDATES candidates one program per KV group selects in registers; beyond (token-only
    over a whole context) torch.topk selects.
    """
    kw = dict(token_budget=token_budget, sink_tokens=sink_tokens, local_window=local_window)
    if positions.shape[2] <= MAX_FUSED_CANDIDATES:
        return fine_select_candidates(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens,
                                      positions, block_size=0, sm_scale=sm_scale, out=out, **kw)
    scores = candidate_scores(q, labels, label_scale, channels, req_to_token, req_pool_indices, seq_lens,
                              positions, sm_scale)
    picked = select_tokens(scores, positions, seq_lens, token_budget, sink_tokens, local_window)
    slots = reference.positions_to_slots(picked, req_to_token, req_pool_indices)
    return slots if out is None else out.copy_(slots)
