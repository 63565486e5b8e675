"""Next-line completion prompts on long real code, for long-context fidelity through a server.

The corpus is Python standard-library source (CODE_MODULES: none of calibrate.CALIBRATION_MODULES), one file
after another under a "# file: NAME" line. A prompt is the code before a target line, cut to at most `context`
tokens of the model's tokenizer at a line start; the answer is the target line. Targets are lines that need the
far context: each names an identifier (>= 6 characters) that the last `near_chars` characters before it do not
contain but the rest of the prompt does, so a method that keeps only recent tokens cannot complete them.
"""

from __future__ import annotations

import bisect
import functools
import io
import random
import re
import tokenize
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from sglang_asynctls.calibrate import CALIBRATION_MODULES, EVALUATION_MODULES, stdlib_source

# long modules present in both Python 3.11 and 3.12 (the CPU and GPU hosts' stdlib)
CODE_MODULES = EVALUATION_MODULES + ("_pydecimal.py", "_pyio.py", "pydoc.py", "mailbox.py", "doctest.py",
                                     "configparser.py", "unittest/mock.py", "shutil.py", "tempfile.py",
                                     "http/client.py", "urllib/request.py", "turtle.py")
assert not set(CODE_MODULES) & set(CALIBRATION_MODULES)
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{5,}")


@dataclass(frozen=True)
class CodeLine:
    prompt_ids: Tuple[int, ...]
    answer: str  # the target line, without its newline
    module: str
    line_no: int  # in the module, 1-based

    def correct(self, completion: str) -> bool:
        return first_line_matches(completion, self.answer)


def first_line_matches(completion: str, line: str) -> bool:
    """The completion's first line is `line` (trailing whitespace ignored)."""
    return completion.split("\n", 1)[0].rstrip() == line.rstrip()


def string_lines(source: str) -> set:
    """Line numbers (1-based) inside multi-line strings (docstrings): prose, not code to complete."""
    rows = set()
    for t in tokenize.generate_tokens(io.StringIO(source).readline):
        if t.type == tokenize.STRING and t.end[0] > t.start[0]:
            rows.update(range(t.start[0], t.end[0] + 1))
    return rows


@functools.lru_cache(maxsize=1)
def corpus(modules: Tuple[str, ...] = CODE_MODULES) -> Tuple[str, Tuple[int, ...], Tuple[Tuple[str, int], ...]]:
    """(text, start offset of every line, (module, line number) of every line; 0 = not a target: the file
    header or a line of a multi-line string)."""
    parts, where = [], []
    for m in modules:
        source = stdlib_source(m)
        lines, prose = source.splitlines(), string_lines(source)
        parts += [f"# file: {m}"] + lines
        where += [(m, 0)] + [(m, 0 if i + 1 in prose else i + 1) for i in range(len(lines))]
    starts, pos = [], 0
    for line in parts:
        starts.append(pos)
        pos += len(line) + 1
    return "\n".join(parts) + "\n", tuple(starts), tuple(where)


def _far_identifier(text: str, start: int, end: int, line: str, near_chars: int) -> bool:
    names = set(IDENT.findall(line.split("#", 1)[0]))  # a trailing comment's words are no identifiers
    near, far = text[max(start, end - near_chars):end], text[start:max(start, end - near_chars)]
    return any(n not in near and re.search(rf"\b{n}\b", far) for n in names)


def _cut(tok, text: str, starts: Sequence[int], line: int, context: int,
         chars_per_token: float) -> Tuple[Tuple[int, ...], int]:
    """(token ids, start offset) of the lines before `line`, from the first line start that keeps them <= context
    tokens."""
    end = starts[line]
    first = bisect.bisect_left(starts, max(0, end - int(context * chars_per_token)))
    while True:
        ids = tok(text[starts[first]:end], add_special_tokens=False).input_ids
        if len(ids) <= context:
            return tuple(ids), starts[first]
        over = len(ids) - context  # drop about as many lines as the overshoot needs, at least one
        first = bisect.bisect_left(starts, starts[first] + max(1, int(over * chars_per_token)), lo=first + 1)


def code_lines(tok, context: int, count: int, seed: int, near_chars: int = 3000,
               min_chars: int = 20) -> List[CodeLine]:
    """`count` next-line prompts of <= `context` tokens (within a few lines of it), chosen by `seed`."""
    text, starts, where = corpus()
    sample = tok(text[:200_000], add_special_tokens=False).input_ids
    chars_per_token = 200_000 / len(sample)
    lines = text.split("\n")
    rng = random.Random(seed)
    first_ok = bisect.bisect_left(starts, int(context * chars_per_token * 1.1))
    order = list(range(first_ok, len(lines) - 1))
    rng.shuffle(order)
    out: List[CodeLine] = []
    for i in order:
        line = lines[i]
        stripped = line.strip()
        if len(stripped) < min_chars or stripped.startswith(("#", '"', "'")) or where[i][1] == 0:
            continue
        approx_start = max(0, starts[i] - int(context * chars_per_token))
        if not _far_identifier(text, approx_start, starts[i], line, near_chars):  # cheap screen before the cut
            continue
        ids, start = _cut(tok, text, starts, i, context, chars_per_token)
        if len(ids) < context * 0.95 or not _far_identifier(text, start, starts[i], line, near_chars):
            continue
        out.append(CodeLine(ids, line, *where[i]))
        if len(out) == count:
            return out
    raise ValueError(f"only {len(out)} code lines of {count} fit context {context}")
