#!/bin/bash
# FlashAttention-3 for the offline GPU host: sgl-kernel's flash_ops.abi3.so (1.12 GB), which the staged wheelhouse
# trims, so stock SGLang's default Hopper backend (--attention-backend fa3) runs there.
# zstd -19 --long packs it into 141 MB (gzip -1: 398 MB), three parts of <= 50 MiB that each fit one `run` call
# beside the repo (64 MiB a call).
#   here:  bash benchmarks/gpu/fa3_parts.sh build .gpu-wheels/fa3z      -> part00 part01 part02 (part00 holds so.md5)
#   host:  carry each .gpu-wheels/fa3z/partNN in its own call: mkdir -p /root/fa3 && cp .gpu-wheels/fa3z/partNN/* /root/fa3/
#          then, after setup.sh:  bash benchmarks/gpu/fa3_parts.sh restore
set -e
case "$1" in
build)
  OUT=${2:?usage: fa3_parts.sh build OUT_DIR}
  W=${WHEEL_CACHE:-/tmp/sglang-gpu-wheel-cache}
  T=$(mktemp -d)
  unzip -q -o "$W"/raw/sglang_kernel-0.4.5-*.whl 'sgl_kernel/flash_ops.abi3.so' -d "$T"
  md5sum "$T/sgl_kernel/flash_ops.abi3.so" | cut -d' ' -f1 > "$T/so.md5"
  zstd -q -T0 -19 --long=27 "$T/sgl_kernel/flash_ops.abi3.so" -o "$T/flash_ops.so.zst"   # ~3 min on 2 cores
  ( cd "$T" && split -b 50M -d flash_ops.so.zst part )
  rm -rf "$OUT"; mkdir -p "$OUT"
  for p in "$T"/part*; do mkdir -p "$OUT/$(basename "$p")"; mv "$p" "$OUT/$(basename "$p")/"; done
  cp "$T/so.md5" "$OUT/part00/"; rm -rf "$T"; du -sh "$OUT"/* ;;
restore)
  source /root/stage/p2/scripts/env.sh   # /root/site holds the zstandard wheel's module
  python3 - <<'PY'
import glob, hashlib, zstandard
parts = sorted(glob.glob("/root/fa3/part0*"))
dst = "/root/site/sgl_kernel/flash_ops.abi3.so"
d = zstandard.ZstdDecompressor(max_window_size=1 << 27)  # --long=27
with open(dst, "wb") as out:
    reader = d.stream_reader(b"".join(open(p, "rb").read() for p in parts))
    while chunk := reader.read(1 << 24):
        out.write(chunk)
md5 = hashlib.md5(open(dst, "rb").read()).hexdigest()
want = open("/root/fa3/so.md5").read().strip()
assert md5 == want, f"flash_ops md5 {md5} != {want}"
print("flash_ops restored,", len(parts), "parts, md5 ok")
PY
  python3 -c "import sgl_kernel.flash_attn; print('fa3 ready')" ;;
*) echo "usage: fa3_parts.sh build OUT_DIR | restore"; exit 2 ;;
esac
