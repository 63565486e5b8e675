"""benchmarks/issue3_ab_report.py on made-up op_latency files (CPU): variants, switches, stages and the plot."""

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))

import issue3_ab_report as rep  # noqa: E402


def _op_latency(step_us: dict, narrow: bool, pdl: bool = False) -> dict:
    rows = []
    for i, (model, us) in enumerate(step_us.items()):
        shape = dict(model=model, context=98304, batch=8, token_budget=1024)
        rows.append(dict(shape, method="asynctls", median_us=us))
        stages = {s: dict(median_us=10.0 + i + j) for j, s in enumerate(rep.STAGES)}
        stages["2_select_blocks"] = dict(median_us=7.7 if narrow else 8.4)
        rows.append(dict(shape, method="asynctls_stages", stages=stages))
        rows.append(dict(shape, context=32768, method="asynctls", median_us=1.0))  # another shape: not read
    options = {"select_blocks.NARROW_BITS": 8} if narrow else {}
    return dict(command="python3 benchmarks/op_latency.py --name x", date="2026-11-24T08:00:00+00:00",
                gpu="H100", torch="2.11", triton="3.6", sglang="0.5.17",
                config=dict(kernel_options=options, wide_group_combine="logits", programmatic_dependent_launch=pdl,
                            skipped=[]),
                rows=rows, summary={"dense_over_asynctls_mla_96k_b8": 9.5})


def test_report_consolidates_the_variants(tmp_path):
    files = []
    for name, mla, gqa, narrow, pdl in (("default", 80.0, 86.0, False, False), ("narrow", 79.5, 85.0, True, False),
                                        ("all_pdl", 90.0, 91.0, True, True)):
        path = tmp_path / f"issue3_ab_{name}.json"
        path.write_text(json.dumps(_op_latency({"mla": mla, "gqa": gqa}, narrow, pdl)))
        files.append(str(path))
    out = tmp_path / "r" / "issue3_ab_h100.json"
    rep.main(files + ["--build", "abc1234", "--out", str(out), "--gpu-tests-command", "pytest -m gpu",
                      "--gpu-tests-result", "12 passed"])
    r = json.loads(out.read_text())
    assert "--build abc1234" in r["command"] and "'12 passed'" in r["command"]
    assert (r["build"], r["gpu"], r["date"]) == ("abc1234", "H100", "2026-11-24T08:00:00+00:00")
    assert r["gpu_tests"] == dict(command="pytest -m gpu", result="12 passed")
    v = {x["variant"]: x for x in r["variants"]}
    assert list(v) == ["default", "narrow", "all_pdl"]
    assert v["narrow"]["mla"]["asynctls_us"] == 79.5 and v["narrow"]["gqa"]["minus_default_us"] == -1.0
    assert v["all_pdl"]["command"].startswith("SGLANG_ASYNCTLS_PDL=1 ")
    assert v["default"]["command"].startswith("SGLANG_ASYNCTLS_PDL=0 ")
    assert set(v["default"]["gqa"]["stages_us"]) == set(rep.STAGES)
    assert r["select_blocks_us_range"] == dict(narrow_on=[7.7, 7.7], narrow_off=[8.4, 8.4])
    assert out.with_suffix(".png").stat().st_size > 0


def test_variants_from_different_setups_are_refused(tmp_path):
    a, b = _op_latency({"mla": 1.0, "gqa": 1.0}, False), _op_latency({"mla": 1.0, "gqa": 1.0}, True)
    b["gpu"] = "H200"
    paths = []
    for name, data in (("default", a), ("narrow", b)):
        paths.append(tmp_path / f"issue3_ab_{name}.json")
        paths[-1].write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="different setups"):
        rep.consolidate(paths, "x", "cmd", None)
