"""AsyncTLSConfig validation: every bad value fails with a message naming its flag and the allowed range."""

import pytest

from sglang_asynctls.config import AsyncTLSConfig, AsyncTLSConfigError


def test_defaults_are_valid_and_match_the_paper():
    cfg = AsyncTLSConfig()
    assert (cfg.block_size, cfg.block_budget, cfg.token_budget) == (64, 128, 1024)
    assert cfg.resolved_label_channels("gqa") == 32 and cfg.resolved_label_channels("mla") == 128
    assert cfg.forced_blocks == 1 + 2 + 1
    assert (cfg.bound_slack, cfg.group_score) == (1.0, "sum")  # the exact min/max bound, summed over heads
    assert cfg.layer_budget_scale == cfg.layer_candidate_scale == "auto"  # the model's calibrated schedule
    assert cfg.layer_budgets(30) == [(1024, 128)] * 30  # unresolved (no calibration): every layer alike
    assert cfg.with_layer_schedule(None).layer_budget_scale == ""
    tuned = cfg.with_layer_schedule({"layer_budget_scale": "0:2", "layer_candidate_scale": "3:2"})
    assert (tuned.layer_budget_scale, tuned.layer_candidate_scale) == ("0:2", "3:2")
    explicit = AsyncTLSConfig(layer_budget_scale="")  # an explicit value is kept
    assert explicit.with_layer_schedule({"layer_budget_scale": "0:2"}).layer_budget_scale == ""


@pytest.mark.parametrize("kwargs, flag, allowed", [
    (dict(block_size=48), "--asynctls-block-size", "power of two"),
    (dict(block_size=8), "--asynctls-block-size", "[16, 512]"),
    (dict(block_size=1024), "--asynctls-block-size", "[16, 512]"),
    (dict(block_budget=0), "--asynctls-block-budget", "[4, 65536]"),
    (dict(block_budget=-3), "--asynctls-block-budget", "[4, 65536]"),
    (dict(block_budget=3), "--asynctls-block-budget", "[4, 65536]"),
    (dict(token_budget=0), "--asynctls-token-budget", "[1, 8192]"),
    (dict(token_budget=8193), "--asynctls-token-budget", "[1, 8192]"),
    (dict(token_budget=1000, block_budget=8, block_size=64, local_window=64), "--asynctls-token-budget",
     "[1, 512]"),
    (dict(token_budget=192), "--asynctls-token-budget", "greater than"),
    (dict(label_channels=31), "--asynctls-label-channels", "even"),
    (dict(label_channels=0), "--asynctls-label-channels", "[2, 1024]"),
    (dict(sink_tokens=-1), "--asynctls-sink-tokens", ">= 0"),
    (dict(local_window=-5), "--asynctls-local-window", ">= 0"),
    (dict(dense_below=-1), "--asynctls-dense-below", ">= 0"),
    (dict(block_budget=2.5), "--asynctls-block-budget", "integer"),
    (dict(token_budget=True), "--asynctls-token-budget", "integer"),
    (dict(bound_slack=1.5), "--asynctls-bound-slack", "[0, 1]"),
    (dict(bound_slack=-0.1), "--asynctls-bound-slack", "[0, 1]"),
    (dict(bound_slack=float("nan")), "--asynctls-bound-slack", "[0, 1]"),
    (dict(bound_slack=True), "--asynctls-bound-slack", "[0, 1]"),
    (dict(group_score="mean"), "--asynctls-group-score", "one of sum, max"),
    (dict(layer_budget_scale="0=2"), "--asynctls-layer-budget-scale", "LAYER:SCALE pairs"),
    (dict(layer_budget_scale="0:2,0:3"), "--asynctls-layer-budget-scale", "distinct layers"),
    (dict(layer_budget_scale="0:-1"), "--asynctls-layer-budget-scale", "scale > 0"),
    (dict(layer_budget_scale="0:1000"), "--asynctls-layer-budget-scale", "to 65536 blocks"),
    (dict(layer_budget_scale="1:0.1"), "--asynctls-layer-budget-scale", "more than sink + window = 192"),
    (dict(layer_budget_scale=2), "--asynctls-layer-budget-scale", "string"),
    (dict(layer_candidate_scale="3:0.5"), "--asynctls-layer-candidate-scale", "SCALE >= 1"),
    (dict(layer_candidate_scale="3;2"), "--asynctls-layer-candidate-scale", "LAYER:SCALE pairs"),
    (dict(host_prefetch_rows=64), "--asynctls-host-prefetch-rows", "0 unless --asynctls-host-cache-tokens"),
    (dict(host_kv_gib=8, host_cache_tokens=2048, host_prefetch_rows=-1), "--asynctls-host-prefetch-rows",
     "[0, 1024]"),
    (dict(host_kv_gib=8, host_cache_tokens=2048, host_prefetch_rows=1025), "--asynctls-host-prefetch-rows",
     "[0, 1024]"),
    (dict(host_kv_gib=8, host_cache_tokens=2048, host_prefetch_rows=1.5), "--asynctls-host-prefetch-rows",
     "integer"),
])
def test_bad_values_name_the_flag_and_range(kwargs, flag, allowed):
    with pytest.raises(AsyncTLSConfigError) as err:
        AsyncTLSConfig(**kwargs)
    msg = str(err.value)
    assert msg.startswith(flag) and allowed in msg and "got" in msg


