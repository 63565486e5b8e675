"""sglang-asynctls: AsyncTLS two-level sparse decode attention as a fork-free SGLang 0.5.17 plugin."""

import os as _os

from sglang_asynctls.config import AsyncTLSConfig, AsyncTLSConfigError

# kernels/ and patches/ sit at the repository top (design card). Installed, setuptools' package-dir maps them
# to sglang_asynctls.kernels / .patches; run from a source checkout, this makes the same names resolve.
_top = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_top, "kernels", "__init__.py")):
    __path__.append(_top)  # noqa: F821 (package __path__)

__all__ = ["AsyncTLSConfig", "AsyncTLSConfigError"]
__version__ = "0.1.0"
