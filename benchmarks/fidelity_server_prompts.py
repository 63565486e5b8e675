"""The prompt set of benchmarks/fidelity_server.py: RULER-style needle tasks and next-line code completion at
several contexts, as token ids of the served model's tokenizer, deterministic from a seed.

Each prompt is <= context - RESERVE tokens, so prompt + answer fit a server launched with --context-length
32768 at the largest context. Needle prompts are plain completions ("... The pass key is" -> " 68231"), as
`sglang_asynctls.needles` builds them; code prompts are `sglang_asynctls.code_lines`.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

from sglang_asynctls import code_lines, needles

CONTEXTS = (8192, 16384, 32768)
RESERVE = 64  # tokens a prompt leaves free of its context for the answer
NEEDLE_TASKS = ("passkey", "multikey", "multivalue", "variable_tracking")
TASKS = NEEDLE_TASKS + ("code",)
MAX_NEW = {"code": 40}  # needle answers are 5 digits and a period: 16 tokens leave room
DEFAULT_MAX_NEW = 16


def depths(n: int) -> List[float]:
    """n depths spread over [0.02, 0.98]."""
    return [0.02 + 0.96 * k / max(1, n - 1) for k in range(n)]


def _needle_prompts(tok, task: str, context: int, count: int, seed: int) -> List[dict]:
    """`count` prompts; multivalue asks each haystack 4 questions (one prompt each, sharing the context)."""
    build = needles.SERVER_TASKS[task]
    per_haystack = 4 if task == "multivalue" else 1
    n = math.ceil(count / per_haystack)
    out = []
    for k, depth in enumerate(depths(n)):
        t = build(tok, context - RESERVE, depth, seed=seed + 7919 * k, straddle=bool(k % 2))
        for q, (q_ids, answer) in enumerate(t.questions):
            out.append(dict(id=f"{task}/{context}/{k}/{q}", task=task, context=context,
                            input_ids=t.prompt(q).tolist(), answer=answer, score="contains", depth=round(depth, 4),
                            straddle=t.straddle, needle_positions=list(t.needle_positions)))
    return out[:count]


def _code_prompts(tok, context: int, count: int, seed: int) -> List[dict]:
    lines = code_lines.code_lines(tok, context - RESERVE, count, seed=seed)
    return [dict(id=f"code/{context}/{k}/0", task="code", context=context, input_ids=list(c.prompt_ids),
                 answer=c.answer, score="first_line", module=c.module, line_no=c.line_no)
            for k, c in enumerate(lines)]


def build_prompts(tok, contexts: Sequence[int] = CONTEXTS, per_task: int = 24, seed: int = 0,
                  tasks: Sequence[str] = TASKS) -> List[dict]:
    """Every (task, context) with `per_task` prompts; ids are "task/context/haystack/question"."""
    out: List[dict] = []
    for context in contexts:
        for i, task in enumerate(tasks):
            task_seed = seed * 1_000_003 + context * 31 + i
            made = (_code_prompts(tok, context, per_task, task_seed) if task == "code"
                    else _needle_prompts(tok, task, context, per_task, task_seed))
            for p in made:
                p["max_new_tokens"] = MAX_NEW.get(task, DEFAULT_MAX_NEW)
                assert len(p["input_ids"]) <= context - RESERVE, (p["id"], len(p["input_ids"]))
            out += made
    return out


def correct(prompt: dict, completion: str) -> bool:
    if prompt["score"] == "first_line":
        return code_lines.first_line_matches(completion, prompt["answer"])
    return prompt["answer"] in completion


def prompts_per_task(prompts: Sequence[dict]) -> Dict[str, int]:
    """task -> the fewest prompts it has at any context."""
    counts: Dict[tuple, int] = {}
    for p in prompts:
        counts[(p["task"], p["context"])] = counts.get((p["task"], p["context"]), 0) + 1
    return {t: min(n for (task, _), n in counts.items() if task == t) for t in sorted({t for t, _ in counts})}
