"""`--enable-asynctls` under SGLang's tensor parallelism, `--tp N` against `--tp 1` on one host.

    python3 benchmarks/tp_check.py parity --tp 1 2        # SmolLM2 real weights: greedy outputs, stock and asynctls
    python3 benchmarks/tp_check.py speed --tp 1 2         # dummy Qwen3-8B decode tok/s, 96k x batch 4
    python3 benchmarks/tp_check.py summarize --tp 1 2 --json $OUT/tp_h200x2.json   (+ tp_h200x2.png)
`all` runs the three in one call; `--dry-run` prints every command instead. Each run leaves its raw record in
--work (default /root/tp_check), which survives between device calls while the host is up, so the steps can be
split over calls (each must end within the 10-minute limit): a run with a result is skipped (--force redoes it), a
failed one is kept as `<record>.error` and goes again.

Parity: servers started as benchmarks/server_parity.py starts them (its prompts: 8 short prompts x 32 greedy
tokens, three ~6k-token passkeys, a second turn sharing the first's prefix), with the asynctls flags of
server_parity_smollm2_h100.json (`--asynctls-dense-below 2048`, so the passkeys decode sparse) plus `--tp N`, and
the same with stock `--attention-backend triton` (stock's own tp N vs tp 1 agreement: TP reorders the all-reduce
sums, so bf16 logits may differ in the last bits; a stock mismatch says how much of an asynctls one is SGLang's).

Why SmolLM2 is padded. Stock SGLang 0.5.17 cannot run SmolLM2-135M at `--tp 2`: `LlamaAttention` asserts
`num_heads % tp_size == 0` and SmolLM2 has 9 query heads and 3 KV heads. `--enable-dp-attention --dp 2` does not
help: llama.py splits heads by `get_parallel().tp_size` (the full TP size), not by the attention TP size that DP
attention lowers (qwen3.py and deepseek_v2.py use `attn_tp_size`; llama.py does not), and with an attention TP size
of 1 no head would be split anyway. So `pad_heads` writes an equivalent model: KV heads padded to a multiple of the
largest TP size (3 -> 4 for tp 2) by copying the last real KV head, query heads padded by the same group size
(9 -> 12) with zero q rows and zero o_proj columns. A padded query head attends with q = 0 (finite output) and its
output is multiplied by zero columns, so the model computes SmolLM2's function; the group structure (query head h
reads KV head h // 3) is kept, so rank 0 holds real KV heads 0-1 and rank 1 real KV head 2 plus the copy. The
calibrated heavy channels are padded the same way (`--asynctls-channel-config`), so rank 1 indexes with rows 2-3
of the table (the slice under test). Limits: tp 1 and tp N both serve the padded model; it is compared with the
unpadded stock outputs of server_parity_smollm2_h100.json (another GPU) for information only. Qwen3-8B (32 query,
8 KV heads) needs no padding.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import e2e_throughput as e2e  # noqa: E402
import server_parity as parity  # noqa: E402
from server_parity import environment  # noqa: E402

ROOT = os.path.dirname(HERE)
PARITY_FLAGS = {
    "stock": ["--attention-backend", "triton"],
    # as in benchmarks/results/server_parity_smollm2_h100.json; the padded channel table is added per run
    "asynctls": ["--enable-asynctls", "--asynctls-dense-below", "2048", "--asynctls-block-budget", "32",
                 "--asynctls-token-budget", "512", "--asynctls-label-channels", "16"],
}
CHANNELS = os.path.join(ROOT, "sglang_asynctls", "data", "smollm2_channels.json")
REFERENCE = os.path.join(HERE, "results", "server_parity_smollm2_h100.json")
PAD_RECORD = "asynctls_tp_padding.json"
# the device host keeps NVLink multicast off (it can take the shared GPUs down); keep it so in every child
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
UNSAFE_FLAGS = ("--enable-nccl-nvls", "--enable-symm-mem", "--enable-torch-symm-mem")


# ---------------------------------------------------------------------------------------------- padded SmolLM2
def padded_counts(num_heads: int, num_kv_heads: int, tp: int):
    """(query heads, KV heads) after padding KV heads to a multiple of tp at the same group size."""
    kv = -(-num_kv_heads // tp) * tp
    return kv * (num_heads // num_kv_heads), kv


def pad_heads(state: dict, cfg: dict, tp: int):
    """An equivalent Llama state dict and config whose head counts split over `tp` ranks (see module docstring).
    state: HF names, q/k/v_proj weight [heads * head_dim, hidden], o_proj weight [hidden, heads * head_dim]."""
    import torch

    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // h
    h2, kv2 = padded_counts(h, kv, tp)
    out = dict(state)
    for name, t in state.items():
        if ".self_attn." not in name:
            continue
        if ".q_proj." in name:  # zero rows: a padded query head has q = 0
            out[name] = torch.cat([t, t.new_zeros(((h2 - h) * d, *t.shape[1:]))])
        elif ".k_proj." in name or ".v_proj." in name:  # copies of the last real KV head: finite, real-like keys
            out[name] = torch.cat([t] + [t[(kv - 1) * d:kv * d]] * (kv2 - kv))
        elif ".o_proj.weight" in name:  # zero columns: a padded head's output is dropped
            out[name] = torch.cat([t, t.new_zeros((t.shape[0], (h2 - h) * d))], dim=1)
    return out, {**cfg, "num_attention_heads": h2, "num_key_value_heads": kv2, "head_dim": d}


def pad_channels(table: dict, num_kv_heads: int) -> dict:
    """The calibration JSON for the padded KV heads: each copy of the last KV head takes that head's channels."""
    rows = [layer + [layer[-1]] * (num_kv_heads - len(layer)) for layer in table["channels"]]
    return {**table, "num_kv_heads": num_kv_heads, "channels": rows,
            "padded_for_tensor_parallel": f"KV heads {len(table['channels'][0])} -> {num_kv_heads}"}


