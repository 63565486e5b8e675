#!/bin/bash
# One device call of the e2e sweep: bash benchmarks/gpu/e2e_call.sh METHOD POINT...   (rows append to /root/e2e_rows.jsonl)
source /root/stage/p2/scripts/env.sh
M=$1; shift
python3 benchmarks/e2e_throughput.py run --methods $M --points "$@" --timeout 400 2>&1 | grep -v "^\s*$" | tail -40
