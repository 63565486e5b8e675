"""Long-context prompts for fidelity runs, built at the token level so needles land at exact positions.

Haystack: English prose from the Python standard library's own documentation (`pydoc_data.topics`, ~113k tokens),
so every machine with Python has it and no data set is downloaded. Needles can be placed to straddle a block
boundary (their middle token on a multiple of `block_size`), where a block-granular method must keep two blocks.

Tasks (RULER-style, scaled to a 135M model):
    passkey     one pass key; "What is the pass key? The pass key is" -> " 68231"
    multikey    `num_keys` keyed numbers at spread depths; the question names one key
    multivalue  `num_values` numbers for one key at spread depths; the answer must list them all (score: share)
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

HEADER = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
          "memorize it. I will quiz you about it.\n\n")
KEYS = ("apple", "river", "violet", "copper", "falcon", "marble", "meadow", "harbor", "lantern", "pepper")


@dataclass(frozen=True)
class NeedleTask:
    kind: str
    ids: torch.Tensor  # [L] int64 prompt tokens
    answers: Tuple[str, ...]  # strings the completion must contain
    needle_positions: Tuple[int, ...]  # first token of each needle
    depth: float
    straddle: bool

    def score(self, completion: str) -> float:
        """Share of answers found in the completion (1.0 or 0.0 for single-answer tasks)."""
        return sum(a in completion for a in self.answers) / len(self.answers)


@functools.lru_cache(maxsize=2)
def prose_ids(tok) -> Tuple[int, ...]:
    from pydoc_data import topics

    return tuple(tok("\n\n".join(topics.topics[k] for k in sorted(topics.topics))).input_ids)


def _encode(tok, text: str) -> List[int]:
    return list(tok(text).input_ids)


def _place(base: int, span: int, depth: float, length: int, straddle: bool, block_size: int) -> int:
    """Token position (absolute) of a needle of `span` tokens at `depth` of a haystack [base, base + length)."""
    pos = base + int(depth * max(0, length - span))
    if straddle:  # needle's middle on a block boundary
        boundary = max(block_size, round((pos + span // 2) / block_size) * block_size)
        pos = boundary - span // 2
    return min(max(base, pos), base + length - span)


def build(tok, context: int, needles: Sequence[Tuple[float, str]], question: str, *, seed: int,
          straddle: bool, block_size: int = 64) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """Prompt of exactly `context` tokens: header, prose haystack with needles (depth, text), question.

    Returns (ids [context], needle start positions in prompt order of `needles`).
    """
    head, tail = _encode(tok, HEADER), _encode(tok, question)
    needle_ids = [_encode(tok, "\n" + text + "\n") for _, text in needles]
    hay_len = context - len(head) - len(tail) - sum(map(len, needle_ids))
    prose = prose_ids(tok)
    start = random.Random(seed).randrange(0, len(prose) - hay_len)
    hay = list(prose[start:start + hay_len])
    body: List[int] = []
    cut, positions = 0, {}
    for i in sorted(range(len(needles)), key=lambda i: needles[i][0]):
        want = _place(len(head), len(needle_ids[i]), needles[i][0], context - len(head) - len(tail), straddle,
                      block_size)
        take = max(0, want - len(head) - len(body))
        body += hay[cut:cut + take]
        cut += take
        positions[i] = len(head) + len(body)
        body += needle_ids[i]
    ids = head + body + hay[cut:] + tail
    assert len(ids) == context, (len(ids), context)
    return torch.tensor(ids), tuple(positions[i] for i in range(len(needles)))


def _number(rng: random.Random) -> str:
    return str(rng.randrange(10000, 100000))


def passkey(tok, context: int, depth: float, seed: int, straddle: bool = False) -> NeedleTask:
    key = _number(random.Random(seed))
    text = f"The pass key is {key}. Remember it. {key} is the pass key."
    ids, pos = build(tok, context, [(depth, text)], "\n\nWhat is the pass key? The pass key is", seed=seed,
                     straddle=straddle)
    return NeedleTask("passkey", ids, (key,), pos, depth, straddle)


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
    ids, pos = build(tok, context, needles, question, seed=seed, straddle=straddle)
    return NeedleTask("multikey", ids, (values[0],), pos, depth, straddle)


def multivalue(tok, context: int, depth: float, seed: int, straddle: bool = False,
               num_values: int = 4) -> NeedleTask:
    rng = random.Random(seed)
    key = rng.choice(KEYS)
    values = [_number(rng) for _ in range(num_values)]
    needles = [(d, f"One of the special magic numbers for {key} is: {v}.")
               for d, v in zip(_spread(depth, num_values), values)]
    question = (f"\n\nWhat are all the special magic numbers for {key}? "
                f"The special magic numbers for {key} are:")
    ids, pos = build(tok, context, needles, question, seed=seed, straddle=straddle)
    return NeedleTask("multivalue", ids, tuple(values), pos, depth, straddle)


TASKS = {"passkey": passkey, "multikey": multikey, "multivalue": multivalue}
