"""`python -m sglang_asynctls.demo`: a long passkey prompt through SmolLM2-135M on CPU, dense vs AsyncTLS decode.

Both runs share one dense prefill of the haystack (and a dense extend of the question, as SGLang would run a
follow-up prompt); from the question's last token on, every decode step attends either to all tokens (dense) or
to the k_t tokens AsyncTLS selects (reference.asynctls_decode over the cache and its block index / INT4 labels).
Prints both answers, their token agreement, the attention-mass recall of AsyncTLS's selections (share of the
dense attention probability its tokens hold, per step averaged over layers and heads) and the time taken.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import time

import torch

from sglang_asynctls import fidelity as fd
from sglang_asynctls import needles, smollm2
from sglang_asynctls.config import AsyncTLSConfig
from sglang_asynctls.model_spec import ModelAttention, load_channel_config


PACKAGED = importlib.resources.files("sglang_asynctls") / "data" / "smollm2_channels.json"


def packaged_channels(model: smollm2.SmolLlama, label_channels: int) -> torch.Tensor:
    """[layers, Hkv, d_c] heavy channels of the packaged SmolLM2 calibration."""
    s = model.shape
    spec = ModelAttention("gqa", s.num_layers, s.num_qo_heads, s.num_kv_heads, s.head_dim, s.head_dim)
    return load_channel_config(str(PACKAGED), spec, label_channels)


def answer(model, kv, task: needles.NeedleTask, budget, method, max_new, observe=None):
    """Dense extend of the question minus its last token, then `method` decodes; returns (tokens, seconds)."""
    question = task.questions[0][0]
    mark = kv.length
    kv.extend(model, question[:-1])
    t0 = time.perf_counter()
    out = fd.generate(model, kv, int(question[-1]), budget, method, max_new, observe=observe)
    seconds = time.perf_counter() - t0
    kv.truncate(mark)
    return out, seconds


def run(context: int = 4096, depth: float = 0.4, fraction: int = 8, max_new: int = 8, seed: int = 7) -> dict:
    t_start = time.perf_counter()
    model, tok = smollm2.load_model(), smollm2.load_tokenizer()
    t_load = time.perf_counter() - t_start
    channels = packaged_channels(model, AsyncTLSConfig().resolved_label_channels("gqa"))
    task = needles.passkey(tok, context, depth, seed=seed, straddle=True)
    cfg = AsyncTLSConfig().with_layer_schedule(json.loads(PACKAGED.read_text()))  # the defaults, as served
    budget = fd.Budget.fraction_of(context, fraction, bound_slack=cfg.bound_slack, group_score=cfg.group_score,
                                   layer_scale=cfg.layer_scale(), num_layers=model.shape.num_layers,
                                   candidate_scale=cfg.layer_scale("layer_candidate_scale"))
    t0 = time.perf_counter()
    kv = fd.DocumentKV(model, task.context_ids, channels, extra=len(task.questions[0][0]) + max_new)
    t_prefill = time.perf_counter() - t0
    recall = []

    def observe(layer, q, slots, seq_lens):  # generate() decodes request 0, whose slot of position t is t
        recall.append(fd.attention_mass(q, kv.k[layer], seq_lens, slots, sm_scale).mean().item())

    sm_scale = 1.0 / model.shape.head_dim ** 0.5
    dense, t_dense = answer(model, kv, task, budget, "dense", max_new)
    sparse, t_sparse = answer(model, kv, task, budget, "asynctls", max_new, observe)
    return dict(task=task, budget=budget, dense=tok.decode(dense), sparse=tok.decode(sparse),
                agreement=sum(a == b for a, b in zip(dense, sparse)) / max(len(dense), 1), recall=recall,
                t_load=t_load, t_prefill=t_prefill, t_dense=t_dense, t_sparse=t_sparse,
                t_total=time.perf_counter() - t_start)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`"))
    p.add_argument("--context", type=int, default=4096, help="prompt tokens (SmolLM2 was trained to 8,192)")
    p.add_argument("--depth", type=float, default=0.4, help="needle depth in [0, 1]")
    p.add_argument("--fraction", type=int, default=8, help="token budget = context / fraction")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    r = run(args.context, args.depth, args.fraction)
    t, b = r["task"], r["budget"]
    print(f"prompt: {len(t.prompt())} tokens, pass key {t.questions[0][1]} at token {t.needle_positions[0]} "
          f"(depth {t.depth:.2f}, straddling a 64-token block boundary)")
    kts, kbs = [t for t, _ in b.layer_budgets], [k for _, k in b.layer_budgets]
    print(f"AsyncTLS budget: k_t = {b.token_budget} tokens of {b.block_budget} candidate blocks x {b.block_size}, "
          f"sink {b.sink_tokens}, window {b.local_window}" + (
              f" before the per-layer schedule: k_t {min(kts)}-{max(kts)} (mean {sum(kts) / len(kts):.0f}), k_b "
              f"{min(kbs)}-{max(kbs)} (mean {sum(kbs) / len(kbs):.1f}); coarse score: slack {b.bound_slack:g}, "
              f"group {b.group_score}" if kts else ""))
    print(f"dense    answer: {r['dense']!r}  ({r['t_dense']:.1f} s decode)")
    print(f"asynctls answer: {r['sparse']!r}  ({r['t_sparse']:.1f} s decode)")
    ok = lambda s: "found" if t.questions[0][1] in s else "MISSED"  # noqa: E731
    rec = torch.tensor(r["recall"])
    print(f"pass key: dense {ok(r['dense'])}, asynctls {ok(r['sparse'])}; answer-token agreement "
          f"{r['agreement']:.0%}; attention-mass recall mean {rec.mean():.3f} (min over layers x steps "
          f"{rec.min():.3f})")
    print(f"time: load {r['t_load']:.1f} s, dense prefill {r['t_prefill']:.1f} s, total {r['t_total']:.1f} s "
          f"(CPU, {torch.get_num_threads()} threads; reference implementation, not the GPU kernels)")


if __name__ == "__main__":
    main()
