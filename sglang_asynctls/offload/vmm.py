"""One CUDA virtual address range whose first part is device memory and whose second part is pinned host memory.

The KV host tier (`--asynctls-host-kv-gib`, patches/kv_host_tier.py) backs each of SGLang's per-layer K and V buffers
with such a range: slots below the boundary live in HBM, the rest in host RAM, and every kernel (SGLang's, ours,
torch's) indexes them as one tensor, reading host slots over PCIe. Built with the driver's VMM calls
(cuMemAddressReserve, then cuMemCreate on a DEVICE and a HOST location, mapped back to back, cuMemSetAccess for
the GPU); host-located cuMemCreate needs CUDA 12.2+. Measured on the H100 (benchmarks/results/vmm_probe_h100.json):
torch and Triton read and write across the boundary, 54 GB/s device<->host part.
ctypes on libcuda only (SGLang's own KvVmmArena, srt/mem_cache/kv_vmm_backing.py, maps device memory only): nothing
here runs without a GPU, and importing this module needs no CUDA.
"""

from __future__ import annotations

import ctypes
import math

import torch

from sglang_asynctls.offload.host_view import cuda_view

_LOC_DEVICE, _LOC_HOST = 1, 2
_ALLOC_PINNED = 1
_PROT_RW = 3


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


_cu = None


def _driver():
    global _cu
    if _cu is None:
        _cu = ctypes.CDLL("libcuda.so.1")
    return _cu


def _check(rc: int, what: str) -> None:
    if rc != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(rc, ctypes.byref(name))
        raise RuntimeError(f"{what} failed: {rc} {name.value}")


def _prop(loc_type: int, loc_id: int) -> _AllocProp:
    p = _AllocProp()
    p.type, p.location.type, p.location.id = _ALLOC_PINNED, loc_type, loc_id
    return p


def _granularity(prop: _AllocProp) -> int:
    g = ctypes.c_size_t()
    _check(_driver().cuMemGetAllocationGranularity(ctypes.byref(g), ctypes.byref(prop), 0),
           "cuMemGetAllocationGranularity")
    return g.value


class SplitRange:
    """[device_bytes | host_bytes] at consecutive virtual addresses, readable and writable by CUDA device `dev`.

    Both parts are rounded up to the allocation granularity (2 MiB on the H100). Raises RuntimeError naming the
    driver call that failed (e.g. out of host memory), after releasing whatever it had mapped.
    """

    def __init__(self, device_bytes: int, host_bytes: int, dev: int = 0):
        torch.empty(1, device=f"cuda:{dev}")  # the device's primary context is current from here
        self.dev, self.handles, self.ptr = dev, [], ctypes.c_uint64()
        props = [(_prop(_LOC_DEVICE, dev), device_bytes), (_prop(_LOC_HOST, 0), host_bytes)]
        gran = max(_granularity(p) for p, _ in props)
        sizes = [-(-n // gran) * gran for _, n in props]
        self.size, self.device_bytes = sum(sizes), sizes[0]
        cu = _driver()
        _check(cu.cuMemAddressReserve(ctypes.byref(self.ptr), ctypes.c_size_t(self.size), ctypes.c_size_t(gran),
                                      ctypes.c_uint64(0), ctypes.c_uint64(0)), "cuMemAddressReserve")
        try:
            offset = 0
            for (prop, _), n in zip(props, sizes):
                if n:
                    self._map(prop, offset, n)
                offset += n
            desc = _AccessDesc()
            desc.location.type, desc.location.id, desc.flags = _LOC_DEVICE, dev, _PROT_RW
            _check(cu.cuMemSetAccess(ctypes.c_uint64(self.ptr.value), ctypes.c_size_t(self.size), ctypes.byref(desc),
                                     ctypes.c_size_t(1)), "cuMemSetAccess")
        except RuntimeError:
            self.close()
            raise

    def _map(self, prop: _AllocProp, offset: int, n: int) -> None:
        cu, h = _driver(), ctypes.c_uint64()
        where = "host" if prop.location.type == _LOC_HOST else "device"
        _check(cu.cuMemCreate(ctypes.byref(h), ctypes.c_size_t(n), ctypes.byref(prop), ctypes.c_uint64(0)),
               f"cuMemCreate of {n / 2**30:.2f} GiB of {where} memory")
        self.handles.append((h, offset, n, False))
        _check(cu.cuMemMap(ctypes.c_uint64(self.ptr.value + offset), ctypes.c_size_t(n), ctypes.c_size_t(0), h,
                           ctypes.c_uint64(0)), "cuMemMap")
        self.handles[-1] = (h, offset, n, True)

    def view(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A CUDA tensor of `shape` and `dtype` over the start of the range (no copy; contents undefined)."""
        need = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if need > self.size:
            raise ValueError(f"SplitRange.view: {tuple(shape)} {dtype} needs {need} bytes, range has {self.size}")
        return cuda_view(self.ptr.value, shape, dtype, f"cuda:{self.dev}", owner=self)

    def close(self) -> None:
        if not self.ptr.value:
            return
        torch.cuda.synchronize(self.dev)
        cu = _driver()
        for h, offset, n, mapped in self.handles:
            if mapped:
                cu.cuMemUnmap(ctypes.c_uint64(self.ptr.value + offset), ctypes.c_size_t(n))
            cu.cuMemRelease(h)
        cu.cuMemAddressFree(ctypes.c_uint64(self.ptr.value), ctypes.c_size_t(self.size))
        self.handles, self.ptr = [], ctypes.c_uint64()
