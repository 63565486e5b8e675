#!/bin/bash
# The GPU host's steps (docs/gpu_host.md), one subcommand each, run from the repository root:
#   host.sh install                          install this checkout into /root/site (SGLang finds its entry point)
#   host.sh fa3-build OUT_DIR                (here, not on the host) FA3's flash_ops.abi3.so as 3 zstd parts
#   host.sh fa3-restore                      (host) put flash_ops back from /root/fa3/part0*, md5 checked
#   host.sh smollm2                          (host) assemble the SmolLM2 GGUF from /root/gguf, write /root/smollm2
#   host.sh serve-prepare                    install, and write the full-vocabulary dummy Qwen3-8B
#   host.sh serve-start LABEL [flags]        start LABEL's server (detached) and run the parity prompts
#   host.sh serve-load LABEL w1|w2|w3 [stop] one workload against it (then stop it)
#   host.sh one-batch METHOD...              bench_one_batch prefill + decode at 2 x 98,304 (e2e_throughput.py)
#   host.sh mla-parity INNER                 dummy GLM-4.7-Flash (8 layers): stock INNER, then asynctls with INNER
#                                            inside, each answering the parity prompts (results in /root/mla)
#   host.sh mla-one-batch METHOD...          bench_one_batch at 2 x 98,304 on that model
#   host.sh qwen-restore                     (host) rejoin /root/q15 (stage_qwen25coder.py --parts) into
#                                            /root/qwen25coder-1.5b
#   host.sh fidelity LABEL [run flags]       benchmarks/fidelity_server.py run on it, prompts /root/fs/prompts.jsonl.gz,
#                                            result /root/fs/runs/LABEL.json (under the 600 s call limit)
#   host.sh jit-out                          (host, last call) Triton's and FlashInfer's JIT caches as <= 15 MiB
#                                            parts under $OUT, to carry into the next lease
#   host.sh jit-in DIR                       (host, before any server) unpack parts carried in DIR
# Served-request results go to /root/sb; each step copies what it wrote to $OUT. A step whose prerequisite failed
# returns at once ("skipped"), so a batch of device calls costs little after a failure.
set -o pipefail
[ -f /root/stage/p2/scripts/env.sh ] && source /root/stage/p2/scripts/env.sh
D=/root/sb; B=benchmarks/serve_bench.py
GLM=/root/glm8; MLA=/root/mla
Q15=/root/qwen25coder-1.5b; FS=/root/fs
copy_out() { [ -n "$OUT" ] && cp "$@" "$OUT"/ 2>/dev/null; true; }

install() {
  if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /root/site . 2>/tmp/install.err; then
    tail -3 /tmp/install.err   # no build tools: an entry point alone, with this checkout on PYTHONPATH
    mkdir -p /root/site/sglang_asynctls-0.0.0.dist-info
    printf 'Metadata-Version: 2.1\nName: sglang-asynctls\nVersion: 0.0.0\n' > /root/site/sglang_asynctls-0.0.0.dist-info/METADATA
    printf '[sglang.srt.plugins]\nasynctls = sglang_asynctls.plugin:register\n' > /root/site/sglang_asynctls-0.0.0.dist-info/entry_points.txt
    echo "installed entry point only; put $(pwd) on PYTHONPATH"
  fi
  python3 -c "import importlib.metadata as m; print([e for e in m.entry_points(group='sglang.srt.plugins')])"
}

