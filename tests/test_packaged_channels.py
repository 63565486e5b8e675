"""Every packaged calibration (sglang_asynctls/data/*_channels.json) is what the launcher picks for a model of its
attention shape, ranks all head_dim channels of every (layer, KV head), and no two share a shape (the lookup is
by shape, so a second one would make the choice depend on file order)."""

import json
from pathlib import Path

import pytest

from sglang_asynctls.model_spec import ModelAttention, load_channel_config, packaged_channel_config

DATA = Path(__file__).resolve().parent.parent / "sglang_asynctls" / "data"
FILES = sorted(DATA.glob("*_channels.json"))
# the attention shapes of the models the package ships calibrations for: (layers, query heads, KV heads, head dim)
SHIPPED = {"smollm2_channels.json": (30, 9, 3, 64), "qwen25coder_0.5b_channels.json": (24, 14, 2, 64),
           "qwen25coder_1.5b_channels.json": (28, 12, 2, 128)}


def _meta(path):
    return json.loads(path.read_text())


def test_the_shipped_set():
    assert sorted(p.name for p in FILES) == sorted(SHIPPED)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_found_for_its_model_and_a_full_ranking(path):
    layers, hq, hkv, d = SHIPPED[path.name]
    meta = _meta(path)
    assert (meta["num_layers"], meta["num_kv_heads"], meta["head_dim"]) == (layers, hkv, d)
    model = ModelAttention("gqa", layers, hq, hkv, d, d)
    assert packaged_channel_config(model) == str(path)
    channels = load_channel_config(str(path), model, d)
    assert all(sorted(row) == list(range(d)) for row in channels.reshape(-1, d).tolist())


def test_shapes_are_distinct():
    shapes = [(m["num_layers"], m["num_kv_heads"], m["head_dim"]) for m in map(_meta, FILES)]
    assert len(set(shapes)) == len(shapes)


def test_unknown_shape_gets_none():
    assert packaged_channel_config(ModelAttention("gqa", 36, 32, 8, 128, 128)) is None  # Qwen3-8B: no calibration
