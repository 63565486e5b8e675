"""What AsyncTLS needs to know about a model's attention, and the checks that refuse what it cannot serve.

`ModelAttention` is built from SGLang's `ModelConfig` in the launcher (plugin.py) and from a Hugging Face style
config in the fidelity tools; both go through `check_model`, so every entry point refuses the same models.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from sglang_asynctls.config import FLAGS, AsyncTLSConfig, AsyncTLSConfigError, LayerBudgetError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelAttention:
    """kind: "gqa" (GQA/MHA) or "mla" (decode as MQA over the latent: one KV head of kv_lora_rank + rope dims)."""

    kind: str
    num_layers: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int  # width of keys as stored in the KV cache (MLA: kv_lora_rank + qk_rope_head_dim)
    v_head_dim: int  # width of values (MLA: kv_lora_rank)

    @property
    def group_size(self) -> int:
        return self.num_qo_heads // self.num_kv_heads


class UnsupportedModelError(AsyncTLSConfigError):
    """The model's attention is neither GQA/MHA nor MLA (or mixes in layers AsyncTLS cannot index)."""


def from_sglang_model_config(mc) -> ModelAttention:
    """Read SGLang 0.5.17's ModelConfig; refuse hybrid (linear / sliding-window) and encoder-decoder models."""
    arch = getattr(mc.attention_arch, "name", str(mc.attention_arch))
    archs = list(getattr(mc.hf_config, "architectures", None) or ["?"])
    reasons = []
    if getattr(mc, "is_encoder_decoder", False):
        reasons.append("encoder-decoder")
    tc = mc.hf_text_config
    window = getattr(tc, "sliding_window", None) and getattr(tc, "use_sliding_window", True)
    if getattr(mc, "is_hybrid_swa", False) or window or getattr(tc, "sliding_window_pattern", None):
        reasons.append("sliding-window attention")
    if getattr(tc, "attn_logit_softcapping", None):
        reasons.append("attention logit soft-capping")
    if getattr(mc, "full_attention_interval", None) or getattr(mc, "linear_attn_registry_result", None) is not None:
        reasons.append("hybrid linear attention")
    if getattr(mc, "use_alibi", False):
        reasons.append("ALiBi")
    if reasons:
        raise UnsupportedModelError(
            f"{FLAGS['enabled']} supports GQA/MHA and MLA decoder-only models; {archs[0]} uses "
            f"{', '.join(reasons)}")
    if arch == "MLA":
        rank, rope = mc.kv_lora_rank, mc.qk_rope_head_dim
        return ModelAttention("mla", mc.num_hidden_layers, mc.num_attention_heads, 1, rank + rope, rank)
    if arch != "MHA":
        raise UnsupportedModelError(f"{FLAGS['enabled']} supports GQA/MHA and MLA attention, not {arch}")
    return check_model(ModelAttention("gqa", mc.num_hidden_layers, mc.num_attention_heads,
                                      mc.num_key_value_heads, mc.head_dim, mc.v_head_dim))


def check_model(model: ModelAttention) -> ModelAttention:
    if model.kind not in ("gqa", "mla"):
        raise UnsupportedModelError(f"{FLAGS['enabled']} supports GQA/MHA and MLA attention, not {model.kind!r}")
    if model.num_kv_heads < 1 or model.num_qo_heads % model.num_kv_heads:
        raise UnsupportedModelError(
            f"{FLAGS['enabled']} needs query heads to be a multiple of KV heads "
            f"(got {model.num_qo_heads} query heads, {model.num_kv_heads} KV heads)")
    if model.head_dim is None or model.head_dim < 8:
        raise UnsupportedModelError(f"{FLAGS['enabled']} needs a head dim >= 8 (got {model.head_dim})")
    return model


def check_attention_tp(model: ModelAttention, attn_tp_size: int) -> ModelAttention:
    """Refuse a head count that attention tensor parallelism cannot split the way SGLang 0.5.17's models and
    QKVParallelLinear do: query heads evenly, KV heads evenly or (fewer KV heads than ranks) replicated."""
    kv = model.num_kv_heads
    if model.num_qo_heads % attn_tp_size or not _kv_heads_split(kv, attn_tp_size):
        raise UnsupportedModelError(
            f"{FLAGS['enabled']} with attention tensor parallel size {attn_tp_size} (--tp, divided by --dp under "
            f"--enable-dp-attention) needs query heads divisible by it and KV heads divisible by it or dividing "
            f"it (got {model.num_qo_heads} query heads, {kv} KV heads)")
    return model


def _kv_heads_split(num_kv_heads: int, attn_tp_size: int) -> bool:
    return num_kv_heads % attn_tp_size == 0 or attn_tp_size % num_kv_heads == 0


def kv_heads_of_rank(num_kv_heads: int, attn_tp_size: int, attn_tp_rank: int) -> slice:
    """The model's KV heads that attention TP rank `attn_tp_rank` of `attn_tp_size` holds in its KV pool: an even
    share, or with fewer KV heads than ranks the one head it replicates (QKVParallelLinear: rank // replicas;
    MLA's single latent head is held by every rank)."""
    if not 0 <= attn_tp_rank < attn_tp_size or not _kv_heads_split(num_kv_heads, attn_tp_size):
        raise UnsupportedModelError(
            f"{FLAGS['enabled']}: {num_kv_heads} KV heads cannot be split over {attn_tp_size} attention tensor "
            f"parallel ranks (rank {attn_tp_rank}); the count must be divisible by it or divide it")
    if num_kv_heads >= attn_tp_size:
        share = num_kv_heads // attn_tp_size
        return slice(attn_tp_rank * share, (attn_tp_rank + 1) * share)
    head = attn_tp_rank // (attn_tp_size // num_kv_heads)
    return slice(head, head + 1)


