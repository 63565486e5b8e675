"""Long-context prompts for fidelity runs, built at the token level so needles land at exact positions.

Haystack: English prose from the Python standard library's own documentation (`pydoc_data.topics`, ~113k tokens),
so every machine with Python has it and no data set is downloaded. Needles can be placed to straddle a block
boundary (their middle token on a multiple of `block_size`), where a block-granular method must keep two blocks.

Tasks (RULER-style, scaled to a 135M model):
    passkey     one pass key; "What is the pass key? The pass key is" -> " 68231"
    multikey    `num_keys` keyed numbers at spread depths; the question names one key
    multivalue  `num_values` numbers for one key at spread depths, each asked for by ordinal (score: share)
    variable_tracking  a chain "VAR A = 12345." -> "VAR B = VAR A." -> ... of `hops` hops (and distractor
                chains) in document order; the question asks for the last variable's value (multi-hop)
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from sglang_asynctls.calibrate import stdlib_source

HEADER = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
          "memorize it. I will quiz you about it.\n\n")
KEYS = ("apple", "river", "violet", "copper", "falcon", "marble", "meadow", "harbor", "lantern", "pepper")


@dataclass(frozen=True)
class NeedleTask:
    """A haystack with needles (`context_ids`) and questions asked about it, each with the answer it wants.

    Every question is asked on its own after the same context: prompt(i) = context_ids + questions[i] ids.
    """

    kind: str
    context_ids: torch.Tensor  # [L] int64
    questions: Tuple[Tuple[torch.Tensor, str], ...]  # (question ids [T], expected answer)
    needle_positions: Tuple[int, ...]  # first token of each needle
    depth: float
    straddle: bool

    def prompt(self, i: int = 0) -> torch.Tensor:
        return torch.cat([self.context_ids, self.questions[i][0]])

    def score(self, completions: Sequence[str]) -> float:
        """Share of questions whose answer appears in its completion."""
        return sum(a in c for (_, a), c in zip(self.questions, completions)) / len(self.questions)


@functools.lru_cache(maxsize=2)
def prose_ids(tok) -> Tuple[int, ...]:
    return tuple(tok(prose_text()).input_ids)


HAYSTACK_FILE = "pydoc_data/topics.py"


def prose_text() -> str:
    """pydoc_data.topics of the stdlib that `calibrate.stdlib_dir` names (ASYNCTLS_STDLIB or this Python's)."""
    scope: dict = {}
    exec(compile(stdlib_source(HAYSTACK_FILE), HAYSTACK_FILE, "exec"), scope)  # a module of one dict literal
    return "\n\n".join(scope["topics"][k] for k in sorted(scope["topics"]))


def _encode(tok, text: str) -> List[int]:
    return list(tok(text).input_ids)


def _place(base: int, span: int, depth: float, length: int, straddle: bool, block_size: int) -> int:
    """Token position (absolute) of a needle of `span` tokens at `depth` of a haystack [base, base + length)."""
    pos = base + int(depth * max(0, length - span))
    if straddle:  # needle's middle on a block boundary
        boundary = max(block_size, round((pos + span // 2) / block_size) * block_size)
        pos = boundary - span // 2
    return min(max(base, pos), base + length - span)


def build(tok, context: int, needles: Sequence[Tuple[float, str]], questions: Sequence[str], *, seed: int,
          straddle: bool, block_size: int = 64) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...], Tuple[int, ...]]:
    """Header, prose haystack with needles (depth, text), sized so context + the longest question = `context`.

    Returns (context ids [L], question ids, needle start positions in the order of `needles`).
    """
    head = _encode(tok, HEADER)
    tails = [_encode(tok, q) for q in questions]
    needle_ids = [_encode(tok, "\n" + text + "\n") for _, text in needles]
    body_len = context - len(head) - max(map(len, tails))
    hay_len = body_len - sum(map(len, needle_ids))
    prose = prose_ids(tok)
    start = random.Random(seed).randrange(0, len(prose) - hay_len)
    hay = list(prose[start:start + hay_len])
    body: List[int] = []
    cut, positions = 0, {}
    for i in sorted(range(len(needles)), key=lambda i: needles[i][0]):
        want = _place(len(head), len(needle_ids[i]), needles[i][0], body_len, straddle, block_size)
        take = max(0, want - len(head) - len(body))
        body += hay[cut:cut + take]
        cut += take
        positions[i] = len(head) + len(body)
        body += needle_ids[i]
    ids = head + body + hay[cut:]
    assert len(ids) == body_len + len(head), (len(ids), body_len)
    return (torch.tensor(ids), tuple(torch.tensor(t) for t in tails),
            tuple(positions[i] for i in range(len(needles))))


def _number(rng: random.Random) -> str:
    return str(rng.randrange(10000, 100000))


def passkey(tok, context: int, depth: float, seed: int, straddle: bool = False) -> NeedleTask:
    key = _number(random.Random(seed))
    text = f"The pass key is {key}. Remember it. {key} is the pass key."
    ids, qs, pos = build(tok, context, [(depth, text)], ["\n\nWhat is the pass key? The pass key is"], seed=seed,
                         straddle=straddle)
    return NeedleTask("passkey", ids, ((qs[0], key),), pos, depth, straddle)


def _spread(depth: float, n: int) -> List[float]:
    return [(depth + k / n) % 1.0 for k in range(n)]


def multikey(tok, context: int, depth: float, seed: int, straddle: bool = False, num_keys: int = 4) -> NeedleTask:
    """The queried key sits at `depth`; the other keys (distractors) at evenly spread depths."""
    rng = random.Random(seed)
    keys = rng.sample(KEYS, num_keys)
    values = [_number(rng) for _ in keys]
    needles = [(d, f"The special magic number for {k} is: {v}.") for d, k, v in zip(_spread(depth, num_keys),
                                                                                    keys, values)]
    question = f"\n\nWhat is the special magic number for {keys[0]}? The special magic number for {keys[0]} is:"
    ids, qs, pos = build(tok, context, needles, [question], seed=seed, straddle=straddle)
    return NeedleTask("multikey", ids, ((qs[0], values[0]),), pos, depth, straddle)


ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")


def multivalue(tok, context: int, depth: float, seed: int, straddle: bool = False,
               num_values: int = 4) -> NeedleTask:
    """One key holds `num_values` numbers at spread depths; each is asked for in its own question (a 135M model
    cannot list several numbers in one answer, so RULER's single "list them all" question is split by ordinal)."""
    rng = random.Random(seed)
    key = rng.choice(KEYS)
    values = [_number(rng) for _ in range(num_values)]
    names = ORDINALS[:num_values]
    needles = [(d, f"The {o} special magic number for {key} is: {v}.")
               for d, o, v in zip(_spread(depth, num_values), names, values)]
    questions = [f"\n\nWhat is the {o} special magic number for {key}? The {o} special magic number for {key} is:"
                 for o in names]
    ids, qs, pos = build(tok, context, needles, questions, seed=seed, straddle=straddle)
    return NeedleTask("multivalue", ids, tuple(zip(qs, values)), pos, depth, straddle)


def _var_names(rng: random.Random, n: int) -> List[str]:
    names: List[str] = []
    while len(names) < n:
        name = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    return names


def variable_tracking(tok, context: int, depth: float, seed: int, straddle: bool = False, hops: int = 2,
                      chains: int = 2, gap: float = 0.15) -> NeedleTask:
    """RULER's variable tracking as one question: chain 0's value sits at `depth` of the span it can start in,
    each hop `gap` of the haystack later; distractor chains interleave at other depths with other values."""
    rng = random.Random(seed)
    names = _var_names(rng, chains * (hops + 1))
    needles = []
    for c in range(chains):
        chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
        start = ((depth + c / chains) % 1.0) * (1.0 - gap * hops)
        needles.append((start, f"VAR {chain[0]} = {_number(rng)}."))
        needles += [(start + gap * h, f"VAR {chain[h]} = VAR {chain[h - 1]}.") for h in range(1, hops + 1)]
    last, value = names[hops], needles[0][1].split(" = ")[1].rstrip(".")
    question = (f"\n\nQuestion: follow the VAR assignments in the text above. What number does VAR {last} hold? "
                f"Answer: VAR {last} holds the number")
    ids, qs, pos = build(tok, context, needles, [question], seed=seed, straddle=straddle)
    return NeedleTask("variable_tracking", ids, ((qs[0], value),), pos, depth, straddle)


TASKS = {"passkey": passkey, "multikey": multikey, "multivalue": multivalue}
SERVER_TASKS = {**TASKS, "variable_tracking": variable_tracking}  # the server harness's needle tasks