fa3_build() {  # zstd -19 --long: 141 MB (gzip -1: 398 MB), three parts of <= 50 MiB that each fit one call
  local out=${1:?usage: host.sh fa3-build OUT_DIR} w=${WHEEL_CACHE:-/tmp/sglang-gpu-wheel-cache} t
  t=$(mktemp -d)
  unzip -q -o "$w"/raw/sglang_kernel-0.4.5-*.whl 'sgl_kernel/flash_ops.abi3.so' -d "$t"
  md5sum "$t/sgl_kernel/flash_ops.abi3.so" | cut -d' ' -f1 > "$t/so.md5"
  zstd -q -T0 -19 --long=27 "$t/sgl_kernel/flash_ops.abi3.so" -o "$t/flash_ops.so.zst"   # ~3 min on 2 cores
  ( cd "$t" && split -b 50M -d flash_ops.so.zst part )
  rm -rf "$out"; mkdir -p "$out"
  for p in "$t"/part*; do mkdir -p "$out/$(basename "$p")"; mv "$p" "$out/$(basename "$p")/"; done
  cp "$t/so.md5" "$out/part00/"; rm -rf "$t"; du -sh "$out"/*
}

fa3_restore() {  # the zstandard module comes with the staged wheels (/root/site)
  python3 - <<'PY' || exit 1
import glob, hashlib, zstandard
parts = sorted(glob.glob("/root/fa3/part0*"))
dst = "/root/site/sgl_kernel/flash_ops.abi3.so"
reader = zstandard.ZstdDecompressor(max_window_size=1 << 27).stream_reader(
    b"".join(open(p, "rb").read() for p in parts))  # --long=27
with open(dst, "wb") as out:
    while chunk := reader.read(1 << 24):
        out.write(chunk)
md5, want = hashlib.md5(open(dst, "rb").read()).hexdigest(), open("/root/fa3/so.md5").read().strip()
assert md5 == want, f"flash_ops md5 {md5} != {want}"
print("flash_ops restored,", len(parts), "parts, md5 ok")
PY
  python3 -c "import sgl_kernel.flash_attn; print('fa3 ready')"
}

smollm2() {  # /root/gguf holds part00, part01, name and md5 (carried as ≤ 60 MiB parts)
  (cd /root/gguf && cat part00 part01 > "$(cat name)" && md5sum -c <(sed "s#  .*#  $(cat name)#" md5)) || exit 1
  python3 benchmarks/gpu/model_dirs.py smollm2 "/root/gguf/$(cat /root/gguf/name)" /root/smollm2 2>&1 | tail -1
  install 2>&1 | tail -2
}

case "$1" in
install) install ;;
fa3-build) fa3_build "$2" ;;
fa3-restore) fa3_restore ;;
smollm2) smollm2 ;;
serve-prepare)
  mkdir -p $D
  install > $D/install.log 2>&1 || { tail -5 $D/install.log; exit 1; }
  python3 benchmarks/gpu/model_dirs.py qwen3 /root/qwen3_8b_fullvocab 2>&1 | tail -1
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
  touch $D/prepared ;;
serve-start)
  L=$2; shift 2
  [ -f $D/prepared ] || { echo "skipped: not prepared"; exit 1; }
  [ "$L" = asynctls ] || [ -f $D/asynctls_ok ] || { echo "skipped: asynctls did not start"; exit 1; }
  python3 $B start --label $L --dir $D -- "$@" && python3 $B parity --label $L --dir $D && touch $D/${L}_up $D/${L}_ok
  rc=$?; [ $rc -eq 0 ] || tail -40 $D/${L}_server.log | cut -c1-300
  copy_out $D/$L.json; exit $rc ;;
serve-load)
  L=$2; W=$3
  [ -f $D/${L}_up ] || { echo "skipped: $L is not up"; exit 1; }
  python3 $B workload --label $L --dir $D --name $W; rc=$?
  if [ "$4" = stop ]; then python3 $B stop --label $L --dir $D; rm -f $D/${L}_up; fi
  grep -E "Traceback|Error|error" $D/${L}_server.log | tail -5 | cut -c1-300
  copy_out $D/$L.json $D/${L}_server.log; exit $rc ;;
one-batch)
  shift
  [ -f $D/prepared ] || { echo "skipped: not prepared"; exit 1; }
  python3 benchmarks/e2e_throughput.py run --methods "$@" --points 2x98304 --model /root/qwen3_8b_fullvocab \
    --results $D/one_batch.jsonl --raw $D/one_batch_raw.jsonl --timeout 280
  copy_out $D/one_batch.jsonl ;;
mla-parity)
  I=${2:?usage: host.sh mla-parity fa3|flashinfer|triton}
  [ -f $D/prepared ] || { echo "skipped: not prepared"; exit 1; }
  [ -d $GLM ] || python3 benchmarks/gpu/model_dirs.py glm $GLM --layers 8 --tokenizer-from /root/qwen3_8b_fullvocab
  for L in $I asynctls_$I; do
    if [ $L = $I ]; then F=(--attention-backend $I); else F=(--enable-asynctls --asynctls-dense-backend $I); fi
    python3 $B start --label $L --dir $MLA --model $GLM -- "${F[@]}" && python3 $B parity --label $L --dir $MLA --model $GLM
    rc=$?; [ $rc -eq 0 ] || tail -30 $MLA/${L}_server.log | cut -c1-300
    python3 $B stop --label $L --dir $MLA; copy_out $MLA/$L.json $MLA/${L}_server.log; [ $rc -eq 0 ] || exit $rc
  done ;;
mla-one-batch)
  shift
  [ -d $GLM ] || { echo "skipped: no $GLM (host.sh mla-parity makes it)"; exit 1; }
  python3 benchmarks/e2e_throughput.py run --methods "$@" --points 2x98304 --model $GLM \
    --results $MLA/one_batch.jsonl --raw $MLA/one_batch_raw.jsonl --timeout 280
  copy_out $MLA/one_batch.jsonl ;;
jit-out)  # a fresh machine compiles for ~90 s (our Triton kernels) and ~115 s (FlashInfer) before its first ready
  tar -C /root -czf /tmp/jit.tgz .triton/cache .cache/flashinfer 2>/dev/null; ls -la /tmp/jit.tgz
  [ "$(stat -c %s /tmp/jit.tgz)" -le $((60 << 20)) ] || { echo "JIT caches too large to bring back (64 MiB)"; exit 1; }
  split -b 15M -d /tmp/jit.tgz "$OUT/jit.tgz.part" && (cd "$OUT" && md5sum jit.tgz.part* > jit.md5) ;;
jit-in)
  (cd "${2:?usage: host.sh jit-in DIR}" && md5sum -c --quiet jit.md5) || exit 1
  cat "$2"/jit.tgz.part* | tar -C /root -xzf - && du -sh /root/.triton/cache /root/.cache/flashinfer 2>/dev/null; true ;;
qwen-restore)
  [ -f $D/prepared ] || { echo "skipped: not prepared"; exit 1; }
  PYTHONPATH=/root/site bash /root/q15/RESTORE.sh $Q15 2>&1 | grep -v "de-quantizing GGUF tensors" | tail -3
  [ -f $Q15/model.safetensors ] && touch /root/fs_model_ok ;;
fidelity)
  L=${2:?usage: host.sh fidelity LABEL [run flags]}; shift 2
  [ -f /root/fs_model_ok ] || { echo "skipped: no $Q15"; exit 1; }
  mkdir -p $FS/runs
  python3 benchmarks/fidelity_server.py run --prompts $FS/prompts.jsonl.gz --launch $Q15 --out $FS/runs/$L.json \
    --label $L --concurrency 32 --deadline-s ${DEADLINE_S:-520} "$@" 2>&1 | grep -v "prompts:" | tail -3
  rc=${PIPESTATUS[0]}; grep -E "Traceback|Error|max_total_num_tokens|KV Cache" $FS/runs/$L.log | tail -4 | cut -c1-300
  copy_out $FS/runs/$L.json $FS/runs/$L.log; exit $rc ;;
*) sed -n '2,22p' "$0"; exit 2 ;;
esac
