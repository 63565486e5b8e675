"""Why the coarse stage loses a needle: per layer and KV head, the needle block's rank under the min/max bound
(`reference.block_scores`) against its rank under the true max of the group-summed q.k, for the query that
predicts the pass key's second digit (teacher-forced over a dense prefill of prompt + answer).

    python benchmarks/fidelity_blockrank.py [--context 1024] [--depth 0.05] [--seed 1024] [--block-size 64]

Prints heads that put >= 5% of their dense attention on the needle; rank 0 = the best-scored complete block.
"""

import argparse

import torch

from sglang_asynctls import fidelity as fd
from sglang_asynctls import needles, smollm2
from sglang_asynctls import reference as ref
from sglang_asynctls.demo import packaged_channels


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--depth", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=64)
    args = p.parse_args(argv)
    model, tok = smollm2.load_model(), smollm2.load_tokenizer()
    task = needles.passkey(tok, args.context, args.depth, seed=args.seed)
    answer = torch.tensor(tok(" " + task.questions[0][1]).input_ids)
    ids = torch.cat([task.prompt(0), answer])
    start = task.needle_positions[0]
    needle = torch.arange(start, start + len(tok(f"\nThe pass key is {task.questions[0][1]}. Remember it. "
                                                  f"{task.questions[0][1]} is the pass key.\n").input_ids))
    bs, at = args.block_size, len(task.prompt(0)) + 1  # the query at `at` predicts the 2nd digit
    budget = fd.Budget.fraction_of(args.context, 8, block_size=bs)
    print(f"needle tokens {needle[0]}..{needle[-1]} (blocks {sorted(set((needle // bs).tolist()))}), "
          f"k_b = {budget.block_budget} of {(at + 1) // bs} complete blocks")
    g, hkv, d = model.shape.group_size, model.shape.num_kv_heads, model.shape.head_dim

    def probe(layer, q, kv):
        qg = q[at].view(hkv, g, d)
        logits = torch.einsum("hgd,lhd->hgl", qg, kv.k[layer][: at + 1]) / d ** 0.5
        mass = torch.softmax(logits, -1)[..., needle].sum(-1).mean(-1)  # [Hkv]
        idx = kv.index[layer]
        bound = ref.block_scores(q[at:at + 1], idx.kmin, idx.kmax, idx.table, torch.tensor([at + 1]), bs)[0]
        nbk = (at + 1) // bs
        true = logits.sum(1)[:, : nbk * bs].view(hkv, nbk, bs).amax(-1)
        cells = []
        for h in range(hkv):
            if mass[h] >= 0.05:
                blocks = sorted(set((needle // bs).tolist()))
                rb = [int((bound[h, :nbk] > bound[h, j]).sum()) for j in blocks]
                rt = [int((true[h] > true[h, j]).sum()) for j in blocks]
                cells.append(f"kv{h} mass {mass[h]:.2f} bound-rank {rb} true-rank {rt}")
        if cells:
            print(f"layer {layer:2d}: " + " | ".join(cells))

    fd.DocumentKV(model, ids, packaged_channels(model, 32), extra=1, block_size=bs, probe=probe)


if __name__ == "__main__":
    main()
