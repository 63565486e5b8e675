"""benchmarks/offload_engine.py on the CPU at its dry-run shape: the rows it reports are consistent (its GPU run
cannot be checked here, its bookkeeping can)."""

import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("offload_engine_bench",
                                                  os.path.join(HERE, "..", "benchmarks", "offload_engine.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_rows_are_consistent(bench, tmp_path):
    sh = bench.DRY
    timing = bench.Timing(False, 1, 0)
    gather = bench.bench_gather(sh, timing, "cpu")
    assert {r["kind"] for r in gather} == {"gather_triton", "copy_per_block", "bulk_copy"}
    assert all(r["bytes"] == r["head_blocks"] * sh.bs * sh.d * 2 * 4 for r in gather)
    update = bench.bench_update(sh, timing, "cpu")
    assert sum(r["kind"] == "update" for r in update) == 2 * len(sh.ratios) * len(sh.update_batches)
    assert sum(r["kind"] == "layer_update" for r in update) == len(sh.ratios) * len(sh.update_batches)
    steps = bench.bench_layer_step(sh, timing, "cpu")
    assert len(steps) == len(sh.batches) * len(sh.ratios)
    assert all(r["eager_us_per_layer"] > 0 and r["graph_us_per_layer"] is None for r in steps)  # no graph on CPU
    decode, sources = bench.bench_decode(sh, timing, "cpu", "")
    by_r = {r["r"]: r for r in decode}
    # a larger resident set copies less; the overlap is a property of the trace, the same for both
    assert by_r[2]["mb_copied_per_step"] < by_r[1]["mb_copied_per_step"]
    assert by_r[1]["overlap_ratio"] == by_r[2]["overlap_ratio"] and 0.5 < by_r[1]["overlap_ratio"] < 1
    assert all(r["stall_share"] == 0 for r in decode)  # the CPU lane copies inline: nothing waits
    assert "synthetic" in sources[0]
    # the CPU runs every op as it is issued: issuing is the whole step
    assert all(0 < r["host_us_per_step"] <= r["step_us"] for r in decode)
    bench.profile_decode(sh, "cpu", str(tmp_path / "p.txt"))
    assert "aten::index" in (tmp_path / "p.txt").read_text()  # the candidates gather pages by index
    assert all(r["step_us_graph"] is None for r in decode)
    rows = gather + update + steps + decode
    summary = bench.summarize(rows)
    assert set(summary["layer_step"]) == set(summary["decode"])
    assert set(summary["decode"]) == {f"b{b}_r{r}" for b in sh.batches for r in sh.ratios}
    bench.plot(rows, str(tmp_path / "x.png"))
    assert (tmp_path / "x.png").stat().st_size > 0


def test_a_recorded_trace_sets_the_decode_shape_and_serves_every_batch_row(bench, tmp_path):
    """offload_locality.py --trace writes one request's selections [T, L, 1, Hkv, Kb]: the replay takes its
    layers, KV heads (group size kept), k_b and the context its block ids need, and copies it to each batch row."""
    import torch

    t = torch.full((6, 3, 1, 2, 5), -1, dtype=torch.int32)
    t[..., :4] = torch.arange(4, dtype=torch.int32) + torch.arange(6, dtype=torch.int32).view(6, 1, 1, 1, 1)
    t[:, 2, :, :, 2:] = -1  # layer 2 keeps 2 blocks: its resident set is r x 2, not r x the widest layer's 5
    path = tmp_path / "t.pt"
    torch.save(t, path)
    sh = bench.fit_shape_to_trace(bench.DRY, str(path))
    assert (sh.layers, sh.hkv, sh.kb, sh.hq // sh.hkv, sh.steps) == (3, 2, 5, bench.DRY.hq // bench.DRY.hkv, 3)
    assert sh.context == sh.bs * 9  # block ids reach 8 (step 5 + 3)
    assert sh.layer_kb == (4, 4, 2)
    trace, source = bench._trace(sh, 2, "cpu", str(path))
    assert source == str(path) and len(trace) == 3 and trace[0][0].shape == (2, 2, 5)
    assert torch.equal(trace[1][4][0], trace[1][4][1]) and trace[1][4].tolist()[0][0] == [4, 5, 6, 7, -1]
    world, _ = bench._decode_world(sh, 2, 1, bench.host_store(2 * (sh.context // sh.bs), sh, False)[1], "cpu")
    assert world.resident.slot_limits == [4, 4, 2]
    decode, _ = bench.bench_decode(sh, bench.Timing(False, 1, 0), "cpu", str(path))
    assert {r["layers"] for r in decode} == {3} and all(0 < r["overlap_ratio"] < 1 for r in decode)