def write_padded_model(src: str, dst: str, tp: int) -> dict:
    """Padded copy of the SmolLM2 safetensors dir (`benchmarks/gpu/model_dirs.py smollm2`) with its channel table."""
    from safetensors.torch import load_file, save_file

    record_path = os.path.join(dst, PAD_RECORD)
    if os.path.exists(record_path) and json.load(open(record_path)).get("tp") == tp:
        return json.load(open(record_path))
    cfg = json.load(open(os.path.join(src, "config.json")))
    state, cfg2 = pad_heads(load_file(os.path.join(src, "model.safetensors")), cfg, tp)
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name not in ("config.json", "model.safetensors") and os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), dst)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(dst, "model.safetensors"))
    json.dump(cfg2, open(os.path.join(dst, "config.json"), "w"), indent=1)
    json.dump(pad_channels(json.load(open(CHANNELS)), cfg2["num_key_value_heads"]),
              open(os.path.join(dst, "asynctls_channels.json"), "w"))
    record = {"src": src, "tp": tp, "heads": [cfg["num_attention_heads"], cfg2["num_attention_heads"]],
              "kv_heads": [cfg["num_key_value_heads"], cfg2["num_key_value_heads"]]}
    json.dump(record, open(record_path, "w"))
    return record


# ---------------------------------------------------------------------------------------------- the runs
def parity_runs(args) -> list:
    """(label, tp, server flags) of every parity server, in run order."""
    runs = []
    for tp in args.tp:
        for method in args.methods:
            flags = list(PARITY_FLAGS[method])
            if method == "asynctls":
                flags += ["--asynctls-channel-config", os.path.join(args.padded, "asynctls_channels.json")]
            runs.append((f"{method}_tp{tp}", tp, flags + ["--tp-size", str(tp)]))
    return runs


