"""How the one validated AsyncTLSConfig travels from the launcher to every scheduler process.

The launcher attaches it to the ServerArgs instance (pickled into each scheduler process by SGLang's spawn) and
mirrors it in the environment, which spawned processes inherit; the backend factory reads it back. Programs that
build ServerArgs without the CLI (`sgl.Engine(attention_backend="asynctls")`) get the environment's config or the
defaults.
"""

from __future__ import annotations

import os
from typing import Optional

from sglang_asynctls.config import AsyncTLSConfig

BACKEND_NAME = "asynctls"
ENV_VAR = "SGLANG_ASYNCTLS_CONFIG"
_ATTR = "_asynctls_config"  # leading underscore: ServerArgs allows private attributes after resolution


def attach_config(server_args, cfg: AsyncTLSConfig) -> None:
    object.__setattr__(server_args, _ATTR, cfg)
    os.environ[ENV_VAR] = cfg.to_json()


def config_of(server_args) -> AsyncTLSConfig:
    """The config of a server that runs the asynctls backend (its factory and what it builds call this)."""
    cfg = getattr(server_args, _ATTR, None)
    if cfg is not None:
        return cfg
    if os.environ.get(ENV_VAR):
        return AsyncTLSConfig.from_json(os.environ[ENV_VAR])
    return AsyncTLSConfig(enabled=True)


def config_if_enabled(server_args) -> Optional[AsyncTLSConfig]:
    """The config when this server runs AsyncTLS, else None: hooks that every SGLang server passes through (KV
    sizing) must leave a server without --enable-asynctls exactly as stock."""
    cfg = getattr(server_args, _ATTR, None)
    if cfg is None and getattr(server_args, "attention_backend", None) != BACKEND_NAME:
        return None
    cfg = config_of(server_args)
    return cfg if cfg.enabled else None
