"""The launch matrix as data: which servers launch_matrix.py starts, with which flags, what each must show, and the
summary of what they did. Pure (no server, no GPU), so the CPU tests check it.

Cells: {smollm2, qwen3, glm8} x {default, page1, host} x {memdef, mem95}, each `--enable-asynctls`; stock runs once
per {model, page size, memory fraction} (same flags minus the AsyncTLS ones) and host-tier cells compare against the
default stock cell; refusal cells are combinations that cannot work and must be refused at launch in one line.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

COMMON = ["--cuda-graph-max-bs", "8"]  # stock and asynctls alike: fewer decode graphs to capture, a shorter start
SHORT_TOKENS, NEW_TOKENS = 24, 16


@dataclass(frozen=True)
class Model:
    name: str
    path: str  # on the GPU host (benchmarks/gpu/model_dirs.py, host.sh smollm2)
    long_tokens: int  # the long request: more than the server's --asynctls-dense-below, so it decodes sparsely
    flags: Tuple[str, ...] = ()  # stock and asynctls alike
    asynctls_flags: Tuple[str, ...] = ()


MODELS = {m.name: m for m in (
    # real weights; context 8192, so the sparse path starts at 2048 here instead of the default 8192
    Model("smollm2", "/root/smollm2", 4096, asynctls_flags=("--asynctls-dense-below", "2048")),
    Model("qwen3", "/root/qwen3_8b_fullvocab", 10000, flags=("--load-format", "dummy")),
    # GLM-4.7-Flash's MLA + MoE shape cut to 8 layers; its dir borrows the Qwen3 tokenizer (151,936 ids) while the
    # model emits ids up to 154,880, so the server takes and returns ids only
    Model("glm8", "/root/glm8", 10000, flags=("--load-format", "dummy", "--skip-tokenizer-init")),
)}


@dataclass(frozen=True)
class Config:
    name: str
    flags: Tuple[str, ...]  # stock and asynctls alike
    asynctls_flags: Tuple[str, ...]
    stock: str  # the stock config this one is compared with


CONFIGS = {c.name: c for c in (
    Config("default", (), (), "default"),
    # per-request block rows at page size 1 cost request rows x context / 64 rows a layer: SGLang's default
    # (>= 2,048 rows) does not fit for Qwen3-8B or GLM (see the refusal cell), 16 rows do
    Config("page1", ("--page-size", "1", "--max-running-requests", "16"), (), "page1"),
    # docs/offload.md: the tier needs only its size; auto picks the Triton inner backend it requires
    Config("host", (), ("--asynctls-host-kv-gib", "8"), "default"),
)}
MEMS = {"memdef": (), "mem95": ("--mem-fraction-static", "0.95")}


@dataclass(frozen=True)
class Refusal:
    name: str
    model: str
    flags: Tuple[str, ...]
    expect: str  # the documented refusal, a substring of the one line the launch must end with


REFUSALS = (
    # patches/server_args_from_cli.py::_check_host_tier, in the launcher
    Refusal("refuse.smollm2.hostcache-no-mrr", "smollm2",
            ("--asynctls-host-kv-gib", "1", "--asynctls-host-cache-tokens", "256"),
            "--asynctls-host-cache-tokens needs --max-running-requests"),
    # patches/server_args_from_cli.py::_check_request_rows, in the launcher: 2,049 request rows x 2,048 blocks of
    # block bounds (576 GiB) do not fit the GPU
    Refusal("refuse.qwen3.page1-default-rows", "qwen3", ("--page-size", "1"),
            "asynctls at --page-size 1 keeps block bounds per request row"),
)


@dataclass(frozen=True)
class Cell:
    name: str
    kind: str  # "asynctls", "stock" or "refusal"
    model: str
    config: str = ""
    mem: str = ""
    flags: Tuple[str, ...] = ()
    expect: Optional[str] = None  # refusal cells
    stock_ref: Optional[str] = None  # asynctls cells: the stock cell whose free memory they are compared with


def cell_name(kind: str, model: str, config: str, mem: str) -> str:
    return f"{kind}.{model}.{config}.{mem}"


def build_cells(models: Dict[str, Model] = MODELS) -> List[Cell]:
    """Every cell, in run order: per model its stock cells, then its asynctls cells, then its refusals."""
    cells = []
    for m in models.values():
        for stock_cfg in sorted({c.stock for c in CONFIGS.values()}):
            for mem, mem_flags in MEMS.items():
                flags = (*m.flags, *CONFIGS[stock_cfg].flags, *mem_flags, *COMMON)
                cells.append(Cell(cell_name("stock", m.name, stock_cfg, mem), "stock", m.name, stock_cfg, mem, flags))
        for cfg in CONFIGS.values():
            for mem, mem_flags in MEMS.items():
                flags = (*m.flags, *cfg.flags, *mem_flags, *COMMON, "--enable-asynctls", *m.asynctls_flags,
                         *cfg.asynctls_flags)
                cells.append(Cell(cell_name("asynctls", m.name, cfg.name, mem), "asynctls", m.name, cfg.name, mem,
                                  flags, stock_ref=cell_name("stock", m.name, cfg.stock, mem)))
        for r in REFUSALS:
            if r.model == m.name:
                cells.append(Cell(r.name, "refusal", m.name, flags=(*m.flags, *COMMON, "--enable-asynctls",
                                                                    *m.asynctls_flags, *r.flags), expect=r.expect))
    return cells


def select(cells: List[Cell], only: Optional[str]) -> List[Cell]:
    """--only: comma-separated shell patterns over cell names; a pattern that matches nothing is an error."""
    if not only:
        return list(cells)
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    for p in patterns:
        if not any(fnmatch.fnmatchcase(c.name, p) for c in cells):
            raise ValueError(f"--only: {p!r} matches no cell")
    return [c for c in cells if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]


def pending(cells: List[Cell], recorded: Dict[str, dict], retry_failed: bool = False) -> List[Cell]:
    """--resume: the cells without a record (and, with retry_failed, those that failed)."""
    return [c for c in cells if c.name not in recorded
            or (retry_failed and recorded[c.name].get("status") != "passed")]


def refusal_verdict(cell: Cell, outcome: str, returncode, log_text: str, stop: dict) -> List[str]:
    """Why a refusal cell failed ([] = passed): the launch must end before ready, nonzero, with the documented
    text, in one line (no traceback), leaving nothing behind."""
    why = [] if stop.get("clean") else [f"left something behind: {stop}"]
    if outcome != "exited":
        why.append(f"not refused: {outcome}")
    elif returncode == 0:
        why.append("exited 0")
    if cell.expect not in log_text:
        why.append(f"refusal text missing: {cell.expect!r}")
    if "Traceback" in log_text:
        why.append("refused with a traceback, not one line")
    return why


DENSE_BELOW = re.compile(r"dense_below=(\d+)")


def dense_below_of(server_info: Optional[dict], log_text: str) -> Tuple[Optional[int], str]:
    """The server's --asynctls-dense-below: from /server_info (patches/pool_usage.py), else from the backend's
    config line in the log."""
    for state in (server_info or {}).get("internal_states") or []:
        value = ((state or {}).get("asynctls") or {}).get("config", {}).get("dense_below")
        if value is not None:
            return int(value), "server_info"
    m = DENSE_BELOW.search(log_text)
    return (int(m.group(1)), "log") if m else (None, "absent")


def long_path(prompt_tokens: Optional[int], dense_below: Optional[int]) -> Optional[str]:
    """Which decode path the long request took: the backend decodes sparsely every row of >= dense_below tokens."""
    if prompt_tokens is None or dense_below is None:
        return None
    return "sparse" if prompt_tokens >= dense_below else "dense"


def served_verdict(cell: Cell, record: dict) -> List[str]:
    """Why a started cell failed ([] = passed)."""
    why = []
    if record.get("outcome") != "ready":
        return [f"not ready: {record.get('outcome')}"]
    for key in ("short", "long"):
        r = record.get(key) or {}
        if r.get("error") or r.get("completion_tokens") != NEW_TOKENS:
            why.append(f"{key} request: {r.get('error') or r.get('completion_tokens')}")
    if cell.kind == "asynctls" and record.get("long_path") != "sparse":
        why.append(f"long request not sparse: {record.get('long_path')}")
    stop = record.get("stop") or {}
    if not stop.get("clean"):
        why.append(f"unclean shutdown: {stop}")
    return why


@dataclass
class Summary:
    launch_passed: int = 0
    launch_total: int = 0
    stock_passed: int = 0
    stock_total: int = 0
    max_free_mem_gap_gb: Optional[float] = None
    free_mem_gaps_gb: Dict[str, float] = field(default_factory=dict)
    failed: List[str] = field(default_factory=list)
    not_run: List[str] = field(default_factory=list)


def summarize(cells: List[Cell], recorded: Dict[str, dict]) -> dict:
    """launch_* count asynctls and refusal cells of the whole matrix (a cell not run is not passed); the gap is
    stock's free GPU memory at ready minus asynctls's, GiB (nvidia-smi MiB / 1024), over cells where both ran."""
    s = Summary()
    for c in cells:
        rec = recorded.get(c.name)
        ours = c.kind != "stock"
        s.launch_total += ours
        s.stock_total += not ours
        if rec is None:
            s.not_run.append(c.name)
            continue
        if rec.get("status") == "passed":
            s.launch_passed += ours
            s.stock_passed += not ours
        else:
            s.failed.append(c.name)
        stock = recorded.get(c.stock_ref or "", {})
        if c.kind == "asynctls" and rec.get("gpu_free_gib_at_ready") is not None \
                and stock.get("gpu_free_gib_at_ready") is not None:
            s.free_mem_gaps_gb[c.name] = round(stock["gpu_free_gib_at_ready"] - rec["gpu_free_gib_at_ready"], 2)
    if s.free_mem_gaps_gb:
        s.max_free_mem_gap_gb = max(s.free_mem_gaps_gb.values())
    out = s.__dict__.copy()
    out["free_mem_gap_goal_met"] = s.max_free_mem_gap_gb <= 1.0 if s.max_free_mem_gap_gb is not None else None
    return out
