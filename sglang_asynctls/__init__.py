"""sglang-asynctls: AsyncTLS two-level sparse decode attention as a fork-free SGLang 0.5.17 plugin."""

from sglang_asynctls.config import AsyncTLSConfig, AsyncTLSConfigError

__all__ = ["AsyncTLSConfig", "AsyncTLSConfigError"]
__version__ = "0.1.0"
