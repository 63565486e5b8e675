"""pd_bench.py's commands are what SGLang's CLI (with the plugin) accepts as a PD pair, and its steps run end to end
against stand-in servers (tests/test_soak.py's stdlib server): start, serve_bench's stop, the one-GPU smoke."""

import json
import os
import shutil
import sys
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import pd_bench  # noqa: E402
import serve_bench  # noqa: E402
from server_lifecycle import group_pids, port_free  # noqa: E402
from test_soak import FAKE  # noqa: E402

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def parse(tmp_path_factory):
    """SGLang's own parsing of a launch_server argv, with the plugin loaded, for a config-only model dir."""
    server_args = pytest.importorskip("sglang.srt.server_args")
    from sglang.srt.plugins import load_plugins

    load_plugins()
    model = tmp_path_factory.mktemp("tiny_llama")
    shutil.copy(os.path.join(HERE, "models", "tiny_llama.json"), model / "config.json")

    def _parse(argv):
        assert argv[1:3] == ["-m", "sglang.launch_server"]
        return server_args.prepare_server_args([*argv[3:], "--device", "cpu"])

    return str(model), _parse


def test_a_pair_is_a_stock_prefill_server_and_an_asynctls_decode_server_at_one_page_size(parse):
    model, parse_argv = parse
    cmds = pd_bench.pair_commands(model, ["--enable-asynctls"])
    prefill, decode = parse_argv(cmds["prefill"]), parse_argv(cmds["decode"])
    assert (prefill.disaggregation_mode, decode.disaggregation_mode) == ("prefill", "decode")
    assert prefill.attention_backend != "asynctls" and not hasattr(prefill, "_asynctls_config")
    assert decode.attention_backend == "asynctls" and decode._asynctls_config.enabled
    assert prefill.page_size == decode.page_size == decode._asynctls_config.block_size  # the transfer needs it
    assert prefill.disaggregation_transfer_backend == decode.disaggregation_transfer_backend == "mooncake"
    assert (prefill.base_gpu_id, decode.base_gpu_id) == (0, 1)
    assert prefill.disaggregation_bootstrap_port == pd_bench.BOOTSTRAP_PORT
    stock = parse_argv(pd_bench.pair_commands(model)["decode"])
    assert stock.attention_backend != "asynctls" and stock.page_size == decode.page_size
    router = cmds["router"]
    assert router[1:5] == ["-m", "sglang_router.launch_router", "--pd-disaggregation", "--mini-lb"]
    at = router.index("--prefill")
    assert router[at + 1:at + 3] == [f"http://127.0.0.1:{pd_bench.PREFILL_PORT}", str(pd_bench.BOOTSTRAP_PORT)]
    assert router[router.index("--decode") + 1] == f"http://127.0.0.1:{pd_bench.DECODE_PORT}"
    assert router[router.index("--port") + 1] == str(serve_bench.PORT)  # serve_bench's workloads drive the router


def test_transfer_settings_and_the_start_order():
    assert pd_bench.transfer_env("mooncake")["MOONCAKE_PROTOCOL"] in ("tcp", os.environ.get("MOONCAKE_PROTOCOL"))
    assert pd_bench.transfer_env("nixl") == {}
    assert pd_bench.start_order("0,1") == [("prefill", "decode"), ("router",)]
    assert pd_bench.start_order("0,0") == [("prefill",), ("decode",), ("router",)]


def test_the_smoke_server_is_an_asynctls_decode_server_with_the_fake_transfer(parse):
    model, parse_argv = parse
    sa = parse_argv(pd_bench.smoke_command(model))
    assert (sa.disaggregation_mode, sa.disaggregation_transfer_backend, sa.attention_backend) == (
        "decode", "fake", "asynctls")
    dense_below = sa._asynctls_config.dense_below
    long_prompts = [n for n, _ in pd_bench.SMOKE_PROMPTS if n >= dense_below]
    assert len(long_prompts) >= 2 and len(long_prompts) < len(pd_bench.SMOKE_PROMPTS)  # sparse and dense decode


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE)
    fake = lambda port: [sys.executable, str(script), "--port", str(port)]  # noqa: E731
    monkeypatch.setattr(pd_bench, "PREFILL_PORT", 31481)
    monkeypatch.setattr(pd_bench, "DECODE_PORT", 31482)
    monkeypatch.setattr(serve_bench, "PORT", 31483)
    monkeypatch.setattr(serve_bench, "STOP_GRACE_S", 1)
    monkeypatch.setattr(pd_bench, "pair_commands", lambda *a, **k: {
        "prefill": fake(pd_bench.PREFILL_PORT), "decode": fake(pd_bench.DECODE_PORT),
        "router": fake(serve_bench.PORT)})
    monkeypatch.setattr(pd_bench, "smoke_command", lambda model, flags=(): fake(pd_bench.DECODE_PORT))
    monkeypatch.setattr(pd_bench, "SMOKE_PROMPTS", [(37, 4), (611, 8), (2047, 4)])  # the stand-in's context: 8k
    return tmp_path


