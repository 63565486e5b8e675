#!/bin/bash
# On the GPU host (after ../shared/gpu/setup.sh): install this checkout into /root/site so SGLang's plugin discovery
# finds the entry point. Falls back to a hand-written dist-info + PYTHONPATH if the host cannot build.
set -e
source /root/stage/p2/scripts/env.sh
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /root/site . 2>/tmp/install.err; then
  tail -3 /tmp/install.err
  mkdir -p /root/site/sglang_asynctls-0.0.0.dist-info
  printf 'Metadata-Version: 2.1\nName: sglang-asynctls\nVersion: 0.0.0\n' > /root/site/sglang_asynctls-0.0.0.dist-info/METADATA
  printf '[sglang.srt.plugins]\nasynctls = sglang_asynctls.plugin:register\n' > /root/site/sglang_asynctls-0.0.0.dist-info/entry_points.txt
  echo "installed entry point only; put $(pwd) on PYTHONPATH"
fi
python3 -c "import importlib.metadata as m; print([e for e in m.entry_points(group='sglang.srt.plugins')])"
