"""The launch matrix: its definition (every combination once, stock = the same flags minus AsyncTLS's), the documented
refusals (the texts the plugin really prints), --only / --resume, the verdicts and the summary; on the CPU the whole
cell path runs against a stand-in server (stdlib HTTP, same endpoints), and on a GPU host against real servers."""

import json
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import launch_cells as lc  # noqa: E402
import launch_matrix  # noqa: E402
import server_lifecycle  # noqa: E402
from test_soak import FAKE  # noqa: E402  (one stand-in server for both)

from sglang_asynctls.config import AsyncTLSConfig, AsyncTLSConfigError  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
CELLS = lc.build_cells()
BY_NAME = {c.name: c for c in CELLS}


def _is_asynctls_flag(flag: str) -> bool:
    return flag.startswith("--asynctls-") or flag == "--enable-asynctls"


def _without_asynctls(flags) -> list:
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
        elif _is_asynctls_flag(f):
            skip = f != "--enable-asynctls"  # every --asynctls-* flag takes a value
        else:
            out.append(f)
    return out


def test_every_combination_once_and_stock_once_per_page_size_and_fraction():
    kinds = [c.kind for c in CELLS]
    assert kinds.count("asynctls") == 18 and kinds.count("stock") == 12 and kinds.count("refusal") >= 1
    assert len(BY_NAME) == len(CELLS)
    combos = {(c.model, c.config, c.mem) for c in CELLS if c.kind == "asynctls"}
    assert combos == {(m, cfg, mem) for m in lc.MODELS for cfg in lc.CONFIGS for mem in lc.MEMS}


def test_stock_is_the_same_launch_minus_asynctls_flags():
    for c in CELLS:
        if c.kind == "stock":
            assert not any(_is_asynctls_flag(f) for f in c.flags), c.name
        elif c.kind == "asynctls":
            stock = BY_NAME[c.stock_ref]
            assert "--enable-asynctls" in c.flags and stock.kind == "stock" and stock.model == c.model
            assert stock.mem == c.mem
            if c.config == "host":  # the host tier is compared with the default stock server
                assert stock.config == "default" and "--asynctls-host-kv-gib" in c.flags
            else:
                assert stock.config == c.config and _without_asynctls(c.flags) == list(stock.flags), c.name
    assert "--mem-fraction-static" in BY_NAME["asynctls.qwen3.page1.mem95"].flags
    assert "--mem-fraction-static" not in BY_NAME["stock.qwen3.page1.memdef"].flags


def test_the_long_request_is_longer_than_each_servers_dense_below():
    default = AsyncTLSConfig().dense_below
    for m in lc.MODELS.values():
        flags = list(m.asynctls_flags)
        dense_below = int(flags[flags.index("--asynctls-dense-below") + 1]) if flags else default
        assert m.long_tokens >= dense_below, m.name
    assert lc.MODELS["smollm2"].long_tokens + lc.NEW_TOKENS < 8192  # SmolLM2's context


def test_host_cache_refusal_is_the_text_the_launch_check_prints(monkeypatch):
    from sglang_asynctls.patches import server_args_from_cli

    cell = BY_NAME["refuse.smollm2.hostcache-no-mrr"]
    flags = list(cell.flags)
    cfg = AsyncTLSConfig(enabled=True, host_kv_gib=float(flags[flags.index("--asynctls-host-kv-gib") + 1]),
                         host_cache_tokens=int(flags[flags.index("--asynctls-host-cache-tokens") + 1]))
    args = SimpleNamespace(max_running_requests=None, enable_hierarchical_cache=False, enable_memory_saver=False,
                           speculative_algorithm=None, disaggregation_mode="null", tp_size=1, nnodes=1)
    with pytest.raises(AsyncTLSConfigError) as e:
        server_args_from_cli._check_host_tier(args, cfg)
    assert cell.expect in str(e.value)


