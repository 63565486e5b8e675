"""device_view: pageable memory is refused with a clear error; pinned memory gives an aliasing CUDA tensor."""

import pytest
import torch

from sglang_asynctls.offload.host_view import device_view


def test_pageable_memory_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="not pinned"):
        device_view(torch.zeros(4, 2, 8, dtype=torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_pinned_memory_is_aliased_not_copied(dtype):
    host = torch.randn(16, 2, 8).to(dtype).pin_memory()
    layer = host[4:12]  # a strided slice, as a host pool hands out one layer
    view = device_view(layer)
    assert view.is_cuda and view.dtype == dtype and view.shape == layer.shape and view.stride() == layer.stride()
    assert torch.equal(view.cpu(), layer)
    before = layer.clone()
    view.mul_(2)
    torch.cuda.synchronize()
    assert torch.equal(layer, before * 2)  # the host sees the device write: same memory
    assert torch.equal(device_view(view), view)
