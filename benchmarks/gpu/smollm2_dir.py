"""On the GPU host: turn the SmolLM2-135M-Instruct GGUF into a safetensors model directory SGLang can serve.

Usage: python3 benchmarks/gpu/smollm2_dir.py GGUF_PATH OUT_DIR   (recipe: ../shared/gpu/README.md)
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(gguf: str, out: str) -> None:
    d, name = os.path.split(os.path.abspath(gguf))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    os.makedirs(out, exist_ok=True)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, os.path.join(out, "model.safetensors"))
    model.config.save_pretrained(out)
    tok.save_pretrained(out)
    cfg_path = os.path.join(out, "config.json")
    cfg = json.load(open(cfg_path))
    # without these SGLang fails in model_config.py ('NoneType' object is not subscriptable)
    cfg.update(architectures=["LlamaForCausalLM"], tie_word_embeddings=True, torch_dtype="bfloat16")
    json.dump(cfg, open(cfg_path, "w"), indent=1)
    print("wrote", out, len(state), "tensors")


if __name__ == "__main__":
    main(*sys.argv[1:3])
