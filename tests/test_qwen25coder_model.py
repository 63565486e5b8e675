"""The staged Qwen2.5-Coder-0.5B-Instruct (benchmarks/gpu/stage_qwen25coder.py) is the real model: it loads as
Qwen2ForCausalLM at 32k positions, answers a short chat question, and (slow) finds a pass key 4k tokens deep.
The first run stages the model into ~/.cache/sglang-asynctls/models (a 478 MB download and ~1 min converting)."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu"))
import stage_qwen25coder as stage  # noqa: E402

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def qwen():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = stage.model_dir("0.5b")
    return d, AutoTokenizer.from_pretrained(d), AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)


def _greedy(model, ids, new_tokens):
    out = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=new_tokens,
                         do_sample=False)
    return out[0, len(ids):]


def test_config_is_what_sglang_serves(qwen):
    d, _, _ = qwen
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["max_position_embeddings"] == 32768
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (24, 14, 2)
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64 and not cfg["use_sliding_window"]
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]


def test_short_chat_answer(qwen):
    _, tok, model = qwen
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = torch.tensor(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
                       ["input_ids"])
    assert "Paris" in tok.decode(_greedy(model, ids, 8))


@pytest.mark.slow
def test_passkey_at_4k(qwen):
    from sglang_asynctls import needles

    _, tok, model = qwen
    task = needles.passkey(tok, 4096, depth=0.4, seed=7)
    ids = task.prompt()
    assert 4000 <= len(ids) <= 4096
    answer = task.questions[0][1]
    assert answer in tok.decode(_greedy(model, ids, 8))