def check_config_for_model(cfg: AsyncTLSConfig, model: ModelAttention) -> Optional[torch.Tensor]:
    """Model-dependent checks; returns the channel table [layers, kv_heads, d_c] from the given config file, else
    from a packaged calibration of the same attention shape, else None (ranked from K at the first prefill)."""
    check_model(model)
    d_c = cfg.resolved_label_channels(model.kind)
    if d_c > model.head_dim:
        raise AsyncTLSConfigError(
            f"{FLAGS['label_channels']} must be an even integer in [2, {model.head_dim}] for this model's "
            f"head dim {model.head_dim} (got {d_c})")
    path = cfg.channel_config or packaged_channel_config(model)
    channels = None if path is None else load_channel_config(path, model, d_c)
    resolved_layer_schedule(cfg, model).layer_budgets(model.num_layers)  # checks the per-layer budgets
    return channels


def resolved_layer_schedule(cfg: AsyncTLSConfig, model: ModelAttention) -> AsyncTLSConfig:
    """cfg with its "auto" per-layer schedules taken from the channel config (given or packaged for the model's
    shape: keys "layer_budget_scale" / "layer_candidate_scale"); `cfg.layer_budgets(model.num_layers)` then gives
    every layer's (k_t, k_b)."""
    path = cfg.channel_config or packaged_channel_config(model)
    meta = None
    if path is not None:
        with open(path) as f:
            meta = json.load(f)
    uniform = cfg.with_layer_schedule(None)
    if meta is None or uniform == cfg:  # nothing calibrated, or the user gave both schedules: checked as given
        return cfg.with_layer_schedule(meta)
    try:
        scheduled = cfg.with_layer_schedule(meta)
        scheduled.layer_budgets(model.num_layers)
    except LayerBudgetError as e:
        # the calibrated schedule is the default, not something the user asked for: the budgets they gave win
        logger.warning("asynctls: the calibrated per-layer schedule does not fit k_t %d / k_b %d (%s); every layer "
                       "gets the same budgets", cfg.token_budget, cfg.block_budget, e)
        return uniform
    return scheduled
    try:
        scheduled.layer_budgets(model.num_layers)
    except LayerBudgetError as e:
        # the calibrated schedule is the default, not something the user asked for: the budgets they gave win
        logger.warning("asynctls: the calibrated per-layer schedule does not fit k_t %d / k_b %d (%s); every layer "
                       "gets the same budgets", cfg.token_budget, cfg.block_budget, e)
        return cfg.with_layer_schedule(None)
    return scheduled


def packaged_channel_config(model: ModelAttention) -> Optional[str]:
    """A calibration shipped in sglang_asynctls/data whose layer / KV-head / head-dim shape matches the model."""
    data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    for name in sorted(os.listdir(data)) if os.path.isdir(data) else []:
        if name.endswith("_channels.json"):
            with open(os.path.join(data, name)) as f:
                meta = json.load(f)
            if (meta.get("num_layers"), meta.get("num_kv_heads"), meta.get("head_dim")) == (
                    model.num_layers, model.num_kv_heads, model.head_dim):
                return os.path.join(data, name)
    return None


def read_channel_json(path: str) -> torch.Tensor:
    """The "channels" table of `calibrate`'s JSON as int64, or one error naming the flag (no model needed: the
    launcher checks this before SGLang starts)."""
    try:
        with open(path) as f:
            data = json.load(f)
        return torch.tensor(data["channels"], dtype=torch.int64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AsyncTLSConfigError(f"{FLAGS['channel_config']} must be a readable channel JSON from "
                                  f"sglang_asynctls.calibrate (got {path!r}: {type(e).__name__}: {e})") from None


def load_channel_config(path: str, model: ModelAttention, label_channels: int) -> torch.Tensor:
    """Load `calibrate`'s JSON: {"channels": [layer][kv_head][d_c] ints, ...}. One clear error per problem."""
    flag = FLAGS["channel_config"]
    channels = read_channel_json(path)
    want = (model.num_layers, model.num_kv_heads)
    if channels.dim() != 3 or tuple(channels.shape[:2]) != want:
        raise AsyncTLSConfigError(f"{flag} must hold channels for {want[0]} layers x {want[1]} KV heads of this "
                                  f"model (got shape {tuple(channels.shape)} in {path!r})")
    if channels.shape[2] < label_channels:
        raise AsyncTLSConfigError(f"{flag} ranks only {channels.shape[2]} channels per head but "
                                  f"{FLAGS['label_channels']} is {label_channels} (in {path!r})")
    channels = channels[:, :, :label_channels]
    if channels.min() < 0 or channels.max() >= model.head_dim:
        raise AsyncTLSConfigError(f"{flag} has channel ids outside [0, {model.head_dim}) (in {path!r})")
    if any(len(set(row.tolist())) != label_channels for row in channels.reshape(-1, label_channels)):
        raise AsyncTLSConfigError(f"{flag} repeats a channel within one head (in {path!r})")
    return channels