def speed_runs(args) -> list:
    """(label, tp, method, batch, input_len) of every bench_one_batch run."""
    return [(f"{m}_tp{tp}_b{b}_n{n}", tp, m, b, n) for tp in args.tp for m in args.speed_methods
            for b, n in (map(int, p.split("x")) for p in args.points)]


def cmd_parity(args) -> None:
    pad_tp = max(args.tp + [2])
    if args.dry_run:
        print(f"# pad {args.smollm2} -> {args.padded} (heads for tp {pad_tp}), then per server: server_parity.run")
    else:
        print(json.dumps(write_padded_model(args.smollm2, args.padded, pad_tp)))
    for label, tp, flags in parity_runs(args):
        out = os.path.join(args.work, f"parity_{label}.json")
        if args.dry_run:
            print(f"# parity {label} -> {out}\n" + " ".join(parity.server_cmd(args.padded, flags)))
            continue
        if os.path.exists(out) and not args.force:
            print("have", out)
            continue
        run = argparse.Namespace(label=label, out=out, model=args.padded, long_tokens=args.long_tokens,
                                 ready_timeout=args.ready_timeout, server_args=flags)
        try:
            parity.run(run)
        except Exception as e:  # noqa: BLE001 (recorded; the next configuration still runs)
            json.dump({"label": label, "error": f"{type(e).__name__}: {e}"[-4000:]}, open(out + ".error", "w"))
            print("FAILED", label, str(e)[-1500:])
        _reap_strays()


def cmd_speed(args) -> None:
    for label, tp, method, b, n in speed_runs(args):
        out, raw = (os.path.join(args.work, f"speed_{label}.{ext}") for ext in ("json", "raw.jsonl"))
        common = ["--tp-size", str(tp), *args.bench_args]
        if args.dry_run:
            print(f"# speed {label} -> {out}\n"
                  + " ".join(e2e.one_batch_cmd(method, b, n, args.model, raw, args.asynctls_args, common)))
            continue
        if os.path.exists(out) and not args.force:
            print("have", out)
            continue
        if os.path.exists(raw):  # a stale line would pass for this run's result (tp > 1 exits 0 on a rank crash)
            os.remove(raw)
        try:
            row = e2e.run_point(method, b, n, args.model, raw, args.timeout, args.asynctls_args, common=common)
        except subprocess.TimeoutExpired as e:  # recorded as a failed run; its ranks are reaped below
            tail = e.output.decode(errors="replace") if isinstance(e.output, bytes) else (e.output or "")
            row = {"method": method, "batch": b, "input_len": n, "error": f"timed out after {e.timeout} s",
                   "tail": tail[-3000:]}
        row["tp"] = tp  # a run without a result is kept as .error and goes again on the next call
        json.dump(row, open(out if row.get("median_decode_tok_s") else out + ".error", "w"), indent=1)
        print(json.dumps({k: v for k, v in row.items() if k not in ("command", "tail", "log")}))
        if "tail" in row:
            print(row["tail"][-1500:])
        _reap_strays()


def _reap_strays() -> None:
    """Kill what our runs left in this script's process group (e.g. TP ranks orphaned by a timeout), so the next
    server finds the GPUs free. Only when this script leads its own group (main() makes it so)."""
    import signal

    me = os.getpid()
    if os.getpgrp() != me:
        return
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            try:
                if os.getpgid(int(name)) == me:
                    os.kill(int(name), signal.SIGKILL)
                    print("killed stray process", name)
            except (ProcessLookupError, PermissionError):
                pass
    time.sleep(3)


# ---------------------------------------------------------------------------------------------- summary
def compare_outputs(base: dict, other: dict) -> dict:
    """Greedy outputs of two parity runs (server_parity records), prompt by prompt."""
    short = [x == y for x, y in zip(base["short"], other["short"])]
    long = [x == y for x, y in zip(base["long"], other["long"])]
    same = len(short) == len(base["short"]) == len(other["short"]) and len(long) == len(base["long"])
    return {"identical": same and all(short) and all(long) and base["turn2"] == other["turn2"],
            "short_identical": sum(short), "short_total": len(short), "long_equal": long,
            "turn2_equal": base["turn2"] == other["turn2"],
            "passkey_found": _passkeys(other)}


