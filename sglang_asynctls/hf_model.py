"""A Hugging Face causal LM (transformers) behind `smollm2.SmolLlama`'s interface, so calibration and the
reference fidelity tools run on any GQA model dir (Qwen2.5-Coder, ...), not only on SmolLM2's GGUF.

The attention of every layer is routed through one function registered with transformers' AttentionInterface
("asynctls_capture"): transformers has already applied the model's own q/k norms and RoPE (scaling included) when
it calls it, so what it sees is exactly the post-RoPE q/k/v that SGLang's KV cache stores. `prefill` runs dense
(SDPA) attention and hands each layer's q/k/v to a callback; `decode` runs a batch of single-token rows (no HF KV
cache) and asks an `attention(layer, q, k, v)` callable for each layer's output, as `SmolLlama.decode` does.

Shapes: q [N, Hq, D], k / v [N, Hkv, D] per layer, as smollm2's KVCallback.
"""

from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path
from typing import Callable, Optional

import torch

from sglang_asynctls.smollm2 import LlamaShape  # the shape record the fidelity tools read

CAPTURE = "asynctls_capture"
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("asynctls_hf_attention", default=None)


def shape_of(config) -> LlamaShape:
    """The attention shape of a GQA/MHA text config; refuses what the reference methods cannot stand in for."""
    config = getattr(config, "text_config", None) or config
    if getattr(config, "kv_lora_rank", None):
        raise ValueError("hf_model runs GQA/MHA models; MLA (kv_lora_rank) caches a latent, not per-head keys")
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        raise ValueError("hf_model runs full-attention models; this config uses sliding-window attention")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    return LlamaShape(num_layers=config.num_hidden_layers, hidden=config.hidden_size, num_qo_heads=heads,
                      num_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                      rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 0.0)) or 0.0),
                      rms_eps=float(getattr(config, "rms_norm_eps", 0.0) or 0.0),
                      max_context=getattr(config, "max_position_embeddings", 0))


def _capture_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """query [B, Hq, L, D], key / value [B, Hkv, L, D] (post-RoPE) -> (out [B, L, Hq, D], None)."""
    active = _ACTIVE.get()
    if active is None:
        raise RuntimeError(f"attention implementation {CAPTURE!r} runs only inside HFModel.prefill / decode")
    return active(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(CAPTURE, _capture_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE, sdpa_mask)  # prefill's causal mask, as SDPA gets it


@contextlib.contextmanager
def _routed(fn):
    token = _ACTIVE.set(fn)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# layer, q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, D] -> None (prefill) or o [N, Hq, D] (decode)
KVCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


class HFModel:
    """transformers model + `prefill` / `decode` with per-layer post-RoPE q/k/v (see the module docstring)."""

    def __init__(self, model):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        _register()
        model.set_attn_implementation(CAPTURE)
        self.model = model.eval()
        self.shape = shape_of(model.config)
        self._sdpa = sdpa_attention_forward

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _logits(self, ids: torch.Tensor, positions: torch.Tensor, keep) -> torch.Tensor:
        out = self.model(input_ids=ids.long().to(self.device), position_ids=positions.long().to(self.device),
                         use_cache=False, logits_to_keep=keep)
        return out.logits.float()

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, on_kv: Optional[KVCallback] = None,
                logit_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Dense causal forward of ids [L]; on_kv(layer, q, k, v) sees every layer's post-RoPE q/k/v.
        Returns float32 logits [len(logit_positions), V] (default: the last position only)."""

        def dense(module, query, key, value, attention_mask, **kwargs):
            if on_kv is not None:
                on_kv(module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1))
            return self._sdpa(module, query, key, value, attention_mask, **kwargs)

        keep = 1 if logit_positions is None else logit_positions.long().to(self.device)
        with _routed(dense):
            return self._logits(ids[None], torch.arange(len(ids))[None], keep)[0]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, attention: KVCallback) -> torch.Tensor:
        """One decode step for a batch: tokens [B] at positions [B] -> float32 logits [B, V].
        attention(layer, q [B, Hq, D], k [B, Hkv, D], v [B, Hkv, D]) stores k/v and returns o [B, Hq, D]."""

        def delegated(module, query, key, value, attention_mask, scaling=None, **kwargs):
            if scaling is not None and abs(scaling - self.shape.head_dim ** -0.5) > 1e-6:
                raise ValueError(f"layer {module.layer_idx} scales attention by {scaling}, the reference methods "
                                 f"by head_dim ** -0.5")
            o = attention(module.layer_idx, query[:, :, 0], key[:, :, 0], value[:, :, 0])
            return o[:, None].to(query.dtype), None

        with _routed(delegated):
            return self._logits(tokens[:, None], positions[:, None], 1)[:, -1]


def load(model_dir, device: str = "cpu", dtype: torch.dtype = torch.float32) -> HFModel:
    from transformers import AutoModelForCausalLM

    return HFModel(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device))


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.clean_up_tokenization_spaces = False
    return tok


def is_model_dir(path: str) -> bool:
    return Path(path, "config.json").is_file()