def test_page1_refusal_is_the_text_the_launch_check_prints(monkeypatch):
    """The qwen3 page-1 cell (SGLang's default request pool) against the launcher's check on Qwen3-8B's shape."""
    from sglang.srt.utils import common

    from sglang_asynctls.model_spec import ModelAttention
    from sglang_asynctls.patches import server_args_from_cli

    cell = BY_NAME["refuse.qwen3.page1-default-rows"]
    assert "--max-running-requests" not in cell.flags
    monkeypatch.setattr(common, "get_device_memory_capacity", lambda device=None: 143771)  # an H200, in MiB
    args = SimpleNamespace(page_size=int(cell.flags[cell.flags.index("--page-size") + 1]), max_running_requests=None,
                           enable_dp_attention=False, tp_size=1, dp_size=1, pp_size=1, device="cuda",
                           mem_fraction_static=0.9, kv_cache_dtype="auto",
                           get_model_config=lambda: SimpleNamespace(context_len=131072, dtype=torch.bfloat16))
    qwen3 = ModelAttention("gqa", 36, 32, 8, 128, 128)
    with pytest.raises(AsyncTLSConfigError) as e:
        server_args_from_cli._check_request_rows(args, AsyncTLSConfig(enabled=True), qwen3)
    assert cell.expect in str(e.value)
    for r in lc.REFUSALS:
        assert r.name in BY_NAME


def test_only_patterns_and_typos():
    picked = lc.select(CELLS, "stock.smollm2.*, asynctls.smollm2.default.*")
    assert [c.name for c in picked] == ["stock.smollm2.default.memdef", "stock.smollm2.default.mem95",
                                        "stock.smollm2.page1.memdef", "stock.smollm2.page1.mem95",
                                        "asynctls.smollm2.default.memdef", "asynctls.smollm2.default.mem95"]
    assert lc.select(CELLS, None) == CELLS
    with pytest.raises(ValueError, match="matches no cell"):
        lc.select(CELLS, "asynctls.smolm2.*")


def test_resume_skips_recorded_cells_and_can_retry_failed_ones():
    recorded = {"stock.qwen3.default.memdef": {"status": "passed"}, "stock.qwen3.default.mem95": {"status": "failed"}}
    todo = [c.name for c in lc.pending(CELLS, recorded)]
    assert "stock.qwen3.default.memdef" not in todo and "stock.qwen3.default.mem95" not in todo
    assert len(todo) == len(CELLS) - 2
    assert "stock.qwen3.default.mem95" in [c.name for c in lc.pending(CELLS, recorded, retry_failed=True)]


def test_refusal_verdict():
    cell, clean = BY_NAME["refuse.smollm2.hostcache-no-mrr"], {"clean": True}
    line = f"sglang-asynctls: error: {cell.expect}: the cache keeps rows\n"
    assert lc.refusal_verdict(cell, "exited", 2, "INFO loading\n" + line, clean) == []
    assert lc.refusal_verdict(cell, "ready", None, "", clean) == ["not refused: ready",
                                                                  f"refusal text missing: {cell.expect!r}"]
    assert lc.refusal_verdict(cell, "exited", 2, "Traceback (most recent call last):\n" + line, clean) == [
        "refused with a traceback, not one line"]
    assert lc.refusal_verdict(cell, "exited", 0, line, clean) == ["exited 0"]
    assert lc.refusal_verdict(cell, "exited", 2, line, {"clean": False})[0].startswith("left something behind")


def test_dense_below_and_the_long_path():
    info = {"internal_states": [{"asynctls": {"config": {"dense_below": 2048}}}]}
    assert lc.dense_below_of(info, "dense_below=8192") == (2048, "server_info")
    assert lc.dense_below_of({"internal_states": [{}]}, "AsyncTLSConfig(enabled=True, dense_below=8192)") == (
        8192, "log")
    assert lc.dense_below_of(None, "") == (None, "absent")
    assert lc.long_path(4096, 2048) == "sparse" and lc.long_path(2047, 2048) == "dense"
    assert lc.long_path(None, 2048) is None


def _served(**over):
    rec = {"outcome": "ready", "short": {"completion_tokens": lc.NEW_TOKENS},
           "long": {"completion_tokens": lc.NEW_TOKENS}, "long_path": "sparse", "stop": {"clean": True}}
    return {**rec, **over}


def test_served_verdict():
    ours, stock = BY_NAME["asynctls.qwen3.default.memdef"], BY_NAME["stock.qwen3.default.memdef"]
    assert lc.served_verdict(ours, _served()) == []
    assert lc.served_verdict(stock, _served(long_path=None)) == []
    assert lc.served_verdict(ours, _served(long_path="dense")) == ["long request not sparse: dense"]
    assert lc.served_verdict(ours, _served(short={"error": "HTTPError 500"})) == ["short request: HTTPError 500"]
    assert lc.served_verdict(ours, _served(outcome="exited")) == ["not ready: exited"]
    assert lc.served_verdict(ours, _served(stop={"clean": False}))[0].startswith("unclean shutdown")