def _load(path: str):
    for p in (path, path + ".error"):
        if os.path.exists(p):
            return json.load(open(p))
    return None


def _tok_s(speed: dict, tp: int, method: str, b: int, n: int):
    row = speed.get(f"{method}_tp{tp}_b{b}_n{n}") or {}
    return row.get("median_decode_tok_s")


def _passkeys(record: dict) -> list:
    return [k in o for k, o in zip(record["keys"], record["long"])]


def summarize_runs(parity_records: dict, speed_rows: dict, tps: list, points: list, reference=None) -> dict:
    """The issue's summary keys from the raw records, named for the largest tp (tp2_* for --tp 1 2 and for a
    --tp 1 run, where they stay None)."""
    n_tp = max(tps + [2])
    summary = {}
    for method in ("asynctls", "stock"):
        one, many = parity_records.get(f"{method}_tp1"), parity_records.get(f"{method}_tp{n_tp}")
        ok = all(r is not None and "error" not in r for r in (one, many))
        cmp = compare_outputs(one, many) if ok else None
        prefix = "" if method == "asynctls" else "stock_"
        summary[f"{prefix}tp{n_tp}_outputs_match_tp1"] = cmp["identical"] if cmp else None
        summary[f"{prefix}tp{n_tp}_vs_tp1"] = cmp
    for tp in sorted(set(tps + [1, n_tp])):
        rec = parity_records.get(f"asynctls_tp{tp}")
        if rec and "error" not in rec:
            summary[f"tp{tp}_passkey_found"] = _passkeys(rec)
    for b, n in (map(int, p.split("x")) for p in points):
        key = f"{n // 1024}k_b{b}"
        for tp in sorted(set(tps + [n_tp])):
            summary[f"tp{tp}_decode_tok_s_{key}"] = _tok_s(speed_rows, tp, "asynctls", b, n)
        one, many = summary[f"tp1_decode_tok_s_{key}"], summary[f"tp{n_tp}_decode_tok_s_{key}"]
        summary[f"tp{n_tp}_decode_speedup_{key}"] = round(many / one, 3) if one and many else None
    stock1 = parity_records.get("stock_tp1")
    if reference and stock1 and "error" not in stock1:  # informational: padded model vs unpadded, other GPU
        summary["padded_tp1_stock_vs_unpadded_reference"] = compare_outputs(reference, stock1)
    summary["failed_runs"] = sorted(k for k, r in parity_records.items() if r and "error" in r) + sorted(
        k for k, r in speed_rows.items() if r.get("median_decode_tok_s") is None)
    return summary


def cmd_summarize(args) -> None:
    records = {label: _load(os.path.join(args.work, f"parity_{label}.json")) for label, _, _ in parity_runs(args)}
    speed = {label: _load(os.path.join(args.work, f"speed_{label}.json")) for label, *_ in speed_runs(args)}
    speed = {k: v for k, v in speed.items() if v is not None}
    reference = json.load(open(REFERENCE))["stock"] if os.path.exists(REFERENCE) else None
    summary = summarize_runs(records, speed, args.tp, args.points, reference)
    padded = _load(os.path.join(args.padded, PAD_RECORD))
    result = {"benchmark": "tp_check", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
              **environment(), "config": {"tp": args.tp, "parity_model": args.padded, "padding": padded,
                                        "parity_flags": {lab: fl for lab, _, fl in parity_runs(args)},
                                        "speed_model": args.model, "speed_common_flags": e2e.COMMON,
                                        "asynctls_args": args.asynctls_args, "bench_args": args.bench_args},
              "parity": records, "speed": speed, "summary": summary}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    json.dump(result, open(args.json, "w"), indent=1)
    _plot(summary, speed, args, args.json.rsplit(".", 1)[0] + ".png")
    print(json.dumps(summary, indent=1))


