"""Calibration of a Hugging Face model dir (`hf_model` + `calibrate --model DIR`) on a tiny random Qwen2 (q/k/v
bias, GQA, RoPE theta 1e6): the captured q/k/v are the post-RoPE projections computed by hand from each layer's
input, capturing changes no logit, a decode step through the attention callable equals the full forward, and the
CLI's JSON ranks channels from exactly those q/k."""

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sglang_asynctls import calibrate, hf_model  # noqa: E402
from sglang_asynctls.model_spec import ModelAttention, load_channel_config  # noqa: E402

HQ, HKV, D, LAYERS, THETA = 4, 2, 16, 2, 1e6


def _byte_tokenizer():
    """A byte-level BPE with no merges: 256 ids, any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=bytes_to_unicode()[0])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=HQ * D, intermediate_size=96, num_hidden_layers=LAYERS,
                      num_attention_heads=HQ, num_key_value_heads=HKV, max_position_embeddings=4096,
                      rope_parameters={"rope_type": "default", "rope_theta": THETA}, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # random biases: an HF port that dropped them would fail the q/k checks
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    d = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(d)
    _byte_tokenizer().save_pretrained(d)
    return d


def _rope(x, positions):
    """Rotate-half RoPE by hand: x [L, H, D] at positions [L]."""
    inv = 1.0 / THETA ** (torch.arange(0, D, 2).float() / D)
    ang = torch.cat([positions.float()[:, None] * inv] * 2, dim=-1)[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * ang.cos() + torch.cat((-x2, x1), dim=-1) * ang.sin()


@torch.no_grad()
def test_prefill_captures_post_rope_qkv(tiny_dir):
    m = hf_model.load(tiny_dir)
    ids = torch.randint(0, 256, (37,))
    inputs = {}
    for i, layer in enumerate(m.model.model.layers):
        layer.self_attn.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: inputs.__setitem__(i, kwargs["hidden_states"][0]), with_kwargs=True)
    seen = {}
    m.prefill(ids, lambda layer, q, k, v: seen.__setitem__(layer, (q.clone(), k.clone(), v.clone())))
    pos = torch.arange(len(ids))
    for i, layer in enumerate(m.model.model.layers):
        a, h = layer.self_attn, inputs[i].clone()  # out of inference mode
        q = _rope(a.q_proj(h).view(-1, HQ, D), pos)
        k = _rope(a.k_proj(h).view(-1, HKV, D), pos)
        v = a.v_proj(h).view(-1, HKV, D)
        for got, want in zip(seen[i], (q, k, v)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_capture_changes_no_logit(tiny_dir):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 256, (50,))
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa")
    want = plain(ids[None]).logits[0]
    m = hf_model.load(tiny_dir)
    torch.testing.assert_close(m.prefill(ids, logit_positions=torch.tensor([3, 20, 49])), want[[3, 20, 49]])
    torch.testing.assert_close(m.prefill(ids), want[-1:])


def test_decode_rows_through_the_attention_callable(tiny_dir):
    """Two rows at other positions, each attending (by hand) to the prefill's K/V before it and its own."""
    m = hf_model.load(tiny_dir)
    ids = torch.randint(0, 256, (40,))
    cache = {}
    m.prefill(ids, lambda layer, q, k, v: cache.__setitem__(layer, (k.clone(), v.clone())))
    full = m.prefill(ids, logit_positions=torch.tensor([10, 39]))
    rows = torch.tensor([10, 39])

    def attention(layer, q, k, v):
        out = []
        for b, p in enumerate(rows.tolist()):
            keys = torch.cat([cache[layer][0][:p], k[b:b + 1]]).repeat_interleave(HQ // HKV, dim=1)
            vals = torch.cat([cache[layer][1][:p], v[b:b + 1]]).repeat_interleave(HQ // HKV, dim=1)
            w = torch.softmax(torch.einsum("hd,lhd->hl", q[b], keys) / math.sqrt(D), dim=-1)
            out.append(torch.einsum("hl,lhd->hd", w, vals))
        return torch.stack(out)

    torch.testing.assert_close(m.decode(ids[rows], rows, attention), full, rtol=1e-4, atol=1e-4)


def test_refuses_mla_and_sliding_window():
    from transformers import Qwen2Config

    with pytest.raises(ValueError, match="sliding-window"):
        hf_model.shape_of(Qwen2Config(use_sliding_window=True, sliding_window=128))
    mla = Qwen2Config()
    mla.kv_lora_rank = 512
    with pytest.raises(ValueError, match="MLA"):
        hf_model.shape_of(mla)


def test_cli_on_a_model_dir(tiny_dir, tmp_path):
    out = tmp_path / "ch.json"
    calibrate.main(["--model", str(tiny_dir), "--out", str(out), "--chunk-tokens", "300"])
    meta = json.loads(out.read_text())
    assert (meta["num_layers"], meta["num_kv_heads"], meta["head_dim"]) == (LAYERS, HKV, D)
    assert meta["calibration_text"]["modules"] == list(calibrate.CALIBRATION_MODULES)
    assert meta["calibration_text"]["tokens"] == 300 * len(calibrate.CALIBRATION_MODULES)
    spec = ModelAttention("gqa", LAYERS, HQ, HKV, D, D)
    assert load_channel_config(str(out), spec, D).shape == (LAYERS, HKV, D)
    # the same ranking from absmax taken by hand over the same chunks
    m, tok = hf_model.load(tiny_dir), hf_model.load_tokenizer(tiny_dir)
    stats = calibrate.AbsMax(LAYERS, HQ, HKV, D)
    for ids in calibrate.chunks_of(tok, calibrate.CALIBRATION_MODULES, 300):
        m.prefill(ids, stats)
    assert meta["channels"] == stats.ranked_channels().tolist()
    assert stats.q.abs().sum() > 0 and stats.k.abs().sum() > 0


def test_stdlib_source_reads_a_module_that_became_a_package(tmp_path, monkeypatch):
    """Python 3.12's stdlib has zipfile/__init__.py where 3.11 has zipfile.py; the evaluation digest reads both."""
    from sglang_asynctls import calibrate

    (tmp_path / "zipfile").mkdir()
    (tmp_path / "zipfile" / "__init__.py").write_text("PKG = 1\n")
    (tmp_path / "ast.py").write_text("MOD = 1\n")
    monkeypatch.setenv(calibrate.STDLIB_ENV, str(tmp_path))
    assert calibrate.stdlib_source("zipfile.py") == "PKG = 1\n"
    assert calibrate.stdlib_source("ast.py") == "MOD = 1\n"
    with pytest.raises(FileNotFoundError):
        calibrate.stdlib_source("absent.py")
