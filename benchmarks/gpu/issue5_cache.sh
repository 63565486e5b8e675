#!/bin/bash
# Issue 5, the host-row cache on the H100 (after the wheel parts are staged; "parity" also needs SmolLM2 staged by
# benchmarks/gpu/stage_smollm2.sh and the stock SmolLM2 run at /root/stock.json). One device call each:
#   bash benchmarks/gpu/issue5_cache.sh tests      # bf16 GPU tests of the cache, sparse decode, host tier, stats
#   bash benchmarks/gpu/issue5_cache.sh parity     # SmolLM2 with most KV in host slots and the cache on, vs stock
#   bash benchmarks/gpu/issue5_cache.sh cache      # 10 x 96k dummy Qwen3-8B, host tier + cache (R = 2048)
#   bash benchmarks/gpu/issue5_cache.sh nocache    # the same without the cache
#   bash benchmarks/gpu/issue5_cache.sh stock      # stock SGLang (FlashInfer) with the same prompts
#   bash benchmarks/gpu/issue5_cache.sh cache_n N GIB  # N x 96k, GIB of host tier, cache on, N + 1 request rows
# A fresh machine compiles the asynctls Triton kernels during CUDA-graph capture: servers get 600 s to be ready.
set -u
source /root/stage/p2/scripts/env.sh
export PYTHONPATH=$PWD:${PYTHONPATH:-}
HOST=(--enable-asynctls --asynctls-host-kv-gib 96 --max-running-requests 10)
cap() {  # label, requests, server flags...
  local label=$1 n=$2; shift 2
  (cd benchmarks && timeout 590 python3 offload_capacity.py run --label "$label" --requests "$n" --output-len 160 \
    --ready-timeout 420 --request-timeout 560 --out "$OUT/cap_$label.json" -- "$@" 2>&1 \
    | grep -v "Request is disconnected" | tail -32)
  cp "$OUT/cap_$label.json.log" "$OUT/cap_${label}_server.log" 2>/dev/null
  grep "asynctls host reads" "$OUT/cap_${label}_server.log" | tail -8
}
case ${1:-} in
  tests)
    timeout 500 python3 -m pytest -p no:cacheprovider -q tests/test_offload_host_cache.py tests/test_host_stats.py \
      tests/test_offload_host_tier.py tests/test_kernels_attention.py tests/test_backend_cpu.py 2>&1 | tail -15 ;;
  parity)
    export ASYNCTLS_STDLIB=/root/stdlib311 ASYNCTLS_SMOLLM2_GGUF=/root/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
    timeout 400 python3 benchmarks/server_parity.py run --label asynctls_host_cache --out /root/hc.json -- \
      --enable-asynctls --asynctls-host-kv-gib 1 --max-total-tokens 4096 --asynctls-dense-below 2048 \
      --asynctls-block-budget 32 --asynctls-token-budget 512 --asynctls-label-channels 16 \
      --asynctls-host-cache-tokens 1024 --max-running-requests 8 --decode-log-interval 4 2>&1 | tail -6
    cp /root/hc.json "$OUT/server_parity_smollm2_host_cache_h100_run.json"
    cp /root/hc.json.log "$OUT/server_parity_smollm2_host_cache_h100_server.log" 2>/dev/null
    grep "asynctls host reads" /root/hc.json.log | tail -5
    python3 benchmarks/server_parity.py compare /root/stock.json /root/hc.json \
      --json "$OUT/server_parity_smollm2_host_cache_h100.json" 2>&1 | tail -12 ;;
  cache) cap asynctls_host_cache 10 "${HOST[@]}" --asynctls-host-cache-tokens 2048 ;;
  nocache) cap asynctls_host_nocache 10 "${HOST[@]}" ;;
  stock) cap stock_flashinfer 4 --attention-backend flashinfer ;;
  cache_n) cap "asynctls_host_cache_${2}req" "$2" --enable-asynctls --asynctls-host-kv-gib "$3" \
    --max-running-requests $(($2 + 1)) --asynctls-host-cache-tokens 2048 ;;
  *) echo "usage: $0 tests|parity|cache|nocache|stock|cache_n N GIB"; exit 2 ;;
esac
