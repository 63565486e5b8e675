#!/bin/bash
# One step of the served-request benchmark on the GPU host (benchmarks/serve_bench.py), one `run` call each, so no
# command outlives the per-command limit. Staging first: ../shared/gpu/README.md (p1, p2, setup.sh) and
# benchmarks/gpu/fa3_parts.sh (FA3). Results in /root/sb; each step copies what it wrote to $OUT.
#   serve_bench.sh prepare                       install this checkout, write the full-vocabulary dummy model
#   serve_bench.sh start LABEL [server flags]    start LABEL's server (detached) and run the parity prompts
#   serve_bench.sh load LABEL w1|w2|w3 [stop]    one workload against it (then stop it)
#   serve_bench.sh one_batch METHOD...           bench_one_batch prefill + decode at 2 x 98,304 (e2e_throughput.py)
# A step whose prerequisite failed returns at once ("skipped"), so a batch of calls costs little after a failure.
set -o pipefail
source /root/stage/p2/scripts/env.sh
D=/root/sb; mkdir -p $D
B=benchmarks/serve_bench.py
copy_out() { [ -n "$OUT" ] && cp "$@" $OUT/ 2>/dev/null; true; }
case "$1" in
prepare)
  bash benchmarks/gpu/install_here.sh > $D/install.log 2>&1 || { tail -5 $D/install.log; exit 1; }
  python3 benchmarks/gpu/qwen3_dummy_dir.py /root/qwen3_8b_fullvocab 2>&1 | tail -1
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
  touch $D/prepared ;;
start)
  L=$2; shift 2
  [ -f $D/prepared ] || { echo "skipped: not prepared"; exit 1; }
  [ "$L" = asynctls ] || [ -f $D/asynctls_ok ] || { echo "skipped: asynctls did not run"; exit 1; }
  python3 $B start --label $L --dir $D -- "$@" && python3 $B parity --label $L --dir $D && touch $D/${L}_up $D/${L}_ok
  rc=$?; [ $rc -eq 0 ] || tail -40 $D/${L}_server.log | cut -c1-300
  copy_out $D/$L.json; exit $rc ;;
load)
  L=$2; W=$3
  [ -f $D/${L}_up ] || { echo "skipped: $L is not up"; exit 1; }
  python3 $B workload --label $L --dir $D --name $W; rc=$?
  if [ "$4" = stop ]; then python3 $B stop --label $L --dir $D; rm -f $D/${L}_up; fi
  grep -E "Traceback|Error|error" $D/${L}_server.log | tail -5 | cut -c1-300
  copy_out $D/$L.json $D/${L}_server.log; exit $rc ;;
one_batch)
  shift
  [ -f $D/asynctls_ok ] || { echo "skipped: asynctls did not run"; exit 1; }
  python3 benchmarks/e2e_throughput.py run --methods "$@" --points 2x98304 --model /root/qwen3_8b_fullvocab \
    --results $D/one_batch.jsonl --raw $D/one_batch_raw.jsonl --timeout 280
  copy_out $D/one_batch.jsonl ;;
*) echo "usage: serve_bench.sh prepare | start LABEL [flags] | load LABEL WORKLOAD [stop] | one_batch METHOD..."; exit 2 ;;
esac
