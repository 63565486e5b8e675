"""benchmarks/op_latency.py --kernel-option: the A/B switches of kernel paths (CPU)."""

import importlib
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))

import op_latency  # noqa: E402


def test_every_listed_switch_exists_and_is_set(monkeypatch):
    for name in op_latency.KERNEL_OPTIONS:  # restored after the test
        module, attr = name.split(".")
        mod = importlib.import_module(f"sglang_asynctls.kernels.{module}")
        monkeypatch.setattr(mod, attr, getattr(mod, attr))
    applied = op_latency.apply_kernel_options(["block_scores.WIDE_PERSISTENT=True", "select_blocks.NARROW_BITS=0",
                                               "select_tokens.PREFETCH_SLOTS=True",
                                               "fine_select.WIDE_GROUP_COMBINE='recompute'"])
    assert importlib.import_module("sglang_asynctls.kernels.select_blocks").NARROW_BITS == 0  # on by default
    assert importlib.import_module("sglang_asynctls.kernels.block_scores").WIDE_PERSISTENT is True
    assert applied["fine_select.WIDE_GROUP_COMBINE"] == "recompute"
    assert op_latency.kernel_switches() == applied


def test_recorded_switches_show_the_defaults():
    """A run without --kernel-option records the defaults: only the narrow block search on."""
    assert op_latency.kernel_switches() == {"block_scores.WIDE_PERSISTENT": False, "select_blocks.NARROW_BITS": 8,
                                            "select_tokens.PREFETCH_SLOTS": False,
                                            "fine_select.WIDE_GROUP_COMBINE": "logits"}


@pytest.mark.parametrize("spec", ["select_blocks.NARROWBITS=8", "block_scores.WIDE_PERSISTENT", "os.sep=1"])
def test_unknown_or_valueless_switches_are_refused(spec):
    with pytest.raises(SystemExit, match="--kernel-option"):
        op_latency.apply_kernel_options([spec])
