"""Model archives (issue 22, items 1 and 6): unpacking is bounded in total size and member count, checked member
by member before the data is written; `bertqa package` on a Hugging Face cache snapshot (a folder of links into
../../blobs/) packs the files the links point to, and `serve` loads the archive.
"""
import io
import os
import tarfile
from pathlib import Path

import pytest

from bertqa import cli
from bertqa.packaging import ModelDir, PackageError, extract_archive, package_model
from test_limits_loaders import write_tiny_model


def zeros_archive(path: Path, sizes: dict) -> Path:
    """A gzip archive of members full of zeros (they compress ~1000:1)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, size in sizes.items():
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(b"\0" * size))
    return path


def used_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_unpacked_size_is_capped_by_argument_while_unpacking(tmp_path):
    archive = zeros_archive(tmp_path / "bomb.tar.gz", {"config.json": 1000, "a.bin": 3_000_000,
                                                         "b.bin": 3_000_000, "c.bin": 3_000_000})
    assert archive.stat().st_size < 100_000
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(PackageError) as e:
        extract_archive(archive, dest, max_bytes=5_000_000)
    msg = str(e.value)
    assert str(archive) in msg and "more than 5000000 bytes" in msg and "'b.bin'" in msg and "\n" not in msg
    assert used_bytes(dest) <= 5_000_000  # b.bin was refused from its header, before its data was written


def test_unpacked_size_is_capped_by_environment(tmp_path, monkeypatch):
    archive = zeros_archive(tmp_path / "bomb.tar.gz", {"config.json": 10, "model.safetensors": 2_000_000})
    monkeypatch.setenv("BERTQA_MAX_UNPACKED_BYTES", "1000000")
    with pytest.raises(PackageError, match="BERTQA_MAX_UNPACKED_BYTES"):
        ModelDir(archive, tmp_root=tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("bertqa-model-")]  # removed again
    monkeypatch.setenv("BERTQA_MAX_UNPACKED_BYTES", "nonsense")
    with pytest.raises(PackageError, match="BERTQA_MAX_UNPACKED_BYTES"):
        extract_archive(archive, tmp_path)


def test_default_cap_is_the_largest_model_plus_tokenizer():
    from bertqa import config, packaging
    assert packaging.DEFAULT_MAX_UNPACKED_BYTES > 4 * config.LIMITS["parameters"]
    assert packaging.DEFAULT_MAX_UNPACKED_BYTES < 4 * config.LIMITS["parameters"] + 2 ** 30


def test_member_count_is_capped(tmp_path):
    archive = zeros_archive(tmp_path / "many.tar.gz", {f"f{i}": 0 for i in range(1200)})
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(PackageError, match="more than 1000 members"):
        extract_archive(archive, dest)


def hf_cache_snapshot(root: Path) -> Path:
    """models--org--name/{blobs/<hash>, snapshots/<rev>/<file> -> ../../blobs/<hash>}, as huggingface_hub
    lays a downloaded repository out."""
    model = write_tiny_model(root / "src")
    repo = root / "hub" / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(model.iterdir())):
        blob = blobs / f"{i:040x}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    return snap


def test_package_hf_cache_snapshot_packs_files_and_serve_loads_it(tmp_path):
    from bertqa.serve.service import load_model
    snap = hf_cache_snapshot(tmp_path)
    assert all(p.is_symlink() for p in snap.iterdir())
    out = tmp_path / "model.tar.gz"
    assert cli.main(["package", "--model-dir", str(snap), "--output", str(out)]) == 0
    with tarfile.open(out) as tar:
        members = tar.getmembers()
    assert members and all(m.isfile() for m in members)
    assert {m.name for m in members} >= {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json"}
    with ModelDir(out) as m:
        assert (m.folder / "model.safetensors").read_bytes() == (snap / "model.safetensors").read_bytes()
    model = load_model(str(out))  # what `bertqa serve --model-dir model.tar.gz` does
    assert model.tokenizer is not None and model.config.hidden_size == 8


def test_package_refuses_a_dangling_link_naming_it(tmp_path, capsys):
    snap = hf_cache_snapshot(tmp_path)
    os.unlink(os.path.realpath(snap / "vocab.txt"))  # a blob that never finished downloading
    out = tmp_path / "model.tar.gz"
    assert cli.main(["package", "--model-dir", str(snap), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(snap / "vocab.txt") in err and "does not exist" in err and err.count("\n") == 1
    assert not out.exists()
