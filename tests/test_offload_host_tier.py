"""KV host tier (--asynctls-host-kv-gib): host slots, buffer building and launch checks on the CPU (a fake address
range stands in for the VMM mapping); the real mapping in a GPU test. Its sizing is in test_kv_sizing.py."""

from types import SimpleNamespace

import pytest
import torch

from sglang_asynctls.config import AsyncTLSConfig, AsyncTLSConfigError
from sglang_asynctls.offload import host_tier
from sglang_asynctls.patches import kv_host_tier
from sglang_asynctls.runtime_config import ENV_VAR

QWEN3_8B_CELL = 36 * 8 * (128 + 128) * 2  # bytes of KV per token, all layers


class FakeRange:
    """A SplitRange stand-in on the CPU: remembers its split, hands out a tensor."""
    made, closed = [], []

    def __init__(self, device_bytes, host_bytes, dev):
        if host_bytes < 0 or device_bytes < 0:
            raise AssertionError("negative part")
        self.device_bytes, self.host_bytes, self.dev = device_bytes, host_bytes, dev
        FakeRange.made.append(self)

    def view(self, shape, dtype):
        assert torch.empty(shape, dtype=dtype).nbytes == self.device_bytes + self.host_bytes
        return torch.full(shape, 7, dtype=dtype)  # undefined contents: the builder must zero them

    def close(self):
        FakeRange.closed.append(self)


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    FakeRange.made, FakeRange.closed = [], []
    monkeypatch.delenv(ENV_VAR, raising=False)
    host_tier.set_plan(None)
    yield
    host_tier.set_plan(None)


def test_host_tokens_for_qwen3_8b():
    tokens = host_tier.plan_host_tokens(100 * 2**30, QWEN3_8B_CELL, 64)
    assert tokens % 64 == 0 and tokens * QWEN3_8B_CELL <= 100 * 2**30 < (tokens + 64) * QWEN3_8B_CELL
    with pytest.raises(ValueError, match="--asynctls-host-kv-gib"):
        host_tier.plan_host_tokens(2**30, 0, 64)


