"""The plugin inside stock SGLang 0.5.17: flags, backend routing, launch-time validation, cheap registration."""

import importlib.metadata
import json
import os
import pickle
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

sglang_server_args = pytest.importorskip("sglang.srt.server_args")
HERE = os.path.dirname(__file__)
FLAGS = ["--enable-asynctls", "--asynctls-block-size", "--asynctls-block-budget", "--asynctls-token-budget",
         "--asynctls-label-channels", "--asynctls-channel-config", "--asynctls-sink-tokens",
         "--asynctls-local-window", "--asynctls-dense-below", "--asynctls-offload", "--asynctls-bound-slack",
         "--asynctls-group-score", "--asynctls-dense-backend", "--asynctls-host-kv-gib",
         "--asynctls-host-cache-tokens", "--asynctls-host-prefetch-rows", "--asynctls-sparse-min-kv-mib"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Model dirs holding only a config.json, as SGLang needs to resolve ServerArgs on CPU."""
    out = {}
    for name in ("tiny_llama", "tiny_deepseek_mla", "tiny_gemma2_swa", "qwen3_8b_shape"):
        d = tmp_path_factory.mktemp(name)
        shutil.copy(os.path.join(HERE, "models", f"{name}.json"), d / "config.json")
        out[name] = str(d)
    return out


@pytest.fixture(scope="module")
def parse():
    from sglang.srt.plugins import load_plugins

    load_plugins()  # discovers our entry point exactly as launch_server does

    def _parse(model, *argv):
        return sglang_server_args.prepare_server_args(["--model-path", model, "--device", "cpu", *argv])

    return _parse


def test_entry_point_is_registered():
    eps = importlib.metadata.entry_points(group="sglang.srt.plugins")
    assert {ep.name: ep.value for ep in eps}.get("asynctls") == "sglang_asynctls.plugin:register"


def test_enable_routes_to_asynctls_backend_and_carries_config(parse, models):
    sa = parse(models["tiny_llama"], "--enable-asynctls", "--asynctls-token-budget", "512",
               "--asynctls-local-window", "256", "--asynctls-label-channels", "16", "--asynctls-bound-slack", "0.5",
               "--asynctls-group-score", "max", "--asynctls-layer-budget-scale", "0:1.25",
               "--asynctls-layer-candidate-scale", "1:2")
    assert sa.attention_backend == "asynctls"
    assert sa.get_attention_backends() == ("asynctls", "asynctls")
    assert sa.page_size == 64  # a KV page is one block
    from sglang_asynctls.runtime_config import config_of

    cfg = config_of(pickle.loads(pickle.dumps(sa)))  # as a spawned scheduler process receives it
    assert (cfg.enabled, cfg.token_budget, cfg.local_window, cfg.label_channels) == (True, 512, 256, 16)
    assert (cfg.bound_slack, cfg.group_score, cfg.layer_budget_scale, cfg.layer_candidate_scale) == (
        0.5, "max", "0:1.25", "1:2")


def test_page_size_1_is_kept_and_64_is_the_default(parse, models):
    """--page-size 1 keeps block bounds per request row (index.py); without the flag a page is one block; a page of
    several whole blocks keeps each block contiguous and aligned, so it is kept too."""
    assert parse(models["tiny_llama"], "--enable-asynctls", "--page-size", "1").page_size == 1
    assert parse(models["tiny_llama"], "--enable-asynctls").page_size == 64
    assert parse(models["tiny_llama"], "--enable-asynctls", "--page-size", "128").page_size == 128


def test_dense_backend_auto_is_what_stock_sglang_picks(parse, models):
    """auto resolves in the launcher to stock's own choice for this model and machine (here, a CPU: SGLang's
    pick is not fa3), and an explicit choice is kept; the schedulers get the concrete name."""
    stock = parse(models["tiny_llama"])
    from sglang_asynctls.dense_backend import stock_default

    want = stock_default(stock)  # SGLang's own default rule (arg_groups/overrides.py: _attention_backend_default)
    assert stock.attention_backend == ("torch_native" if stock.device == "cpu" else want)  # CPU devices: set earlier
    cfg = parse(models["tiny_llama"], "--enable-asynctls")._asynctls_config
    assert cfg.dense_backend == (want if want in ("fa3", "flashinfer", "triton") else "triton")
    assert parse(models["tiny_llama"], "--enable-asynctls", "--asynctls-dense-backend", "triton"
                 )._asynctls_config.dense_backend == "triton"


def test_dense_backend_for_mla_is_stocks_and_for_the_host_tier_triton():
    """MLA wraps fa3, FlashInfer or Triton (all keep the latent in SGLang's MLA pool): auto picks stock's choice.
    The host tier's prefix gather is built on Triton's extend kernel: auto picks Triton, another is refused naming
    the flag."""
    from sglang_asynctls.config import AsyncTLSConfig, AsyncTLSConfigError
    from sglang_asynctls.dense_backend import resolve

    gqa, mla = SimpleNamespace(use_mla_backend=lambda: False), SimpleNamespace(use_mla_backend=lambda: True)
    auto = AsyncTLSConfig(enabled=True)
    assert resolve(auto, gqa, default="fa3") == "fa3"
    assert resolve(auto, mla, default="fa3") == "fa3"
    assert resolve(AsyncTLSConfig(enabled=True, dense_backend="flashinfer"), mla, default="fa3") == "flashinfer"
    assert resolve(auto, mla, default="flashmla") in ("flashinfer", "triton")  # not wrappable: the fallback
    assert resolve(AsyncTLSConfig(enabled=True, host_kv_gib=8.0), gqa, default="fa3") == "triton"
    assert resolve(AsyncTLSConfig(enabled=True, host_kv_gib=8.0), mla, default="fa3") == "triton"
    assert resolve(AsyncTLSConfig(enabled=True, dense_backend="flashinfer"), gqa, default="fa3") == "flashinfer"
    with pytest.raises(AsyncTLSConfigError, match="--asynctls-dense-backend must be one of auto, fa3, flashinfer, "
                                                  "triton"):
        resolve(AsyncTLSConfig(enabled=True, dense_backend="flashmla"), mla, default="fa3")
    with pytest.raises(AsyncTLSConfigError, match="--asynctls-dense-backend .* with --asynctls-host-kv-gib"):
        resolve(AsyncTLSConfig(enabled=True, dense_backend="fa3", host_kv_gib=8.0), gqa, default="fa3")


def test_flag_errors_come_before_sglangs_own_setup(parse, models, capsys, monkeypatch):
    """--asynctls-offload and an unreadable --asynctls-channel-config are refused from the flags alone: SGLang's
    ServerArgs is never built, so none of its output or errors come first."""
    built = []
    monkeypatch.setattr(sglang_server_args.ServerArgs, "__post_init__", lambda self: built.append(1))
    for argv in (["--asynctls-offload"], ["--asynctls-channel-config", "/nonexistent.json"]):
        with pytest.raises(SystemExit):
            parse(models["tiny_llama"], "--enable-asynctls", *argv)
        assert "sglang-asynctls: error:" in capsys.readouterr().err
    assert built == []


def test_without_the_flag_nothing_changes(parse, models):
    sa = parse(models["tiny_llama"])
    assert sa.attention_backend != "asynctls" and not hasattr(sa, "_asynctls_config")


def test_attention_backend_name_alone_enables_defaults(parse, models):
    sa = parse(models["tiny_llama"], "--attention-backend", "asynctls")
    assert sa._asynctls_config.enabled and sa._asynctls_config.token_budget == 1024


def test_mla_model_is_accepted_as_mqa_over_the_latent(parse, models):
    from sglang_asynctls.model_spec import from_sglang_model_config

    sa = parse(models["tiny_deepseek_mla"], "--enable-asynctls", "--asynctls-label-channels", "32")
    spec = from_sglang_model_config(sa.get_model_config())
    assert (spec.kind, spec.num_kv_heads, spec.head_dim, spec.v_head_dim) == ("mla", 1, 64 + 16, 64)


@pytest.mark.parametrize("argv, flag", [
    (["--asynctls-block-budget", "0"], "--asynctls-block-budget"),
    (["--asynctls-block-size", "48"], "--asynctls-block-size"),
    (["--asynctls-token-budget", "9000"], "--asynctls-token-budget"),
    (["--asynctls-token-budget", "600", "--asynctls-block-budget", "8"], "--asynctls-token-budget"),
    (["--asynctls-label-channels", "64"], "--asynctls-label-channels"),
    (["--asynctls-bound-slack", "1.5"], "--asynctls-bound-slack"),
    (["--asynctls-channel-config", "/nonexistent/channels.json"], "--asynctls-channel-config"),
    (["--attention-backend", "flashinfer"], "--attention-backend"),
    (["--decode-attention-backend", "triton"], "--decode-attention-backend"),
    (["--asynctls-offload"], "--asynctls-offload"),
    (["--page-size", "16"], "--page-size"),
    (["--page-size", "96"], "--page-size"),
    (["--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype"),
    (["--asynctls-host-prefetch-rows", "128"], "--asynctls-host-prefetch-rows"),  # no host-row cache to fill
    (["--asynctls-host-kv-gib", "1", "--asynctls-host-cache-tokens", "64", "--asynctls-host-prefetch-rows", "2048",
      "--max-running-requests", "4"], "--asynctls-host-prefetch-rows"),
])
def test_bad_values_fail_at_launch_naming_the_flag(parse, models, capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        parse(models["tiny_llama"], "--enable-asynctls", *argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sglang-asynctls: error:") and flag in err


def test_page_size_1_refuses_request_rows_that_cannot_fit_in_one_line(parse, models, capsys, monkeypatch):
    """At --page-size 1 every request row keeps block bounds for the whole context: on a Qwen3-8B shape at 131,072
    tokens SGLang's default request pool (2,048 rows and the padding row) needs 576 GiB, more than an H200. The
    launcher refuses it with one line naming the flags, before any scheduler starts; 16 requests (4.8 GiB) start."""
    from sglang.srt.utils import common

    monkeypatch.setattr(common, "get_device_memory_capacity", lambda device=None: 143771)  # an H200, in MiB
    qwen3 = models["qwen3_8b_shape"]
    cases = {"": ("576.3 GiB for 2049 request rows", "set --max-running-requests"),
             "512": ("144.3 GiB for 513 request rows", "lower --max-running-requests")}
    for mrr, (need, fix) in cases.items():
        with pytest.raises(SystemExit) as e:
            parse(qwen3, "--enable-asynctls", "--page-size", "1", *(["--max-running-requests", mrr] if mrr else []))
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err
        line = err.strip().splitlines()[-1]
        assert line.startswith("sglang-asynctls: error: asynctls at --page-size 1 keeps block bounds per request "
                               f"row: {need} x 2048 blocks") and fix in line, line
        assert "--page-size 64 (the default)" in line
    sa = parse(qwen3, "--enable-asynctls", "--page-size", "1", "--max-running-requests", "16")
    assert sa.page_size == 1 and sa.max_running_requests == 16
    assert parse(qwen3, "--enable-asynctls").page_size == 64  # page size 64 keeps no per-request rows
    # the host-row cache is sized by request rows too: 2,048 lines of Qwen3-8B's K and V cost 295 MiB a row
    host = ["--enable-asynctls", "--asynctls-host-kv-gib", "1", "--asynctls-host-cache-tokens", "2048"]
    assert parse(qwen3, *host, "--max-running-requests", "16")._asynctls_config.host_cache_tokens == 2048
    with pytest.raises(SystemExit):
        parse(qwen3, *host, "--max-running-requests", "512")
    assert ("--asynctls-host-cache-tokens 2048 keeps host-row cache lines for every request row: 147.7 GiB for 513 "
            "request rows") in capsys.readouterr().err


def test_host_prefetch_flag_reaches_the_config(parse, models):
    sa = parse(models["tiny_llama"], "--enable-asynctls", "--asynctls-host-kv-gib", "1",
               "--asynctls-host-cache-tokens", "64", "--asynctls-host-prefetch-rows", "128",
               "--max-running-requests", "4")
    from sglang_asynctls.runtime_config import config_of

    cfg = config_of(pickle.loads(pickle.dumps(sa)))
    assert (cfg.host_kv_gib, cfg.host_cache_tokens, cfg.host_prefetch_rows) == (1.0, 64, 128)
    assert config_of(parse(models["tiny_llama"], "--enable-asynctls")).host_prefetch_rows == 0  # off by default


def test_pd_decode_server_is_accepted_and_its_prefill_server_runs_stock(parse, models, capsys):
    """PD disaggregation: the decode server runs AsyncTLS (it indexes the KV as it arrives, with or without its radix
    cache, with SGLang's fake transfer for smoke runs); a prefill server with the flag is refused with one line
    saying to run it stock at the decode server's page size, and so is a decode server with HiCache."""
    for extra in ([], ["--disaggregation-decode-enable-radix-cache"], ["--disaggregation-transfer-backend", "fake"],
                  ["--page-size", "1"]):
        sa = parse(models["tiny_llama"], "--enable-asynctls", "--disaggregation-mode", "decode", *extra)
        assert sa.attention_backend == "asynctls" and sa._asynctls_config.enabled
        assert sa.page_size == (1 if extra == ["--page-size", "1"] else 64)
    stock_prefill = parse(models["tiny_llama"], "--disaggregation-mode", "prefill", "--page-size", "64")
    assert stock_prefill.attention_backend != "asynctls" and not hasattr(stock_prefill, "_asynctls_config")
    refused = [(["--disaggregation-mode", "prefill"], "start the --disaggregation-mode prefill server without it, "
                                                      "with the decode server's --page-size (64 unless set)"),
               (["--disaggregation-mode", "decode", "--disaggregation-decode-enable-radix-cache",
                 "--enable-hierarchical-cache"], "cannot be combined with --enable-hierarchical-cache yet"),
               (["--enable-hierarchical-cache"], "a prefix it loads back would be decoded without an index"),
               (["--disaggregation-mode", "decode", "--asynctls-host-kv-gib", "1"],
                "--asynctls-host-kv-gib cannot be combined with --disaggregation-mode yet")]
    for argv, message in refused:
        with pytest.raises(SystemExit) as e:
            parse(models["tiny_llama"], "--enable-asynctls", *argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith("sglang-asynctls: error:") and message in err[-1]


def test_sliding_window_model_is_refused(parse, models, capsys):
    with pytest.raises(SystemExit):
        parse(models["tiny_gemma2_swa"], "--enable-asynctls")
    assert "sliding-window" in capsys.readouterr().err


def test_mla_default_label_channels_must_fit_the_latent(parse, models, capsys):
    with pytest.raises(SystemExit):  # d_c defaults to 128 for MLA; this toy latent is 80 wide
        parse(models["tiny_deepseek_mla"], "--enable-asynctls")
    assert "--asynctls-label-channels must be an even integer in [2, 80]" in capsys.readouterr().err


def _channel_json(path, layers, heads, dim, width):
    ranked = [[list(range(dim))[:width] for _ in range(heads)] for _ in range(layers)]
    path.write_text(json.dumps({"channels": ranked}))
    return str(path)


def test_channel_config_is_checked_against_the_model(parse, models, tmp_path, capsys):
    good = _channel_json(tmp_path / "good.json", layers=2, heads=2, dim=32, width=32)
    sa = parse(models["tiny_llama"], "--enable-asynctls", "--asynctls-channel-config", good,
               "--asynctls-label-channels", "16")
    assert sa._asynctls_config.channel_config == good
    bad = _channel_json(tmp_path / "bad.json", layers=3, heads=2, dim=32, width=32)
    with pytest.raises(SystemExit):
        parse(models["tiny_llama"], "--enable-asynctls", "--asynctls-channel-config", bad)
    assert "2 layers x 2 KV heads" in capsys.readouterr().err


def test_hybrid_linear_attention_is_refused():
    from sglang_asynctls.model_spec import UnsupportedModelError, from_sglang_model_config

    mc = SimpleNamespace(attention_arch=SimpleNamespace(name="MHA"), hf_config=SimpleNamespace(
        architectures=["Qwen3NextForCausalLM"]), hf_text_config=SimpleNamespace(), is_encoder_decoder=False,
        is_hybrid_swa=False, full_attention_interval=4, linear_attn_registry_result=("gdn", None))
    with pytest.raises(UnsupportedModelError, match="hybrid linear attention"):
        from_sglang_model_config(mc)


def test_backend_factory_is_registered(parse):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    assert "asynctls" in ATTENTION_BACKENDS and "asynctls" in sglang_server_args.ATTENTION_BACKEND_CHOICES


def test_register_is_cheap_and_touches_no_gpu_or_kernels():
    code = ("import sys, time, torch; t = time.time(); import sglang_asynctls.plugin as p; p.register(); "
            "print(round(time.time() - t, 2), torch.cuda.is_initialized(), "
            "any(m.startswith('sglang_asynctls.kernels') or m == 'sglang_asynctls.backend' for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    seconds, cuda, kernels = out.stdout.split()
    assert cuda == "False" and kernels == "False"


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in FLAGS:
        assert flag in out.stdout
    assert "AsyncTLS sparse decode" in out.stdout


def test_host_tier_hooks_are_applied_to_sglangs_pool(parse):
    """load_plugins() wraps the two targets of patches/kv_host_tier.py: a pool built under a host-tier plan reaches
    our hook (its size check), and without a plan the hook is a pass-through to SGLang's own method."""
    from types import SimpleNamespace

    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from sglang_asynctls.offload import host_tier

    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    assert getattr(KVCacheConfigurator.config_from_budget, "__wrapped__", None) is not None
    assert getattr(MLATokenToKVPool._create_buffers, "__wrapped__", None) is not None
    host_tier.set_plan(host_tier.HostTierPlan(device_tokens=10, host_tokens=10))
    try:
        with pytest.raises(ValueError, match="planned for 20"):
            MHATokenToKVPool._create_buffers_normal(SimpleNamespace(size=5))
    finally:
        host_tier.set_plan(None)
