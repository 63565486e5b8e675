"""AsyncTLS on real Qwen2.5-Coder-0.5B-Instruct weights at 8k, CPU: the reference decode path, as the server
runs it by default, must answer every needle question that dense decode answers.

The prompts are longer than AsyncTLSConfig's dense_below (8,192), so a server with the default flags decodes
them sparse; the reference methods get the server's default budgets (k_t 1,024, k_b 128, sink 64, window 128;
1/8 of the context), the packaged Qwen2.5-Coder-0.5B channels, and decode every answer token (the question's
last token included) through `reference.METHODS["asynctls"]`. The test also checks that the selection really is
sparse: k_t of the ~8.2k tokens per KV group. ~3 min on 2 cores (two 8k prefills) once the model is staged.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu"))
import stage_qwen25coder as stage  # noqa: E402

pytest.importorskip("gguf")

from sglang_asynctls import fidelity as fd  # noqa: E402
from sglang_asynctls import hf_model, needles  # noqa: E402
from sglang_asynctls.config import AsyncTLSConfig  # noqa: E402
from sglang_asynctls.model_spec import ModelAttention, load_channel_config, packaged_channel_config  # noqa: E402

SERVED = AsyncTLSConfig(enabled=True)  # the flags' defaults
CONTEXT = SERVED.dense_below + 64  # every decode step at or past dense_below: the server would run sparse
MAX_NEW = 8


@pytest.fixture(scope="module")
def qwen():
    d = stage.model_dir("0.5b")
    torch.manual_seed(0)
    return hf_model.load(d), hf_model.load_tokenizer(d)


def _answers(model, tok, task, channels, budget):
    """(dense completions, asynctls completions, widest asynctls selection) for each of the task's questions."""
    kv = fd.DocumentKV(model, task.context_ids, channels, extra=64, block_size=SERVED.block_size)
    dense, sparse, widest = [], [], 0
    for q, _ in task.questions:
        mark = kv.length
        kv.extend(model, q[:-1])
        dense.append(tok.decode(fd.generate(model, kv, int(q[-1]), fd.DENSE_BUDGET, "dense", MAX_NEW)))
        with fd.capture_slots() as seen:
            sparse.append(tok.decode(fd.generate(model, kv, int(q[-1]), budget, "asynctls", MAX_NEW)))
        widest = max(widest, max(int((s >= 0).sum(-1).max()) for s in seen))
        kv.truncate(mark)
    return dense, sparse, widest


@pytest.mark.slow
def test_asynctls_keeps_every_dense_answer_at_8k(qwen):
    model, tok = qwen
    s = model.shape
    spec = ModelAttention("gqa", s.num_layers, s.num_qo_heads, s.num_kv_heads, s.head_dim, s.head_dim)
    path = packaged_channel_config(spec)
    assert path and path.endswith("qwen25coder_0.5b_channels.json")
    channels = load_channel_config(path, spec, SERVED.resolved_label_channels("gqa"))
    budget = fd.Budget(SERVED.token_budget, SERVED.block_budget, SERVED.sink_tokens, SERVED.local_window,
                       SERVED.block_size, SERVED.bound_slack, SERVED.group_score)
    tasks = [needles.multivalue(tok, CONTEXT, depth=0.3, seed=11, straddle=True),
             needles.multikey(tok, CONTEXT, depth=0.6, seed=12)]
    lost, answered = [], 0
    for task in tasks:
        assert len(task.context_ids) >= SERVED.dense_below
        dense, sparse, widest = _answers(model, tok, task, channels, budget)
        assert widest == SERVED.token_budget < len(task.context_ids)  # sparse: k_t of the context, not all of it
        for (_, answer), d, a in zip(task.questions, dense, sparse):
            answered += answer in d
            if answer in d and answer not in a:
                lost.append((task.kind, answer, d, a))
    assert answered >= 3, f"dense answered only {answered} of 5: the prompts no longer test retrieval"
    assert not lost, f"AsyncTLS lost dense answers: {lost}"