def test_host_memory_check_refuses_what_cannot_be_pinned(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       131072000 kB\nMemAvailable:   52428800 kB\n")  # 50 GiB available
    host_tier.check_host_memory(40, 1, str(meminfo))
    with pytest.raises(AsyncTLSConfigError, match="--asynctls-host-kv-gib 30 x 2 GPU.*50.0 GiB available"):
        host_tier.check_host_memory(30, 2, str(meminfo))
    with pytest.raises(AsyncTLSConfigError, match="lower"):
        host_tier.check_host_memory(48, 1, str(meminfo))  # the server's own margin


def test_split_buffers_puts_the_first_rows_on_the_device_and_zeroes():
    shapes = [(1000, 8, 128)] * 3
    tensors, ranges = host_tier.split_buffers(shapes, torch.bfloat16, 640, 0, make_range=FakeRange)
    assert [t.shape for t in tensors] == [torch.Size(s) for s in shapes]
    assert all(t.dtype == torch.bfloat16 and not t.any() for t in tensors)
    row = 8 * 128 * 2
    assert [(r.device_bytes, r.host_bytes) for r in ranges] == [(640 * row, 360 * row)] * 3
    # a pool smaller than the device share stays whole on the device
    _, ranges = host_tier.split_buffers([(100, 8, 128)], torch.float16, 640, 0, make_range=FakeRange)
    assert (ranges[0].device_bytes, ranges[0].host_bytes) == (100 * row, 0)


def test_split_buffers_releases_what_it_mapped_when_a_mapping_fails():
    calls = []

    def flaky(device_bytes, host_bytes, dev):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("cuMemCreate of 9.00 GiB of host memory failed: 2 CUDA_ERROR_OUT_OF_MEMORY")
        return FakeRange(device_bytes, host_bytes, dev)

    with pytest.raises(RuntimeError, match="OUT_OF_MEMORY"):
        host_tier.split_buffers([(10, 1, 4)] * 4, torch.float32, 5, 0, make_range=flaky)
    assert FakeRange.closed == FakeRange.made and len(FakeRange.made) == 2


def test_launch_refuses_the_host_row_cache_without_max_running_requests():
    from sglang_asynctls.patches import server_args_from_cli as hook

    cfg = AsyncTLSConfig(enabled=True, host_kv_gib=8.0, host_cache_tokens=1024)
    args = SimpleNamespace(enable_hierarchical_cache=False, enable_memory_saver=False, speculative_algorithm=None,
                           tp_size=1, pp_size=1, nnodes=1, max_running_requests=None)
    with pytest.raises(AsyncTLSConfigError, match="--asynctls-host-cache-tokens needs --max-running-requests"):
        hook._check_host_tier(args, cfg)


def _pool(size, **overrides):
    fields = dict(size=size, page_size=64, layer_num=2, use_hnd=False, kv_cache_layout="nhd",
                  enable_custom_mem_pool=False, device="cpu", store_dtype=torch.bfloat16,
                  _kv_buffer_shapes=lambda: ((size + 64, 8, 128), (size + 64, 8, 128)))
    return SimpleNamespace(**{**fields, **overrides})


def test_buffer_hook_builds_split_buffers_from_the_plan(monkeypatch):
    from sglang_asynctls.offload import vmm

    monkeypatch.setattr(vmm, "SplitRange", FakeRange)
    pool = _pool(1024)
    untouched = kv_host_tier.create_buffers_with_host_tier(lambda p: "stock", pool)
    assert untouched == "stock" and not hasattr(pool, "k_buffer")  # no plan: SGLang's own buffers
    host_tier.set_plan(host_tier.HostTierPlan(device_tokens=256, host_tokens=768))
    kv_host_tier.create_buffers_with_host_tier(lambda p: pytest.fail("stock buffers built"), pool)
    assert len(pool.k_buffer) == len(pool.v_buffer) == 2 and pool.k_buffer[0].shape == (1088, 8, 128)
    row = 8 * 128 * 2
    assert {(r.device_bytes, r.host_bytes) for r in pool._asynctls_host_ranges} == {(320 * row, 768 * row)}
    with pytest.raises(ValueError, match="planned for 1024"):
        kv_host_tier.create_buffers_with_host_tier(lambda p: None, _pool(2048))
    with pytest.raises(ValueError, match="HND or vectorized"):
        kv_host_tier.create_buffers_with_host_tier(lambda p: None, _pool(1024, use_hnd=True))


def test_mla_buffer_hook_splits_the_latent_buffers(monkeypatch):
    from sglang_asynctls.offload import vmm

    monkeypatch.setattr(vmm, "SplitRange", FakeRange)
    pool = SimpleNamespace(size=1024, page_size=64, layer_num=3, kv_cache_dim=576, custom_mem_pool=None,
                           device="cpu", store_dtype=torch.bfloat16)
    assert kv_host_tier.create_mla_buffers_with_host_tier(lambda p: "stock", pool) == "stock"
    host_tier.set_plan(host_tier.HostTierPlan(device_tokens=448, host_tokens=576))
    kv_host_tier.create_mla_buffers_with_host_tier(lambda p: pytest.fail("stock buffers built"), pool)
    assert len(pool.kv_buffer) == 3 and pool.kv_buffer[0].shape == (1088, 1, 576) and not pool.kv_buffer[0].any()
    row = 576 * 2
    assert {(r.device_bytes, r.host_bytes) for r in pool._asynctls_host_ranges} == {(512 * row, 576 * row)}


def test_launch_refuses_host_tier_with_hierarchical_cache_or_too_little_memory(monkeypatch):
    from sglang_asynctls.patches import server_args_from_cli as hook

    cfg = AsyncTLSConfig(enabled=True, host_kv_gib=8.0)
    args = SimpleNamespace(enable_hierarchical_cache=True, enable_memory_saver=False, speculative_algorithm=None,
                           tp_size=1, pp_size=1, nnodes=1)
    with pytest.raises(AsyncTLSConfigError, match="--asynctls-host-kv-gib cannot be combined with "
                                                  "--enable-hierarchical-cache"):
        hook._check_host_tier(args, cfg)
    args.enable_hierarchical_cache = False
    monkeypatch.setattr(host_tier, "check_host_memory", lambda gib, ranks: (_ for _ in ()).throw(
        AsyncTLSConfigError(f"{gib} x {ranks}")))
    args.tp_size = 2
    with pytest.raises(AsyncTLSConfigError, match="8.0 x 2"):
        hook._check_host_tier(args, cfg)
    args.dp_size, args.enable_dp_attention = 2, False  # two replicas of tp 2: four processes map a tier
    with pytest.raises(AsyncTLSConfigError, match="8.0 x 4"):
        hook._check_host_tier(args, cfg)
    args.enable_dp_attention = True  # DP attention spreads over the same 2 GPUs
    with pytest.raises(AsyncTLSConfigError, match="8.0 x 2"):
        hook._check_host_tier(args, cfg)
    args.disaggregation_mode = "prefill"
    with pytest.raises(AsyncTLSConfigError, match="--disaggregation-mode"):
        hook._check_host_tier(args, cfg)
    with pytest.raises(AsyncTLSConfigError, match="--asynctls-host-kv-gib must be a number"):
        AsyncTLSConfig(enabled=True, host_kv_gib=-1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_split_buffers_on_the_gpu_read_and_write_across_the_boundary():
    tensors, ranges = host_tier.split_buffers([(4096, 8, 128)] * 2, torch.bfloat16, 1000, 0)
    try:
        k = tensors[0]
        assert k.is_cuda and not k.any()
        src = torch.randn(200, 8, 128, device="cuda", dtype=torch.bfloat16)
        rows = torch.arange(900, 1100, device="cuda")  # straddles the device/host boundary
        k[rows] = src
        assert torch.equal(k[rows], src)
        assert torch.equal((k[rows].float() * 2).bfloat16(), (src.float() * 2).bfloat16())
    finally:
        for r in ranges:
            r.close()