def test_summary_counts_the_whole_matrix_and_the_gap_against_the_right_stock_cell():
    rec = lambda status, free=None: {"status": status, "gpu_free_gib_at_ready": free}  # noqa: E731
    recorded = {"stock.qwen3.default.memdef": rec("passed", 9.73), "stock.qwen3.page1.memdef": rec("passed", 12.0),
                "asynctls.qwen3.default.memdef": rec("passed", 10.63), "asynctls.qwen3.host.memdef": rec("passed", 8.5),
                "asynctls.qwen3.page1.memdef": rec("failed", 10.0), "refuse.qwen3.page1-default-rows": rec("passed")}
    s = lc.summarize(CELLS, recorded)
    assert (s["launch_passed"], s["launch_total"], s["stock_passed"], s["stock_total"]) == (3, 20, 2, 12)
    assert s["free_mem_gaps_gb"] == {"asynctls.qwen3.default.memdef": -0.9, "asynctls.qwen3.host.memdef": 1.23,
                                     "asynctls.qwen3.page1.memdef": 2.0}
    assert s["max_free_mem_gap_gb"] == 2.0 and s["free_mem_gap_goal_met"] is False
    assert s["failed"] == ["asynctls.qwen3.page1.memdef"] and len(s["not_run"]) == len(CELLS) - 6
    assert lc.summarize(CELLS, {})["max_free_mem_gap_gb"] is None


# ------------------------------------------------------------------------------ the cell path, stand-in server
@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 49152}))
    for name in lc.MODELS:
        monkeypatch.setitem(lc.MODELS, name, lc.Model(name, str(model), lc.MODELS[name].long_tokens,
                                                      lc.MODELS[name].flags, lc.MODELS[name].asynctls_flags))
    monkeypatch.setattr(launch_matrix, "launch_cmd",
                        lambda model, port, flags: [sys.executable, str(script), "--port", str(port), *flags])
    monkeypatch.setattr(launch_matrix, "STOP_RESERVE_S", 5)
    return tmp_path


def _cell(name, **over):
    c = BY_NAME[name]
    return lc.Cell(**{**c.__dict__, **over})


def test_a_served_cell_end_to_end_on_the_stand_in(fake):
    import time

    rec = launch_matrix.run_cell(BY_NAME["asynctls.smollm2.default.memdef"], 0, 31491, str(fake), time.time() + 120,
                                 30)
    assert rec["status"] == "passed", rec
    assert rec["long_path"] == "sparse" and rec["dense_below"] == 2048 and rec["dense_below_source"] == "server_info"
    assert rec["long"]["prompt_tokens"] == lc.MODELS["smollm2"].long_tokens and rec["max_total_num_tokens"] == 4096
    assert rec["stop"]["clean"] and rec["stop"]["port_free"] and rec["stop"]["exited_on_sigterm"]
    assert "--enable-asynctls" in rec["command"]
    assert "PASSED" in launch_matrix.one_line(rec, {"gpu_free_gib_at_ready": None})


def test_a_refusal_cell_on_the_stand_in(fake):
    import time

    cell = _cell("refuse.smollm2.hostcache-no-mrr", flags=("--fake-refuse",))
    rec = launch_matrix.run_cell(cell, 0, 31492, str(fake), time.time() + 120, 30)
    assert rec["status"] == "passed" and rec["outcome"] == "exited" and rec["returncode"] == 2
    assert rec["refusal_lines"][0].startswith("sglang-asynctls: error:")


def test_a_dense_long_request_fails_the_cell(fake):
    import time

    cell = _cell("asynctls.smollm2.default.memdef", flags=("--asynctls-dense-below", "8000"))
    rec = launch_matrix.run_cell(cell, 0, 31493, str(fake), time.time() + 120, 30)
    assert rec["status"] == "failed" and rec["failures"] == ["long request not sparse: dense"]


def test_budget_cut_cells_are_not_recorded(fake):
    import time

    cell = _cell("stock.smollm2.default.memdef", flags=("--fake-refuse",))  # it would exit at once, but
    assert launch_matrix.run_cell(cell, 0, 31494, str(fake), time.time() + 5, 30) is None  # no budget is left


