"""The `asynctls` attention backend as SGLang builds it in each scheduler process.

Current state (stated plainly, also in README): the sparse decode path is not wired into the server yet, so the
backend validates the per-process configuration and model, then serves every forward pass — prefill and decode —
through SGLang's own Triton backend. Outputs therefore equal `--attention-backend triton` exactly.
"""

from __future__ import annotations

import logging

from sglang_asynctls.model_spec import check_config_for_model, from_sglang_model_config
from sglang_asynctls.runtime_config import config_of

logger = logging.getLogger(__name__)


def create_asynctls_backend(model_runner):
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    cfg = config_of(model_runner.server_args)
    check_config_for_model(cfg, from_sglang_model_config(model_runner.model_config))
    logger.warning("asynctls backend: sparse decode is not wired into the server yet; "
                   "serving prefill and decode densely through SGLang's triton backend (config %s)", cfg)
    return TritonAttnBackend(model_runner)