def _plot(summary: dict, speed: dict, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [lab for lab, *_ in speed_runs(args)]
    ax.bar(range(len(labels)), [(speed.get(lab) or {}).get("median_decode_tok_s") or 0 for lab in labels])
    ax.set_xticks(range(len(labels)), [lab.replace("_", "\n", 2) for lab in labels], fontsize=7)
    ax.set_ylabel("decode tokens/s (median)")
    ax.set_title("dummy Qwen3-8B, bench_one_batch", fontsize=9)
    n_tp = max(args.tp + [2])
    rows = [(m, summary.get(f"{p}tp{n_tp}_vs_tp1")) for m, p in (("asynctls", ""), ("stock", "stock_"))]
    for i, (m, c) in enumerate(rows):
        if c:
            bx.bar([i * 3, i * 3 + 1], [c["short_identical"] / max(1, c["short_total"]),
                                        sum(c["long_equal"]) / max(1, len(c["long_equal"]))], label=m)
    bx.set_xticks([0, 1, 3, 4], ["short", "passkey", "short", "passkey"])
    bx.set_ylim(0, 1.05)
    bx.set_ylabel(f"fraction of greedy outputs identical, tp {n_tp} vs tp 1")
    bx.set_title("SmolLM2 (heads padded), server greedy outputs", fontsize=9)
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="TP sizes; 1 is the reference")
    common.add_argument("--work", default="/root/tp_check", help="raw records, one file per run")
    common.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    common.add_argument("--force", action="store_true", help="redo runs whose record exists")
    common.add_argument("--methods", nargs="+", default=["stock", "asynctls"], choices=list(PARITY_FLAGS))
    common.add_argument("--smollm2", default=os.environ.get("SMOLLM2_DIR", "/root/smollm2"))
    common.add_argument("--padded", default="/root/smollm2_tp", help="where the padded SmolLM2 is written")
    common.add_argument("--long-tokens", type=int, default=6000)
    common.add_argument("--ready-timeout", type=float, default=420)
    common.add_argument("--model", default=os.environ.get("MODEL", "/root/qwen3_8b_dummy"))
    common.add_argument("--points", nargs="+", default=["4x98304"], help="BATCHxINPUT_LEN for the speed runs")
    common.add_argument("--speed-methods", nargs="+", default=["asynctls"], choices=list(e2e.METHOD_ARGS))
    common.add_argument("--asynctls-args", nargs="*", default=[])
    common.add_argument("--bench-args", nargs="*", default=[], help="more bench_one_batch flags, every run")
    common.add_argument("--timeout", type=int, default=540, help="seconds per bench_one_batch run")
    common.add_argument("--json", default="/root/tp_check/tp_check.json", help="summary file (+ .png)")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("parity", "speed", "summarize", "all"):
        sub.add_parser(name, parents=[common])
    args = p.parse_args(argv)
    if 1 not in args.tp:
        p.error("--tp must include 1 (the reference)")
    unsafe = [f for f in args.asynctls_args + args.bench_args if f in UNSAFE_FLAGS]
    if unsafe:
        p.error(f"{unsafe[0]} uses NVLink multicast, which the device host keeps off")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    for k, v in SAFE_ENV.items():
        os.environ[k] = v
    if not args.dry_run and args.cmd != "summarize":
        os.makedirs(args.work, exist_ok=True)
        try:  # our servers and ranks share this group: _reap_strays can find what a timeout orphans
            os.setpgrp()
        except OSError:  # a session leader cannot move; _reap_strays then does nothing
            pass
    if args.cmd in ("parity", "all"):
        cmd_parity(args)
    if args.cmd in ("speed", "all"):
        cmd_speed(args)
    if args.cmd in ("summarize", "all") and not args.dry_run:
        cmd_summarize(args)


if __name__ == "__main__":
    main()
