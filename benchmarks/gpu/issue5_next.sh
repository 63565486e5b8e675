#!/bin/bash
# Issue 5's next H100 runs, after the wheel parts are staged and (for "trace") SmolLM2 is staged
# (benchmarks/gpu/stage_smollm2.sh) and .stage/stdlib311 copied to /root/stdlib311. Each step fits one device call:
#   bash benchmarks/gpu/issue5_next.sh capacity   # 10 x 96k with 8k chunks: the pool holds 10 (3.33x stock's 3)
#   bash benchmarks/gpu/issue5_next.sh trace      # SmolLM2's real selections, replayed with R_l = r x k_b(l)
# A fresh machine compiles the asynctls Triton kernels during CUDA-graph capture (~90 s for the first batch size):
# the capacity run waits up to 600 s for the server.
set -u
source /root/stage/p2/scripts/env.sh
export PYTHONPATH=$PWD:${PYTHONPATH:-}
case ${1:-} in
  capacity)
    cd benchmarks && timeout 590 python3 offload_capacity.py run --label asynctls_host_tier_8k_chunks --requests 10 \
      --output-len 200 --ready-timeout 600 --request-timeout 480 --out "$OUT/cap_host10.json" -- --enable-asynctls \
      --asynctls-host-kv-gib 96 --max-running-requests 16 2>&1 | grep -v "Request is disconnected" | tail -30 ;;
  trace)
    export ASYNCTLS_STDLIB=/root/stdlib311 ASYNCTLS_SMOLLM2_GGUF=/root/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
    (cd benchmarks && timeout 330 python3 offload_locality.py --modules typing.py --trace /root/t.pt \
      --harness-args '--device cuda' --out "$OUT/offload_locality_smollm2_gpu.json" 2>&1 | tail -4)
    timeout 240 python3 benchmarks/offload_engine.py --trace /root/t.pt --name offload_engine_smollm2_trace_h100 \
      --out "$OUT" 2>&1 | tail -25 ;;
  *) echo "usage: $0 capacity|trace"; exit 2 ;;
esac
