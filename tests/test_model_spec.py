"""Model checks and channel-config loading: one clear error per problem, naming the flag."""

import json
import re

import pytest

from sglang_asynctls.config import AsyncTLSConfig, AsyncTLSConfigError
from sglang_asynctls.model_spec import (ModelAttention, UnsupportedModelError, check_config_for_model,
                                        check_model, load_channel_config)

QWEN3_8B = ModelAttention("gqa", 36, 32, 8, 128, 128)
GLM_FLASH = ModelAttention("mla", 47, 20, 1, 576, 512)


def write(tmp_path, channels, name="c.json"):
    p = tmp_path / name
    p.write_text(json.dumps({"channels": channels}))
    return str(p)


def ranked(layers, heads, dim):
    return [[list(reversed(range(dim))) for _ in range(heads)] for _ in range(layers)]


def test_loads_and_truncates_to_label_channels(tmp_path):
    model = ModelAttention("gqa", 2, 6, 3, 16, 16)
    ch = load_channel_config(write(tmp_path, ranked(2, 3, 16)), model, 4)
    assert ch.shape == (2, 3, 4) and ch[0, 0].tolist() == [15, 14, 13, 12]


@pytest.mark.parametrize("content, needle", [
    ("not json", "readable channel JSON"),
    ('{"chans": []}', "readable channel JSON"),
    ('{"channels": [[[0, 1]], [[0, 1, 2]]]}', "readable channel JSON"),  # ragged
])
def test_unreadable_configs(tmp_path, content, needle):
    p = tmp_path / "x.json"
    p.write_text(content)
    with pytest.raises(AsyncTLSConfigError, match=needle) as e:
        load_channel_config(str(p), ModelAttention("gqa", 2, 2, 1, 8, 8), 2)
    assert str(e.value).startswith("--asynctls-channel-config")


@pytest.mark.parametrize("channels, needle", [
    (ranked(3, 3, 16), "2 layers x 3 KV heads"),
    (ranked(2, 2, 16), "2 layers x 3 KV heads"),
    ([[[0, 1] for _ in range(3)] for _ in range(2)], "ranks only 2 channels"),
    ([[[0, 1, 2, 99] for _ in range(3)] for _ in range(2)], "outside [0, 16)"),
    ([[[0, 1, 1, 2] for _ in range(3)] for _ in range(2)], "repeats a channel"),
])
def test_mismatched_configs(tmp_path, channels, needle):
    with pytest.raises(AsyncTLSConfigError, match=re.escape(needle)):
        load_channel_config(write(tmp_path, channels), ModelAttention("gqa", 2, 6, 3, 16, 16), 4)


def test_config_checks_against_real_shapes(tmp_path):
    assert check_config_for_model(AsyncTLSConfig(), QWEN3_8B) is None
    assert check_config_for_model(AsyncTLSConfig(), GLM_FLASH) is None  # d_c = 128 of 576
    with pytest.raises(AsyncTLSConfigError, match=r"\[2, 128\]"):
        check_config_for_model(AsyncTLSConfig(label_channels=130), QWEN3_8B)
    path = write(tmp_path, ranked(36, 8, 128))
    assert check_config_for_model(AsyncTLSConfig(channel_config=path), QWEN3_8B).shape == (36, 8, 32)


@pytest.mark.parametrize("model", [
    ModelAttention("gqa", 2, 7, 2, 64, 64),   # heads not a multiple of KV heads
    ModelAttention("gqa", 2, 4, 0, 64, 64),
    ModelAttention("linear", 2, 4, 2, 64, 64),
    ModelAttention("gqa", 2, 4, 2, 4, 4),
])
def test_unsupported_attention_shapes(model):
    with pytest.raises(UnsupportedModelError, match="--enable-asynctls"):
        check_model(model)


def test_packaged_smollm2_calibration_is_found_by_shape():
    smollm2 = ModelAttention("gqa", 30, 9, 3, 64, 64)
    ch = check_config_for_model(AsyncTLSConfig(label_channels=16), smollm2)
    assert ch.shape == (30, 3, 16)
    assert check_config_for_model(AsyncTLSConfig(), QWEN3_8B) is None  # no calibration shipped for this shape


def test_auto_layer_schedule_comes_from_the_channel_config(tmp_path):
    from sglang_asynctls.model_spec import resolved_layer_schedule

    smollm2 = ModelAttention("gqa", 30, 9, 3, 64, 64)
    packaged = resolved_layer_schedule(AsyncTLSConfig(), smollm2)  # the packaged SmolLM2 calibration's schedule
    assert packaged.layer_budget_scale not in ("", "auto") and packaged.layer_candidate_scale not in ("", "auto")
    budgets = packaged.layer_budgets(30)
    assert sum(kt for kt, _ in budgets) <= 30 * 1024 and len(set(budgets)) > 1
    assert resolved_layer_schedule(AsyncTLSConfig(layer_budget_scale=""), smollm2).layer_budget_scale == ""
    qwen = resolved_layer_schedule(AsyncTLSConfig(), QWEN3_8B)  # nothing shipped: every layer alike
    assert (qwen.layer_budget_scale, qwen.layer_candidate_scale) == ("", "")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"channels": ranked(4, 8, 128), "layer_budget_scale": "0:2,4:1"}))
    with pytest.raises(AsyncTLSConfigError, match="layer-budget-scale must be layers < 4"):
        check_config_for_model(AsyncTLSConfig(channel_config=str(path)), ModelAttention("gqa", 4, 32, 8, 128, 128))


def test_explicit_budgets_win_over_the_calibrated_schedule(caplog):
    """SmolLM2's packaged schedule gives layers 0.75x k_t: at k_t 256 with sink + window 192 a layer would be left
    with 192. The schedule was never asked for, so it yields (one warning) and every layer gets k_t 256, k_b 16."""
    from sglang_asynctls.model_spec import resolved_layer_schedule

    smollm2 = ModelAttention("gqa", 30, 9, 3, 64, 64)
    cfg = AsyncTLSConfig(token_budget=256, block_budget=16)
    with caplog.at_level("WARNING"):
        resolved = resolved_layer_schedule(cfg, smollm2)
    assert resolved.layer_budgets(30) == [(256, 16)] * 30
    assert "calibrated per-layer schedule does not fit" in caplog.text
    check_config_for_model(cfg, smollm2)  # and the launch check passes
    with pytest.raises(AsyncTLSConfigError, match="layer-budget-scale must be a schedule"):
        check_config_for_model(AsyncTLSConfig(token_budget=256, block_budget=16, layer_budget_scale="0:0.5"),
                               smollm2)  # a schedule the user gave is checked as given