def test_layer_budget_scale_keeps_the_average_budget():
    cfg = AsyncTLSConfig(layer_budget_scale="0:4, 1:2")
    assert cfg.layer_scale() == {0: 4.0, 1: 2.0}
    budgets = cfg.layer_budgets(30)
    assert budgets[:2] == [(4096, 512), (2048, 256)]
    assert set(budgets[2:]) == {((30 * 1024 - 6144) // 28, (30 * 128 - 768) // 28)}
    assert sum(kt for kt, _ in budgets) <= 30 * 1024 and sum(kb for _, kb in budgets) <= 30 * 128
    with pytest.raises(AsyncTLSConfigError, match="layers < 1"):
        cfg.layer_budgets(1)
    with pytest.raises(AsyncTLSConfigError, match="more than sink"):  # 4 layers: the other two get < 192 each
        AsyncTLSConfig(layer_budget_scale="0:2,1:1.9").layer_budgets(4)


def test_layer_candidate_scale_adds_blocks_without_moving_tokens():
    cfg = AsyncTLSConfig(layer_budget_scale="0:2", layer_candidate_scale="5:2,6:1.5")
    budgets = cfg.layer_budgets(8)
    assert budgets[0] == (2048, 256) and budgets[5] == (877, 2 * 109) and budgets[6] == (877, int(1.5 * 109))
    assert budgets[7] == ((8 * 1024 - 2048) // 7, (8 * 128 - 256) // 7) == (877, 109)
    with pytest.raises(AsyncTLSConfigError, match="--asynctls-layer-candidate-scale must be layers < 6"):
        cfg.layer_budgets(6)


def test_forced_blocks_scale_with_sink_and_window():
    cfg = AsyncTLSConfig(block_size=16, sink_tokens=17, local_window=40, block_budget=8, token_budget=100)
    assert cfg.forced_blocks == 2 + 3 + 1


def test_json_round_trip_and_unknown_keys():
    cfg = AsyncTLSConfig(enabled=True, token_budget=512, label_channels=16, bound_slack=0.5,
                         group_score="max", layer_budget_scale="0:2", layer_candidate_scale="1:2")
    assert AsyncTLSConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(AsyncTLSConfigError, match="unknown"):
        AsyncTLSConfig.from_json('{"token_budgets": 5}')


def test_config_is_frozen():
    with pytest.raises(Exception):
        AsyncTLSConfig().token_budget = 5

