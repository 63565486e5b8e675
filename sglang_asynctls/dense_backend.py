"""Which stock SGLang backend runs prefill and short-sequence decode under `--enable-asynctls` (the inner backend).

`--asynctls-dense-backend auto` means what stock SGLang would pick for this model, GPU and flags
(`ServerArgs._get_default_attn_backend`: `fa3` on Hopper for GQA/MHA and MLA models, FlashInfer or Triton
elsewhere), so a user's prefill and short requests run the very kernels they run without the plugin. The name is
resolved once, in the launcher, and travels in the config to every scheduler process.
"""

from __future__ import annotations

import logging

from sglang_asynctls.config import AUTO, FLAGS, AsyncTLSConfigError

logger = logging.getLogger(__name__)

# the stock backends that can be the inner one, GQA/MHA and MLA alike: for MLA each keeps the latent in SGLang's
# MLATokenToKVPool ([slots, 1, kv_lora_rank + rope]), the layout the sparse path reads, and the model is shown the
# inner's name (AsyncTLSBackend.*_attention_backend_str)
WRAPPABLE = ("fa3", "flashinfer", "triton")
TEST_ONLY = ("torch_native",)  # SGLang's CPU backend: lets the CPU tests run a real stock backend inside ours


def stock_default(server_args) -> str:
    """The attention backend stock SGLang 0.5.17 would choose for this server's model, GPU and flags."""
    use_mla = server_args.use_mla_backend()
    return server_args._get_default_attn_backend(use_mla, server_args.get_model_config())


def resolve(cfg, server_args, default=None) -> str:
    """The concrete inner backend for cfg.dense_backend; raises AsyncTLSConfigError naming the flag when the
    combination cannot work. `default` (tests) stands in for stock's own choice."""
    flag = FLAGS["dense_backend"]
    allowed = WRAPPABLE
    if cfg.host_kv_gib > 0:
        # the host tier's prefill gathers a host-held prefix before Triton's extend kernel (offload/staged_prefix.py);
        # no other backend has that adapter yet
        allowed = ("triton",)
    name = cfg.dense_backend
    if name == AUTO:
        picked = default if default is not None else stock_default(server_args)
        name = picked if picked in allowed else _fallback(allowed)
        if name != picked:
            logger.info("asynctls: stock SGLang would pick %s here; %s runs %s instead (%s)", picked, flag, name,
                        "host tier" if cfg.host_kv_gib > 0 else "not wrappable")
        return name
    if name not in allowed and name not in TEST_ONLY:
        why = f" with {FLAGS['host_kv_gib']}" if cfg.host_kv_gib > 0 else ""
        raise AsyncTLSConfigError(f"{flag} must be one of {', '.join(('auto',) + allowed)}{why} (got {name!r})")
    return name


def _fallback(allowed) -> str:
    """FlashInfer where it is allowed and installed, else Triton (allowed everywhere)."""
    if "flashinfer" in allowed:
        try:
            import flashinfer  # noqa: F401

            return "flashinfer"
        except ImportError:
            pass
    return "triton"


def build(model_runner, name: str):
    """The stock backend `name`, built exactly as SGLang builds it (its registry's factory)."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    if name not in ATTENTION_BACKENDS:
        raise AsyncTLSConfigError(f"{FLAGS['dense_backend']}: no SGLang attention backend named {name!r}")
    return ATTENTION_BACKENDS[name](model_runner)
