"""Shared test setup. CPU-only machines run Triton kernels in the interpreter; GPU tests are skipped there."""

import os

import torch

if not torch.cuda.is_available():
    # must be set before any @triton.jit function is created (i.e. before kernels are imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
