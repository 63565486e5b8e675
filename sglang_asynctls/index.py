"""The AsyncTLS index beside SGLang's KV pool: block Kmin/Kmax per page and INT4 labels per KV slot.

Addressing follows the KV pool, so a prefix that the radix cache shares shares its index too:
- labels, label_scale: one row per KV slot (written when the slot's key is written);
- kmin, kmax: one row per page, page id = slot // block_size (the backend runs with page_size == block_size,
  so a block is exactly one page and its row is final once the page is full — pages are immutable after that).
  At page size 1 a block's slots are scattered and the radix cache shares prefixes mid-block, so rows are kept
  per request instead (`request_rows`): row = req_pool_index * max_blocks + block. A prefill then recomputes every
  block of the request, the shared prefix's included (one read of its keys); labels stay per slot and shared.

Notations for shapes: see `sglang_asynctls/reference.py`. All methods take tensors and ints; none syncs the host:
`plan_extend` runs once per prefill (or arrival) batch from host-side lengths SGLang already holds, and queues one
copy of them to the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from sglang_asynctls import reference as R

LABEL_SCALE_BYTES = 4  # one fp32 label scale per slot and KV head
MIN_RANKING_TOKENS = 256  # without a calibration file, rank channels from the first prefill at least this long


@dataclass(frozen=True)
class IndexShape:
    """The sizes of `IndexPool`'s tensors. The pool allocates by them and the KV sizing hook charges them
    (`device_memory.PluginBuffers`, patches/kv_sizing.py), so what is charged is what is allocated.
    request_rows (req_pool_rows, max_blocks): block bounds per request row (page size 1) instead of per page."""

    num_layers: int
    num_slots: int
    num_kv_heads: int
    head_dim: int
    label_channels: int
    block_size: int
    dtype: torch.dtype
    request_rows: Optional[Tuple[int, int]] = None

    @property
    def bound_rows(self) -> int:
        if self.request_rows is not None:
            return self.request_rows[0] * self.request_rows[1]
        return -(-self.num_slots // self.block_size)

    def tensor_bytes(self) -> Dict[str, int]:
        """Bytes of each kind of tensor over all layers: labels [Hkv, S, Dc / 2] uint8, their scale [Hkv, S] fp32,
        Kmin and Kmax [bound rows, Hkv, D] in the KV dtype, and the channel table [L, Hkv, Dc] int64."""
        per_layer_slots = self.num_kv_heads * self.num_slots
        elem = torch.empty(0, dtype=self.dtype).element_size()
        return {"labels": self.num_layers * per_layer_slots * (self.label_channels // 2),
                "label_scale": self.num_layers * per_layer_slots * LABEL_SCALE_BYTES,
                "block_bounds": 2 * self.num_layers * self.bound_rows * self.num_kv_heads * self.head_dim * elem,
                "channels": self.num_layers * self.num_kv_heads * self.label_channels * 8}

    def nbytes(self) -> int:
        return sum(self.tensor_bytes().values())


@dataclass(frozen=True)
class ExtendIndexPlan:
    """Pages a prefill batch touches. page_slots [M, BS] int64 (-1 past the request's length), page_ids [M];
    label_slots [M, BS]: page_slots where the token is new (past the request's reused prefix), else -1."""

    page_slots: torch.Tensor
    page_ids: torch.Tensor
    label_slots: torch.Tensor

    @property
    def num_pages(self) -> int:
        return self.page_ids.numel()


def pages_to_rewrite(prefix_lens: List[int], seq_lens: List[int], block_size: int, whole_request: bool = False):
    """(request, block) pairs that new tokens [prefix, seq) fall in; blocks wholly inside the prefix are reused
    (with whole_request, per-request rows, every block of the request is rewritten)."""
    pairs = []
    for r, (p, n) in enumerate(zip(prefix_lens, seq_lens)):
        pairs += [(r, j) for j in range(0 if whole_request else p // block_size, -(-n // block_size))]
    return pairs


def plan_extend(req_to_token, req_pool_indices, prefix_lens: List[int], seq_lens: List[int],
                block_size: int, max_blocks: int = 0) -> ExtendIndexPlan:
    """max_blocks > 0: per-request rows (page size 1), row = req_pool_index * max_blocks + block."""
    pairs = pages_to_rewrite(prefix_lens, seq_lens, block_size, whole_request=max_blocks > 0)
    dev = req_to_token.device
    host = torch.tensor([[r for r, _ in pairs], [j for _, j in pairs], [seq_lens[r] for r, _ in pairs],
                         [prefix_lens[r] for r, _ in pairs]], dtype=torch.long)  # [4, M]
    if dev.type == "cuda":
        # a blocking copy from pageable memory synchronizes the stream: a PD decode server plans in its decode
        # loop, behind the forward in flight; from pinned memory the copy is queued (the caching host allocator
        # keeps the buffer until it is done)
        host = host.pin_memory()
    reqs, blocks, lens, prefix = host.to(dev, non_blocking=True)
    pos = blocks[:, None] * block_size + torch.arange(block_size, device=dev)
    rows = req_pool_indices.long()[reqs] if pairs else reqs
    slots = req_to_token[rows[:, None], pos.clamp(max=req_to_token.shape[1] - 1)].long()
    slots = torch.where(pos < lens[:, None], slots, torch.full_like(slots, -1))
    label_slots = torch.where(pos >= prefix[:, None], slots, torch.full_like(slots, -1))
    if max_blocks:
        return ExtendIndexPlan(slots, rows * max_blocks + blocks, label_slots)
    return ExtendIndexPlan(slots, torch.div(slots[:, 0], block_size, rounding_mode="floor"), label_slots)


class IndexPool:
    """Index tensors of every layer. channels [L, Hkv, Dc] int64: calibrated, or ranked by |K| at first prefill."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, label_channels: int,
                 block_size: int, dtype: torch.dtype, device, channels: Optional[torch.Tensor] = None,
                 extend=R.index_extend, append=R.append_decode_index,
                 request_rows: Optional[Tuple[int, int]] = None):
        """request_rows (req_pool_rows, max_blocks): block bounds per request row instead of per page."""
        self.shape = IndexShape(num_layers, num_slots, num_kv_heads, head_dim, label_channels, block_size, dtype,
                                request_rows)
        self.block_size = block_size
        # reference functions or the Triton kernels of the same names and signatures
        self.extend = extend
        self.append = append
        self.max_blocks = request_rows[1] if request_rows else 0
        shape = (self.shape.bound_rows, num_kv_heads, head_dim)
        self.kmin = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.kmax = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # stored head-major and handed out as [S, Hkv, ...] views: the label-scoring kernel then reads each KV
        # head's candidates from one contiguous region (29.9 -> 22.6 us at 96k, batch 8, on the H100)
        self.labels = [torch.zeros((num_kv_heads, num_slots, label_channels // 2), dtype=torch.uint8,
                                   device=device).transpose(0, 1) for _ in range(num_layers)]
        self.label_scale = [torch.zeros((num_kv_heads, num_slots), dtype=torch.float32, device=device).t()
                            for _ in range(num_layers)]
        self.channels = torch.zeros((num_layers, num_kv_heads, label_channels), dtype=torch.long, device=device)
        self.channels_ready = [channels is not None] * num_layers
        if channels is not None:
            self.channels.copy_(channels.to(device))

    def nbytes(self) -> int:
        tensors = self.kmin + self.kmax + self.labels + self.label_scale + [self.channels]
        return sum(t.numel() * t.element_size() for t in tensors)

    def write_extend(self, layer: int, k_buffer: torch.Tensor, new_loc: torch.Tensor, plan: ExtendIndexPlan):
        """After prefill wrote keys at new_loc: label the new slots, recompute the pages they fall in."""
        if not self.channels_ready[layer] and new_loc.numel() >= MIN_RANKING_TOKENS:
            self._rank_channels_by_key_magnitude(layer, k_buffer[new_loc.long()])
        if plan.num_pages:  # plan.label_slots are new_loc's slots, in page order
            self.extend(k_buffer, plan.page_slots, plan.page_ids, plan.label_slots, self.channels[layer],
                        self.labels[layer], self.label_scale[layer], self.kmin[layer], self.kmax[layer])

    def decode_rows(self, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor) -> Optional[torch.Tensor]:
        """[B] row each request's decode token folds into with per-request rows (None: its page, slot // BS).
        The same for every layer of a step."""
        if not self.max_blocks:
            return None
        return req_pool_indices.long() * self.max_blocks + torch.div(seq_lens.long() - 1, self.block_size,
                                                                     rounding_mode="floor")

    def write_decode(self, layer: int, k_buffer: torch.Tensor, new_loc: torch.Tensor, seq_lens: torch.Tensor,
                     rows: Optional[torch.Tensor] = None):
        """After decode wrote one key per request: label it and fold it into its block's running min/max (rows from
        `decode_rows`)."""
        self.append(k_buffer, new_loc, seq_lens, self.channels[layer], self.labels[layer], self.label_scale[layer],
                    self.kmin[layer], self.kmax[layer], self.block_size, rows=rows)

    def block_table(self, req_to_token, req_pool_indices, num_blocks: int) -> torch.Tensor:
        """[B, NB] row of every block of each request (entries of unwritten blocks are never scored)."""
        if self.max_blocks:
            assert num_blocks <= self.max_blocks
            blocks = torch.arange(num_blocks, device=req_pool_indices.device)
            return (req_pool_indices.long()[:, None] * self.max_blocks + blocks).to(torch.int32)
        first_slots = req_to_token[req_pool_indices.long(), : num_blocks * self.block_size: self.block_size]
        return torch.div(first_slots, self.block_size, rounding_mode="floor").to(torch.int32)

    def _rank_channels_by_key_magnitude(self, layer: int, keys: torch.Tensor):
        # without a calibration file: the channels with the largest |K| in the first prefill this layer sees
        d_c = self.channels.shape[2]
        self.channels[layer] = torch.topk(keys.abs().amax(dim=0).float(), d_c, dim=1).indices
        self.channels_ready[layer] = True
