"""CUDA views of pinned host memory, so that kernels (the block gather) read the host KV store in place over PCIe.

Pinned memory (torch's pin_memory=True, or cudaHostRegister as SGLang's host pools in srt/mem_cache/pool_host/ do)
is mapped into the GPU's unified address space; on UVA systems (every 64-bit Linux CUDA platform) the device
address equals the host address, which is what SGLang's HiSparse swap-in kernel relies on when it is handed the
host pool's data_ptr(). Pageable memory is not mapped: a kernel reading it faults, so it is refused here.
"""

from __future__ import annotations

import torch

# __cuda_array_interface__ has no bfloat16 typestr: describe the bytes as a same-width integer, then view back
_TYPESTR = {1: "|u1", 2: "<i2", 4: "<i4", 8: "<i8"}


class _CudaArray:
    """The minimal __cuda_array_interface__ (v3) of `ptr`; holds `owner` so that the memory outlives the views."""

    def __init__(self, ptr: int, shape, strides, item_size: int, owner):
        self.owner = owner
        self.__cuda_array_interface__ = {
            "shape": tuple(shape), "typestr": _TYPESTR[item_size], "data": (ptr, False),
            "strides": None if strides is None else tuple(s * item_size for s in strides), "version": 3}


def cuda_view(ptr: int, shape, dtype: torch.dtype, device, strides=None, owner=None) -> torch.Tensor:
    """A CUDA tensor over device-accessible memory at `ptr` (strides in elements; None = contiguous), no copy."""
    size = torch.empty(0, dtype=dtype).element_size()
    return torch.as_tensor(_CudaArray(ptr, shape, strides, size, owner), device=device).view(dtype)


def device_view(host: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """A CUDA tensor aliasing the pinned host tensor `host` (same shape, strides and dtype; no copy).

    Raises ValueError when `host` is not pinned, RuntimeError without CUDA. A CUDA tensor is returned as it is.
    """
    if host.is_cuda:
        return host
    if not host.is_pinned():
        raise ValueError(
            f"device_view: host tensor {tuple(host.shape)} {host.dtype} is not pinned; a GPU kernel cannot read "
            "pageable memory. Allocate it with pin_memory=True or register it with cudaHostRegister (SGLang's host "
            "KV pools do so when pin_memory=True).")
    if not torch.cuda.is_available():
        raise RuntimeError("device_view: CUDA is not available")
    return cuda_view(host.data_ptr(), host.shape, host.dtype, device or "cuda", host.stride(), owner=host)
