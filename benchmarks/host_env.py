"""What every result file records about the host it ran on: GPU name and count, torch / triton / SGLang / this
package's versions."""

from __future__ import annotations


def version(pkg: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "absent"


def environment() -> dict:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"gpu": gpus[0] if gpus else "none", "gpu_count": len(gpus), "torch": torch.__version__,
            **{pkg: version(pkg) for pkg in ("triton", "sglang", "sglang-asynctls")}}