def test_run_on_two_stand_in_gpus_then_resume(fake, capsys, monkeypatch):
    def run(out, budget):
        monkeypatch.setattr(sys, "argv", [
            "launch_matrix.py", "run", "--out", out, "--resume", out, "--only",
            "stock.smollm2.default.*,asynctls.smollm2.default.*,refuse.smollm2.*", "--gpus", "0,1", "--log-dir",
            str(fake / "logs"), "--git-rev", "abc", "--budget-s", str(budget), "--min-cell-s", "20"])
        launch_matrix.main()
        return json.load(open(out)), capsys.readouterr().out

    out = str(fake / "m.json")
    data, printed = run(out, 200)
    assert sorted(data["cells"]) == ["asynctls.smollm2.default.mem95", "asynctls.smollm2.default.memdef",
                                     "refuse.smollm2.hostcache-no-mrr", "stock.smollm2.default.mem95",
                                     "stock.smollm2.default.memdef"]
    assert all(c["status"] == "passed" for c in data["cells"].values()), data["cells"]
    assert {c["gpu_index"] for c in data["cells"].values()} == {0, 1}  # both workers ran cells
    assert data["sglang_asynctls_git_rev"] == "abc" and data["summary"]["launch_passed"] == 3
    assert data["summary"]["launch_total"] == 20 and data["summary"]["max_free_mem_gap_gb"] is None  # no nvidia-smi
    assert printed.count("PASSED") == 5 and "5 cells to run" in printed
    data, printed = run(out, 200)  # again: everything is recorded, nothing runs
    assert "0 cells to run" in printed and len(data["runs"]) == 2
    data, printed = run(str(fake / "n.json"), 10)  # a budget below --min-cell-s starts nothing, and says so
    assert data["cells"] == {} and len(data["runs"][0]["not_started"]) == 5


def test_stop_checks_a_clean_shutdown(tmp_path):
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE)
    for extra, clean in (((), True), (("--fake-child",), False), (("--fake-ignore-sigterm",), False)):
        s = server_lifecycle.Server([sys.executable, str(script), "--port", "31495", *extra],
                                    str(tmp_path / "log"), 31495)
        s.start()
        assert s.wait_ready(20) == "ready"
        out = s.stop(grace_s=3)
        assert out["clean"] is clean, (extra, out)
        assert server_lifecycle.group_pids(s.proc.pid) == [] and out["port_free"]  # ended either way
        if extra == ("--fake-child",):
            assert out["exited_on_sigterm"] and out["leftover_pids"]
        if extra == ("--fake-ignore-sigterm",):
            assert not out["exited_on_sigterm"]


def test_results_resume_from_the_written_json(tmp_path):
    path = str(tmp_path / "m.json")
    first = launch_matrix.Results(path, None, {"command": "a"}, {"gpu": "x"})
    first.add({"name": "stock.qwen3.default.memdef", "status": "passed", "gpu_free_gib_at_ready": 9.0})
    again = launch_matrix.Results(path, path, {"command": "b"}, {"gpu": "x"})
    assert [r["command"] for r in again.data["runs"]] == ["a", "b"]
    assert "stock.qwen3.default.memdef" not in [c.name for c in lc.pending(CELLS, again.data["cells"])]
    data = json.load(open(path))
    assert data["summary"]["stock_passed"] == 1 and data["matrix"]["cells"]["asynctls.glm8.host.mem95"]["flags"]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    cells = {"stock.qwen3.default.memdef": {"status": "passed", "gpu_free_gib_at_ready": 9.7},
             "asynctls.qwen3.default.memdef": {"status": "failed", "gpu_free_gib_at_ready": 10.6}}
    data = {"gpu": "test", "cells": cells, "summary": lc.summarize(CELLS, cells)}
    launch_matrix.plot(data, str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------------ GPU host
@pytest.mark.gpu
@pytest.mark.slow
def test_smollm2_default_cells_on_the_gpu(tmp_path):
    """The cheapest real pair: stock and asynctls SmolLM2 at the defaults both pass (needs /root/smollm2)."""
    import subprocess

    model = os.environ.get("SMOLLM2_DIR", lc.MODELS["smollm2"].path)
    if not os.path.exists(os.path.join(model, "config.json")) or not shutil.which("nvidia-smi"):
        pytest.skip(f"no SmolLM2 dir at {model} or no nvidia-smi")
    out = tmp_path / "m.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "launch_matrix.py"), "run", "--out", str(out),
           "--only", "stock.smollm2.default.memdef,asynctls.smollm2.default.memdef", "--budget-s", "580",
           "--log-dir", str(tmp_path), "--model-dir", f"smollm2={model}"]
    subprocess.run(cmd, timeout=600, check=True)
    cells = json.load(open(out))["cells"]
    assert {n: c["status"] for n, c in cells.items()} == {"stock.smollm2.default.memdef": "passed",
                                                          "asynctls.smollm2.default.memdef": "passed"}, cells
