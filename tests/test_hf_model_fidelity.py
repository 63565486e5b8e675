"""The reference fidelity tools (sglang_asynctls.fidelity) on a Hugging Face model through `hf_model`, on a tiny
random Qwen2: greedy decode through MethodAttention("dense") is transformers' own greedy decode, and every sparse
method at a budget that holds the whole sequence gives the same tokens."""

import pytest
import torch

pytest.importorskip("transformers")

from sglang_asynctls import fidelity as fd  # noqa: E402
from sglang_asynctls import hf_model  # noqa: E402

HQ, HKV, D = 4, 2, 32


@pytest.fixture(scope="module")
def tiny():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=97, hidden_size=HQ * D, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=HQ, num_key_value_heads=HKV, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


def test_dense_generate_is_transformers_greedy(tiny):
    ids = torch.randint(0, 97, (300,))
    want = tiny.generate(ids[None], attention_mask=torch.ones(1, 300, dtype=torch.long), max_new_tokens=6,
                         do_sample=False)[0, 300:].tolist()
    m = hf_model.HFModel(tiny)
    channels = torch.arange(D).repeat(2, HKV, 1)  # [layers, Hkv, D]: any ranking
    kv = fd.DocumentKV(m, ids[:-1], channels[:, :, :16], extra=8)
    assert fd.generate(m, kv, int(ids[-1]), fd.DENSE_BUDGET, "dense", 6) == want
    full = fd.Budget(token_budget=320, block_budget=5, sink_tokens=0, local_window=0)  # every token kept
    for method in ("quest", "token_only", "asynctls"):
        assert fd.generate(m, kv, int(ids[-1]), full, method, 6) == want, method
