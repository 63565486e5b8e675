"""A Qwen3-8B-shaped model directory for `--load-format dummy` with a word-level tokenizer over the model's whole
vocabulary (151,936 ids), so `bench_serving --dataset-name random-ids` draws prompts from all of it: with the
staged directory's ~50-word tokenizer, random prompts repeat with period 50 and the radix cache shares them.

    python3 benchmarks/gpu/qwen3_dummy_dir.py /root/qwen3_8b_fullvocab
"""

import json
import os
import sys

VOCAB = 151936
CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": VOCAB, "max_position_embeddings": 131072, "rope_scaling": None, "rope_theta": 1000000,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
    "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None,
    "max_window_layers": 36, "use_cache": True, "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 1,
}


def main(out: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    os.makedirs(out, exist_ok=True)
    json.dump(CONFIG, open(f"{out}/config.json", "w"), indent=1)
    vocab = {"<unk>": 0, "<|endoftext|>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(f"{out}/tokenizer.json")
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "unk_token": "<unk>",
               "pad_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "model_max_length": 131072},
              open(f"{out}/tokenizer_config.json", "w"))
    from transformers import AutoTokenizer

    print(out, "vocab", AutoTokenizer.from_pretrained(out).vocab_size)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/root/qwen3_8b_fullvocab")
