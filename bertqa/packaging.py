"""model.tar.gz for SageMaker: pack a model folder (files at the top of the archive) and unpack it safely.

    bertqa package --model-dir out/squad --output model.tar.gz

SageMaker downloads the archive named by a model's ModelDataUrl and unpacks it into /opt/ml/model, so the files
must sit at the top of the archive (config.json, not out/squad/config.json). Only the files a model needs are
packed: config.json, the weights (model.safetensors, else pytorch_model.bin) and the tokenizer files; training
leftovers in the same folder (checkpoints, optimizer state, logs) stay out. The archive is written to a temporary
file beside the output and renamed over it, so a reader never sees half an archive.

`open_model_dir(path)` is the other direction, for `bertqa serve`: a folder is used as it is; an archive (or a
folder holding nothing but one) is unpacked into a temporary folder, refusing members that would land outside
it (absolute paths, `..`, links, devices).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional, Union

from ._atomic import atomic_write
from .checkpoint import CONFIG_NAME, SAFETENSORS_NAME, TORCH_BIN_NAME, check_model_folder
from .config import BertConfig

PathLike = Union[str, os.PathLike]
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
OPTIONAL_FILES = ("README.md",)
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


class PackageError(ValueError):
    """A model folder or archive that cannot be packed or served; the message names the file and the problem."""


def model_files(model_dir: PathLike) -> list[Path]:
    """The files of model_dir that go into model.tar.gz, checked: config, one weights file, tokenizer files."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise PackageError(f"{folder}: not a folder (expected a model folder with {CONFIG_NAME}, "
                           f"{SAFETENSORS_NAME} and the tokenizer files)")
    try:
        check_model_folder(folder)
        BertConfig.from_json_file(folder / CONFIG_NAME)
    except (FileNotFoundError, ValueError) as e:
        raise PackageError(str(e)) from e
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise PackageError(f"{folder}: no tokenizer files (tokenizer.json or vocab.txt); save the tokenizer "
                           f"next to the model (BertQATokenizer.save_pretrained)")
    weights = folder / SAFETENSORS_NAME
    if not weights.is_file():
        weights = folder / TORCH_BIN_NAME
    names = [CONFIG_NAME, weights.name, *TOKENIZER_FILES, *OPTIONAL_FILES]
    return [folder / n for n in names if (folder / n).is_file()]


def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # The same archive whoever packs it: no owner names or ids, read-only for others.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    return info


def package_model(model_dir: PathLike, output: PathLike) -> Path:
    """Write model.tar.gz (gzip) with model_dir's model files at the top; atomic. Returns the output path."""
    files = model_files(model_dir)
    output = Path(output)
    if output.is_dir():
        output = output / "model.tar.gz"
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(output) as tmp, tarfile.open(tmp, mode="w:gz") as tar:
        for path in files:
            tar.add(path, arcname=path.name, recursive=False, filter=_tar_filter)
    return output


def is_archive(path: PathLike) -> bool:
    return Path(path).is_file() and str(path).endswith(ARCHIVE_SUFFIXES)


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise PackageError(f"{archive}: member {name!r} would be written outside the model folder")
    if not (member.isfile() or member.isdir()):
        raise PackageError(f"{archive}: member {name!r} is a link or special file; a model archive holds "
                           f"plain files only")


def extract_archive(archive: PathLike, dest: PathLike) -> Path:
    """Unpack a model archive into dest (plain files and folders only; nothing outside dest). Returns the model
    folder: dest, or its single sub-folder when the archive was made with one (tar -C out -czf m.tgz squad)."""
    archive, dest = Path(archive), Path(dest)
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = tar.getmembers()
            for m in members:
                _check_member(m, archive)
            for m in members:
                m.mode = 0o755 if m.isdir() else 0o644
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # Python < 3.11.4: members were checked above
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise PackageError(f"{archive}: cannot unpack: {e}") from e
    if not (dest / CONFIG_NAME).is_file():
        subdirs = [p for p in dest.iterdir() if p.is_dir()]
        if len(subdirs) == 1 and (subdirs[0] / CONFIG_NAME).is_file():
            return subdirs[0]
    return dest


class ModelDir:
    """A model folder ready to load, from a folder or an archive; `close()` removes what was unpacked.

    A folder holding no config.json but exactly one archive (how some tools leave /opt/ml/model) is treated
    as that archive.
    """

    def __init__(self, path: PathLike, tmp_root: Optional[PathLike] = None):
        path = Path(path).expanduser()
        self.source = path
        self._tmp: Optional[str] = None
        if path.is_dir() and not (path / CONFIG_NAME).is_file():
            archives = [p for p in path.iterdir() if is_archive(p)]
            if len(archives) == 1:
                path = archives[0]
        if is_archive(path):
            self._tmp = tempfile.mkdtemp(prefix="bertqa-model-", dir=tmp_root)
            try:
                self.folder = extract_archive(path, self._tmp)
            except BaseException:
                self.close()
                raise
        elif path.is_dir():
            self.folder = path
        elif path.exists():
            raise PackageError(f"{path}: neither a model folder nor a model archive ({', '.join(ARCHIVE_SUFFIXES)})")
        else:
            self.folder = path  # not a path on disk: a packaged or hub model name, resolved by the loader
        if self.folder.is_dir():
            try:
                check_model_folder(self.folder)
            except FileNotFoundError as e:
                self.close()
                raise PackageError(f"{e} (from {self.source})") from e

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "ModelDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- command line ----------------------------------------------------------------------------------------------


def add_package_parser(subparsers) -> argparse.ArgumentParser:
    """`bertqa package --model-dir DIR --output model.tar.gz`; the parser's func(args) returns an exit code."""
    p = subparsers.add_parser(
        "package", help="pack a model folder into model.tar.gz for SageMaker",
        description="Pack config.json, the weights and the tokenizer files of a model folder into a gzip tar "
                    "archive with the files at the top (what SageMaker unpacks into /opt/ml/model).")
    p.add_argument("--model-dir", "--model_dir", required=True, help="model folder (save_pretrained output)")
    p.add_argument("--output", "-o", default="model.tar.gz", help="archive to write (default: model.tar.gz)")
    p.set_defaults(func=package_command)
    return p


def package_command(args: argparse.Namespace) -> int:
    try:
        out = package_model(args.model_dir, args.output)
    except PackageError as e:
        print(f"bertqa package: error: {e}", file=sys.stderr)
        return 2
    with tarfile.open(out) as tar:
        names = tar.getnames()
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB, {', '.join(names)}")
    return 0