def test_start_then_serve_bench_stop_on_stand_ins(stand_ins, monkeypatch):
    args = SimpleNamespace(label="pd_asynctls", dir=str(stand_ins), model="m", decode_flags="--enable-asynctls",
                           prefill_flags="", transfer_backend="mooncake", gpus="0,1", ready_timeout=60)
    pd_bench.start(args)
    state = json.load(open(stand_ins / "pd_asynctls.json"))
    assert set(state["server_cmd"]) == {"prefill", "decode", "router"} and len(state["pids"]) == 3
    assert state["ready_s"] >= 0 and "gpu_free_gib_at_ready" in state
    logs = serve_bench._server_logs(SimpleNamespace(dir=str(stand_ins), label="pd_asynctls"))
    assert [os.path.basename(p) for p in logs] == ["pd_asynctls_server.log", "pd_asynctls_prefill_server.log"]
    serve_bench.stop(SimpleNamespace(dir=str(stand_ins), label="pd_asynctls"))
    assert all(not group_pids(pid) for pid in state["pids"])
    assert all(port_free(p) for p in (pd_bench.PREFILL_PORT, pd_bench.DECODE_PORT, serve_bench.PORT))


def test_a_server_that_never_answers_stops_the_pair(stand_ins, monkeypatch):
    monkeypatch.setattr(pd_bench, "pair_commands", lambda *a, **k: {
        "prefill": [sys.executable, "-c", "import sys; print('prefill failed'); sys.exit(1)"],
        "decode": [sys.executable, "-c", "import time; time.sleep(60)"], "router": ["true"]})
    args = SimpleNamespace(label="broken", dir=str(stand_ins), model="m", decode_flags="", prefill_flags="",
                           transfer_backend="nixl", gpus="0,1", ready_timeout=20)
    with pytest.raises(SystemExit, match="the prefill server is exited"):
        pd_bench.start(args)
    state = json.load(open(stand_ins / "broken.json"))
    assert state["start_error"] == "prefill: exited" and "prefill failed" in state["log_tail"]
    assert all(not group_pids(pid) for pid in state["pids"])  # the decode server was stopped too


def test_smoke_on_a_stand_in_counts_the_arrivals(stand_ins, monkeypatch):
    args = SimpleNamespace(dir=str(stand_ins), model="m", gpu=0, flags="", ready_timeout=60)
    pd_bench.smoke(args)
    result = json.load(open(stand_ins / "pd_smoke.json"))
    assert result["ready"] == "ready" and result["arrivals_indexed"] == 3 and result["passed"], result
    assert [r["output_tokens"] for r in result["requests"]] == [4, 8, 4] and result["shutdown"]["clean"]


def test_smoke_verdict():
    ok = {"ready": "ready", "requests": [{"output_tokens": m} for _, m in pd_bench.SMOKE_PROMPTS],
          "arrivals_indexed": len(pd_bench.SMOKE_PROMPTS), "shutdown": {"clean": True}}
    assert pd_bench.smoke_passed(ok)
    assert not pd_bench.smoke_passed({**ok, "arrivals_indexed": len(pd_bench.SMOKE_PROMPTS) - 1})  # one not indexed
    assert not pd_bench.smoke_passed({**ok, "requests": ok["requests"][:-1]})
    assert not pd_bench.smoke_passed({**ok, "shutdown": {"clean": False}})
    assert not pd_bench.smoke_passed({**ok, "ready": "timeout"})
