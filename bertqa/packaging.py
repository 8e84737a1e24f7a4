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

Packing follows links (a Hugging Face cache snapshot is a folder of links into ../../blobs/): the archive holds
the files they point to, under the links' names; a dangling link is refused, naming it. Unpacking is bounded:
at most MAX_MEMBERS members and max_unpacked_bytes in all (default DEFAULT_MAX_UNPACKED_BYTES, the largest model
bertqa.config.LIMITS allows plus its tokenizer files; $BERTQA_MAX_UNPACKED_BYTES or the argument raise it),
checked member by member from each member's header before its data is written, so a small compressed archive
cannot fill the disk.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Optional, Union

from ._atomic import atomic_write
from .checkpoint import CONFIG_NAME, SAFETENSORS_NAME, TORCH_BIN_NAME, check_model_folder
from .config import LIMITS, MAX_CONFIG_BYTES, BertConfig
from .tokenization import MAX_TOKENIZER_CONFIG_BYTES, MAX_TOKENIZER_JSON_BYTES, MAX_VOCAB_TXT_BYTES

PathLike = Union[str, os.PathLike]
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
OPTIONAL_FILES = ("README.md",)
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
# The largest model the config limits allow, as float32 weights (8 GB at LIMITS["parameters"] = 2e9), plus the
# tokenizer files and config at their own limits and 64 MB for anything else (README, code/): 8.3 GB. A float64
# checkpoint of that size needs the limit raised.
DEFAULT_MAX_UNPACKED_BYTES = (4 * LIMITS["parameters"] + MAX_TOKENIZER_JSON_BYTES + MAX_VOCAB_TXT_BYTES
                              + 3 * MAX_TOKENIZER_CONFIG_BYTES + MAX_CONFIG_BYTES + 64 * 1024 * 1024)
MAX_UNPACKED_ENV = "BERTQA_MAX_UNPACKED_BYTES"
# A model archive holds a handful of files (plus a code/ folder at most).
MAX_MEMBERS = 1000


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
    for n in names:
        link = folder / n
        if link.is_symlink() and not link.exists():
            raise PackageError(f"{link}: a link to {os.readlink(link)}, which does not exist (an unfinished "
                               f"download in a Hugging Face cache?)")
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
            # A link (a Hugging Face cache snapshot is made of them) is packed as the file it points to.
            target = path.resolve() if path.is_symlink() else path
            try:
                with open(target, "rb") as f:
                    info = _tar_filter(tar.gettarinfo(arcname=path.name, fileobj=f))
                    if not info.isfile():
                        raise PackageError(f"{path}: not a regular file" + (f" (a link to {target})"
                                                                            if target != path else ""))
                    tar.addfile(info, f)
            except OSError as e:
                raise PackageError(f"{path}: cannot pack: {e.strerror or e}") from e
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


def max_unpacked_bytes(value: Optional[int] = None) -> int:
    """The unpacked-size limit: value if given, else $BERTQA_MAX_UNPACKED_BYTES, else DEFAULT_MAX_UNPACKED_BYTES."""
    if value is not None:
        return int(value)
    env = os.environ.get(MAX_UNPACKED_ENV)
    if env is None or env.strip() == "":
        return DEFAULT_MAX_UNPACKED_BYTES
    try:
        limit = int(float(env))
    except ValueError:
        raise PackageError(f"{MAX_UNPACKED_ENV}={env!r} is not a number of bytes") from None
    if limit <= 0:
        raise PackageError(f"{MAX_UNPACKED_ENV}={env!r} must be positive")
    return limit


def extract_archive(archive: PathLike, dest: PathLike, max_bytes: Optional[int] = None,
                    max_members: int = MAX_MEMBERS) -> Path:
    """Unpack a model archive into dest (plain files and folders only; nothing outside dest). Returns the model
    folder: dest, or its single sub-folder when the archive was made with one (tar -C out -czf m.tgz squad).

    Members are read one at a time and each is checked before its data is written: its name and type, the
    member count (max_members) and the running total of unpacked bytes (max_bytes, see max_unpacked_bytes) and
    the free space under dest. A refused archive may leave the members before the refused one in dest."""
    archive, dest = Path(archive), Path(dest)
    limit = max_unpacked_bytes(max_bytes)
    total = count = 0
    try:
        with tarfile.open(archive, mode="r|*") as tar:  # a stream: headers are met in order, data never skipped
            for m in tar:
                count += 1
                if count > max_members:
                    raise PackageError(f"{archive}: more than {max_members} members; a model archive holds a "
                                       f"few files")
                _check_member(m, archive)
                if m.issparse():
                    raise PackageError(f"{archive}: member {m.name!r} is a sparse file; a model archive holds "
                                       f"plain files only")
                total += m.size
                if total > limit:
                    raise PackageError(f"{archive}: unpacks to more than {limit} bytes (at member {m.name!r}); "
                                       f"raise the limit with {MAX_UNPACKED_ENV} if the model is that large")
                if m.size:
                    free = shutil.disk_usage(dest).free
                    if m.size > free:
                        raise PackageError(f"{archive}: member {m.name!r} needs {m.size} bytes, {dest} has "
                                           f"{free} free")
                m.mode = 0o755 if m.isdir() else 0o644
                if hasattr(tarfile, "data_filter"):
                    tar.extract(m, dest, filter="data")
                else:  # Python < 3.11.4: the member was checked above
                    tar.extract(m, dest)
                tar.members = []  # the stream's member list would otherwise grow with every header
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
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

    def __init__(self, path: PathLike, tmp_root: Optional[PathLike] = None, max_bytes: Optional[int] = None):
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
                self.folder = extract_archive(path, self._tmp, max_bytes=max_bytes)
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
