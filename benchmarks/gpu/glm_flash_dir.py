"""Write a GLM-4.7-Flash-shaped model directory for `--load-format dummy` runs (MLA: 20 heads, kv_lora_rank 512,
qk_rope_head_dim 64; MoE 64 routed experts + 1 shared, top-4), with the tokenizer of the Qwen3-8B dummy dir that
../shared/gpu/setup.sh writes. No hub access needed.

    python3 benchmarks/gpu/glm_flash_dir.py /root/glm_flash_dummy [--layers 47] [--tokenizer-from DIR]
Fewer layers (e.g. 8) keep a backend smoke test small; speed figures need the full 47.
"""

import argparse
import json
import os
import shutil

# GLM-4.7-Flash's published config (transformers' Glm4MoeLiteConfig defaults carry the same values)
CONFIG = {
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=47)
    p.add_argument("--tokenizer-from", default="/root/qwen3_8b_dummy")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    cfg = dict(CONFIG, num_hidden_layers=a.layers)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(a.tokenizer_from, name), a.out)
    print(f"wrote {a.out}: Glm4MoeLiteForCausalLM, {a.layers} layers")


if __name__ == "__main__":
    main()
