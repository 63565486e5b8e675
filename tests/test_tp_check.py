"""benchmarks/tp_check.py on CPU: the padded SmolLM2 computes the same function as the original, the summary
reads the raw records as the issue asks, and --dry-run prints the runs without starting anything."""

import importlib.util
import json
import os

import pytest
import torch

from sglang_asynctls.model_spec import ModelAttention, kv_heads_of_rank, load_channel_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tp_check():
    spec = importlib.util.spec_from_file_location("tp_check", os.path.join(ROOT, "benchmarks", "tp_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_smollm2():
    """SmolLM2's attention shape (9 query heads, 3 KV heads) at toy width, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=8, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval(), cfg


@pytest.mark.parametrize("tp", [2, 4])
def test_padded_model_computes_the_same_logits(tp_check, tp):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, cfg = tiny_smollm2()
    state, cfg2 = tp_check.pad_heads(model.state_dict(), cfg.to_dict(), tp)
    assert (cfg2["num_attention_heads"], cfg2["num_key_value_heads"], cfg2["head_dim"]) == (
        {2: 12, 4: 12}[tp], 4, 8)
    padded = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg2.items() if k != "transformers_version"}))
    padded.load_state_dict(state)
    ids = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(padded.eval()(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    group = cfg2["num_attention_heads"] // cfg2["num_key_value_heads"]
    for rank in range(tp):  # each rank's query heads read only KV heads that rank holds
        q_heads = range(rank * 12 // tp, (rank + 1) * 12 // tp)
        held = kv_heads_of_rank(4, tp, rank)
        assert all(held.start <= h // group < held.stop for h in q_heads)


def test_padded_channel_table_loads_for_the_padded_model(tp_check, tmp_path):
    table = tp_check.pad_channels(json.load(open(tp_check.CHANNELS)), 4)
    assert [len(layer) for layer in table["channels"]] == [4] * 30
    assert all(layer[3] == layer[2] for layer in table["channels"])  # the copied head keeps its channels
    path = tmp_path / "ch.json"
    path.write_text(json.dumps(table))
    ch = load_channel_config(str(path), ModelAttention("gqa", 30, 12, 4, 64, 64), 16)
    assert ch.shape == (30, 4, 16)


def test_write_padded_model_writes_a_servable_dir_once(tp_check, tmp_path):
    from safetensors.torch import save_file

    model, cfg = tiny_smollm2()
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    save_file({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(src / "model.safetensors"))
    (src / "config.json").write_text(cfg.to_json_string())
    (src / "tokenizer.json").write_text("{}")
    record = tp_check.write_padded_model(str(src), str(dst), 2)
    assert record["heads"] == [9, 12] and record["kv_heads"] == [3, 4]
    assert sorted(os.listdir(dst)) == ["asynctls_channels.json", tp_check.PAD_RECORD, "config.json",
                                       "model.safetensors", "tokenizer.json"]
    stamp = os.path.getmtime(dst / "model.safetensors")
    assert tp_check.write_padded_model(str(src), str(dst), 2) == record  # a second call reuses it
    assert os.path.getmtime(dst / "model.safetensors") == stamp


def record(short=("a", "b"), long=("key 111", "key 222"), turn2="x", keys=("111", "222")):
    return {"short": list(short), "long": list(long), "turn2": turn2, "keys": list(keys)}


def test_compare_outputs_counts_prompt_by_prompt(tp_check):
    same = tp_check.compare_outputs(record(), record())
    assert same["identical"] and same["short_identical"] == 2 and same["passkey_found"] == [True, True]
    diff = tp_check.compare_outputs(record(), record(short=("a", "c"), long=("key 111", "no")))
    assert not diff["identical"] and diff["short_identical"] == 1 and diff["long_equal"] == [True, False]
    assert diff["passkey_found"] == [True, False]
    assert not tp_check.compare_outputs(record(), record(turn2="y"))["identical"]
    assert not tp_check.compare_outputs(record(), record(short=("a",)))["identical"]  # a missing answer


def test_summary_has_the_issue_keys(tp_check):
    parity = {"asynctls_tp1": record(), "asynctls_tp2": record(), "stock_tp1": record(),
              "stock_tp2": {"label": "stock_tp2", "error": "RuntimeError: server exited 1"}}
    speed = {"asynctls_tp1_b4_n98304": {"median_decode_tok_s": 100.0},
             "asynctls_tp2_b4_n98304": {"median_decode_tok_s": 150.0}}
    s = tp_check.summarize_runs(parity, speed, [1, 2], ["4x98304"], reference=record(short=("a", "z")))
    assert s["tp2_outputs_match_tp1"] is True and s["stock_tp2_outputs_match_tp1"] is None
    assert (s["tp1_decode_tok_s_96k_b4"], s["tp2_decode_tok_s_96k_b4"], s["tp2_decode_speedup_96k_b4"]) == (
        100.0, 150.0, 1.5)
    assert s["tp2_passkey_found"] == [True, True] and s["failed_runs"] == ["stock_tp2"]
    assert s["padded_tp1_stock_vs_unpadded_reference"]["short_identical"] == 1
    parity["asynctls_tp2"] = record(long=("key 111", "key 223"))
    assert tp_check.summarize_runs(parity, speed, [1, 2], ["4x98304"])["tp2_outputs_match_tp1"] is False


def test_tp1_only_summary_keeps_the_tp2_keys_empty(tp_check):
    s = tp_check.summarize_runs({"asynctls_tp1": record(), "stock_tp1": record()},
                                {"asynctls_tp1_b2_n98304": {"median_decode_tok_s": 80.0}}, [1], ["2x98304"])
    assert s["tp2_outputs_match_tp1"] is None and s["tp2_decode_tok_s_96k_b2"] is None
    assert s["tp1_decode_tok_s_96k_b2"] == 80.0 and s["tp1_passkey_found"] == [True, True]


def test_dry_run_prints_every_run_and_starts_nothing(tp_check, tmp_path, capsys):
    work = tmp_path / "work"
    tp_check.main(["all", "--dry-run", "--tp", "1", "2", "--work", str(work), "--padded", "/p"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    servers = [ln for ln in lines if "sglang.launch_server" in ln]
    benches = [ln for ln in lines if "e2e_throughput.py one-batch" in ln]
    assert len(servers) == 4 and len(benches) == 2 and len(lines) == 6
    assert sum("--tp-size 2" in ln for ln in servers) == 2 and sum("--tp-size 2" in ln for ln in benches) == 1
    asynctls = [ln for ln in servers if "--enable-asynctls" in ln]
    assert len(asynctls) == 2 and all("--asynctls-channel-config /p/asynctls_channels.json" in ln for ln in asynctls)
    assert all("--batch-size 4 --input-len 98304" in ln for ln in benches)
    assert not work.exists()
    tp_check.main(["parity", "--dry-run", "--tp", "1", "--work", str(work)])
    assert "--tp-size 2" not in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["speed", "--tp", "2"], ["speed", "--bench-args", "--enable-nccl-nvls"]])
def test_bad_invocations_are_refused(tp_check, argv):
    with pytest.raises(SystemExit):
        tp_check.parse_args(argv + ["--dry-run"])


def test_summarize_writes_the_result_file_and_plot(tp_check, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for label in ("asynctls_tp1", "asynctls_tp2", "stock_tp1", "stock_tp2"):
        (work / f"parity_{label}.json").write_text(json.dumps(record()))
    for tp, tok_s in ((1, 90.0), (2, 120.0)):
        (work / f"speed_asynctls_tp{tp}_b4_n98304.json").write_text(json.dumps(
            {"method": "asynctls", "tp": tp, "median_decode_tok_s": tok_s}))
    out = tmp_path / "out" / "tp_h200x2.json"
    tp_check.main(["summarize", "--work", str(work), "--padded", str(tmp_path / "none"), "--json", str(out)])
    result = json.load(open(out))
    assert result["summary"]["tp2_outputs_match_tp1"] is True and result["summary"]["tp2_decode_tok_s_96k_b4"] == 120
    assert {"command", "date", "gpu", "gpu_count", "sglang", "torch", "parity", "speed", "config"} <= set(result)
    assert (tmp_path / "out" / "tp_h200x2.png").stat().st_size > 0


def test_runs_keep_one_record_each_and_skip_what_exists(tp_check, tmp_path, monkeypatch, capsys):
    """The bookkeeping of a GPU session split over device calls, with the servers and bench runs stubbed."""
    import subprocess

    work = tmp_path / "work"
    calls = []
    monkeypatch.setattr(tp_check, "_reap_strays", lambda: None)
    monkeypatch.setattr(tp_check, "write_padded_model", lambda src, dst, tp: {"tp": tp})

    def fake_parity(run):
        calls.append(run.label)
        if run.label == "stock_tp2":
            raise RuntimeError("server exited 1")
        json.dump(record(), open(run.out, "w"))

    def fake_point(method, b, n, model, raw, timeout, extra, common=()):
        calls.append((method, common[1]))
        assert not os.path.exists(raw)  # a stale raw line from an earlier run is gone
        if common[1] == "2":
            raise subprocess.TimeoutExpired("one_batch", timeout, output=b"stuck")
        return {"method": method, "median_decode_tok_s": 10.0}

    monkeypatch.setattr(tp_check.parity, "run", fake_parity)
    monkeypatch.setattr(tp_check.e2e, "run_point", fake_point)
    work.mkdir()
    (work / "speed_asynctls_tp1_b4_n98304.raw.jsonl").write_text('{"median_decode_throughput": 1}\n')
    tp_check.main(["all", "--tp", "1", "2", "--work", str(work), "--json", str(tmp_path / "r.json")])
    assert calls == ["stock_tp1", "asynctls_tp1", "stock_tp2", "asynctls_tp2", ("asynctls", "1"), ("asynctls", "2")]
    assert json.load(open(work / "parity_stock_tp2.json.error"))["error"] == "RuntimeError: server exited 1"
    assert json.load(open(work / "speed_asynctls_tp2_b4_n98304.json.error"))["tail"] == "stuck"
    summary = json.load(open(tmp_path / "r.json"))["summary"]
    assert summary["failed_runs"] == ["stock_tp2", "asynctls_tp2_b4_n98304"]
    assert summary["tp2_outputs_match_tp1"] is True and summary["stock_tp2_outputs_match_tp1"] is None
    calls.clear()
    tp_check.main(["all", "--tp", "1", "2", "--work", str(work), "--json", str(tmp_path / "r.json")])
    assert calls == ["stock_tp2", ("asynctls", "2")]  # only the runs without a result go again
