#!/bin/bash
# Issue 3 A/B on the H100: the kernel paths behind a module switch, each alone and all together, against the
# defaults; MLA and GQA at 96k x 8, k_t 1024. Writes $OUT/issue3_ab_VARIANT.json. "tests" first checks every such
# path in bf16 against the reference (tests/test_kernels_decode.py -k switched_paths). A variant takes about a
# minute, so split them over device calls (10 min each), e.g.
#   bash benchmarks/gpu/issue3_ab.sh tests default persistent narrow prefetch
#   bash benchmarks/gpu/issue3_ab.sh recompute all all_pdl
# then benchmarks/issue3_ab_report.py consolidates the files (results/issue3_ab_h100.json, run at build 6c1ade9,
# when the narrow search was still off by default). It is on by default since: "default" and "narrow" now time the
# same kernels, and "full_search" times the narrow search off.
set -u
source /root/stage/p2/scripts/env.sh
export PYTHONPATH=$PWD:${PYTHONPATH:-}
ALL=(--kernel-option block_scores.WIDE_PERSISTENT=True --kernel-option select_blocks.NARROW_BITS=8
     --kernel-option select_tokens.PREFETCH_SLOTS=True --wide-group-combine recompute)
for v in "$@"; do
  case $v in
    tests) timeout 300 python3 -m pytest -q tests/test_kernels_decode.py -m gpu -k switched_paths 2>&1 | tail -5
           continue ;;
    default) flags=() ;;
    persistent) flags=(--kernel-option block_scores.WIDE_PERSISTENT=True) ;;
    narrow) flags=(--kernel-option select_blocks.NARROW_BITS=8) ;;
    full_search) flags=(--kernel-option select_blocks.NARROW_BITS=0) ;;
    prefetch) flags=(--kernel-option select_tokens.PREFETCH_SLOTS=True) ;;
    recompute) flags=(--wide-group-combine recompute) ;;
    all|all_pdl) flags=("${ALL[@]}") ;;
    *) echo "unknown variant $v"; exit 2 ;;
  esac
  pdl=0; [ "$v" = all_pdl ] && pdl=1
  echo "== $v"
  SGLANG_ASYNCTLS_PDL=$pdl timeout 170 python3 benchmarks/op_latency.py --models mla,gqa --contexts 98304 \
    --batches 8 --token-budgets 1024 --iters 20 --out "$OUT" --name "issue3_ab_$v" "${flags[@]}" 2>&1 | tail -4 \
    | cut -c1-600
done
