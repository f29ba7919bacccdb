"""Where ecgvlm reads and writes: a local path or a URI that ``pyarrow.fs`` understands.

Every path in a job config (a data set, a run's storage, a report folder) may be a local path
or a URI such as ``s3://bucket/prefix``, ``gs://bucket/prefix`` or ``file:///abs/path``, with
the ordinary credentials of that store (``AWS_*`` variables, an instance role, ...). The
stages name their files by joining onto such a *location* with ``join`` and read and write
them through the few functions here, which hand the work to ``pyarrow.fs``: the same layer
Ray Train (``storage_path``) and Ray Data (``read_parquet``) use, so one set of credentials
serves all three. Parquet readers take URIs as they are.

Writes never leave a half-written file under its final name: on a local disk a file is
written beside its target and renamed over it; on an object store an object becomes visible
only when its upload completes, so it is written directly.
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class StorageError(OSError):
    """A location that cannot be read or written; the message names it and what to check."""


#: The bucket the shipped study configs name until the user puts theirs there.
PLACEHOLDER_BUCKET = "YOUR-BUCKET"


def is_uri(location: str | Path) -> bool:
    """True for ``scheme://...`` (object stores and ``file://``); False for plain paths."""
    return "://" in str(location)


@functools.lru_cache(maxsize=32)
def _uri_filesystem(root: str) -> Any:
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(root)[0]


def filesystem(location: str | Path) -> tuple[Any, str]:
    """``(pyarrow FileSystem, path inside it)`` for a local path or a URI.

    Filesystems are cached per scheme and bucket: creating an S3 client costs milliseconds,
    and a shard writer asks once per file.
    """
    import pyarrow.fs as pafs

    text = str(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))
    scheme, rest = text.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), "/" + rest.lstrip("/")
    bucket = rest.split("/", 1)[0]
    if bucket == PLACEHOLDER_BUCKET:  # said before a network call that takes seconds to fail
        raise StorageError(f"{text}: {PLACEHOLDER_BUCKET} is the shipped configs' placeholder: "
                           "put your bucket there (README, \"On a GPU cluster\": the sed line) "
                           "or give the path as an override")
    try:
        fs = _uri_filesystem(f"{scheme}://{bucket}")
    except (OSError, ValueError) as e:  # pyarrow.lib.ArrowInvalid is a ValueError
        raise StorageError(f"cannot open {text}: {e}") from e
    return fs, rest.rstrip("/")


def local_path(location: str | Path) -> str | None:
    """The local path of a location on this machine's disk (plain or ``file://``), else None."""
    text = str(location)
    if not is_uri(text) or text.startswith("file://"):
        return filesystem(text)[1]
    return None


def filesystem_and_paths(locations: list[str]) -> tuple[Any, list[str]]:
    """One pyarrow FileSystem and the paths inside it, for readers such as
    ``pyarrow.dataset.dataset`` that take a list of paths but not of URIs."""
    pairs = [filesystem(loc) for loc in locations]
    if not pairs:
        return filesystem(".")[0], []
    kinds = {type(fs).__name__ for fs, _ in pairs}
    if len(kinds) > 1:
        raise StorageError(f"files on different stores cannot be read as one: {locations[:3]}")
    return pairs[0][0], [path for _, path in pairs]


def join(location: str | Path, *parts: str) -> str:
    """``location/part/...`` keeping a URI's scheme (``Path`` would fold ``s3://`` to ``s3:/``)."""
    text = str(location)
    if not is_uri(text):
        return os.path.join(text, *parts)
    return posixpath.join(text.rstrip("/"), *parts)


def _info(location: str | Path) -> Any:
    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path)
    except OSError as e:
        raise StorageError(f"cannot reach {location}: {e}") from e


def is_file(location: str | Path) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type == pafs.FileType.File


def is_dir(location: str | Path) -> bool:
    """A folder on disk, or a prefix with objects under it on an object store."""
    import pyarrow.fs as pafs

    return _info(location).type == pafs.FileType.Directory


def exists(location: str | Path) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type != pafs.FileType.NotFound


def size(location: str | Path) -> int | None:
    """Size in bytes of a file, None when there is none."""
    info = _info(location)
    return info.size if info.is_file else None


def read_bytes(location: str | Path) -> bytes:
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise StorageError(f"cannot read {location}: {e}") from e


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a whole file: readers see the old one or the new one, never a part."""
    if local_path(location) is not None:
        with whole_file_output(location) as stream:
            stream.write(data)
        return
    fs, path = filesystem(location)
    try:
        with fs.open_output_stream(path) as stream:
            stream.write(data)
    except OSError as e:
        raise StorageError(f"cannot write {location}: {e}") from e


@contextmanager
def whole_file_output(location: str | Path) -> Iterator[Any]:
    """A pyarrow output stream for a whole file: readers see the old file or the new one,
    never a part, and a failure inside the block leaves the old one.

    On a disk the bytes go to a hidden file beside the target, renamed over it when the block
    ends (removed when it fails), so a large file is never held in memory. Elsewhere they
    are collected and written in one request (``write_bytes``): an object store's streamed
    upload would publish a partial object when a failure closes it.
    """
    import pyarrow as pa

    local = local_path(location)
    if local is None:
        sink = pa.BufferOutputStream()
        yield sink
        write_bytes(location, memoryview(sink.getvalue()))
        return
    target = Path(local)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as stream:
            yield stream
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(location: str | Path, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def _relative_files(location: str | Path, recursive: bool) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
    try:
        infos = fs.get_file_info(selector)
    except OSError as e:
        raise StorageError(f"cannot list {location}: {e}") from e
    return sorted(posixpath.relpath(i.path, path) for i in infos if i.is_file)


def list_files(location: str | Path, suffix: str = "", recursive: bool = False) -> list[str]:
    """Files under a folder or prefix whose names end with ``suffix``, sorted, as locations
    of the same kind (URIs stay URIs). A missing folder lists nothing."""
    return [
        join(location, rel)
        for rel in _relative_files(location, recursive)
        if rel.endswith(suffix)
    ]


def fingerprint(location: str | Path, edge_bytes: int = 1 << 20) -> str:
    """A short hash of the files under a folder or prefix: each file's relative path, size,
    and its first and last ``edge_bytes`` (the whole file when it is no larger than both).

    It tells two checkpoints or adapters apart without reading gigabytes of shards: weights
    written by another run or drawn from another seed differ from the first bytes after a
    safetensors header (kilobytes) on, while a copy of the folder hashes the same. A file
    whose changes all lie in its middle would go unnoticed. Hidden files and folders
    (``.git``, ``.cache``) are left out.

    Raises:
        StorageError: the folder cannot be listed or a file read.
    """
    import pyarrow.fs as pafs

    fs, root = filesystem(location)
    digest = hashlib.blake2b(digest_size=8)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        for info in sorted((i for i in infos if i.is_file), key=lambda i: i.path):
            rel = posixpath.relpath(info.path, root)
            if any(part.startswith(".") for part in rel.split("/")):
                continue  # .git (a cloned checkpoint's LFS objects), .cache: not the weights
            digest.update(f"{rel}\0{info.size}\0".encode())
            with fs.open_input_file(info.path) as f:
                if info.size <= 2 * edge_bytes:
                    digest.update(f.read())
                else:
                    digest.update(f.read_at(edge_bytes, 0))
                    digest.update(f.read_at(edge_bytes, info.size - edge_bytes))
    except OSError as e:
        raise StorageError(f"cannot read {location} to fingerprint it: {e}") from e
    return digest.hexdigest()


def delete(location: str | Path) -> None:
    """Remove a file, or a folder / prefix and everything under it; nothing there is fine."""
    import pyarrow.fs as pafs

    local = local_path(location)
    if local is not None:
        if os.path.isdir(local):
            shutil.rmtree(local)
        elif os.path.lexists(local):
            os.unlink(local)
        return
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        fs.delete_file(path)
    elif info.type == pafs.FileType.Directory:
        fs.delete_dir(path)


def check_writable(location: str | Path) -> None:
    """Fail early, naming the location, when outputs could not be written there: a local
    folder is created; on an object store the bucket must exist (jobs do not create
    buckets: that is the account's decision, with its region and policies)."""
    local = local_path(location)
    if local is not None:
        check_creatable(location)  # its messages name the path that is in the way
        try:
            os.makedirs(local, exist_ok=True)
        except OSError as e:  # what the check cannot see (a full disk, a race with another job)
            raise StorageError(f"cannot create the folder {location}: {e}") from e
        return
    _check_bucket(location)


def _check_bucket(location: str | Path) -> None:
    scheme, rest = str(location).split("://", 1)
    bucket = rest.split("/", 1)[0]
    if not exists(f"{scheme}://{bucket}"):
        raise StorageError(
            f"bucket {bucket!r} of {location} does not exist or these credentials cannot see it"
        )


def check_creatable(location: str | Path) -> None:
    """``check_writable`` that writes nothing: a local folder need not exist, but the nearest
    existing path above it must be a folder this process may write in; on an object store
    the bucket must exist. For a job's checks before Ray starts, when it is not yet known
    whether a local path may be used at all (a cluster of several nodes refuses them, and
    must find nothing created then)."""
    local = local_path(location)
    if local is None:
        _check_bucket(location)
        return
    nearest = Path(local).absolute()
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise StorageError(f"cannot create the folder {location}: {nearest} is not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise StorageError(f"cannot create the folder {location}: {nearest} is not writable")


def check_shared(locations: dict[str, str | None]) -> None:
    """On a Ray cluster of more than one node, refuse plain local paths (field -> location).

    A task or worker may run on any node and would write to (or look for) that path on its
    own disk: shards, checkpoints and predictions would be scattered over the nodes, or not
    found. A URI names one store every node reaches; ``file:///path`` says the path is a file
    system mounted at the same place on every node (NFS, EFS, a cluster's shared disk).

    Raises:
        StorageError: naming the first local field and what to use instead.
    """
    # Not ``import ray``: a process that has not connected yet has no cluster to check, and
    # Ray reads its auth settings when first imported, so importing it here would make a
    # later ``ray.init`` to a token-auth head (``ecgvlm serve``'s own) fail.
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    n_nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if n_nodes < 2:
        return
    for name, location in locations.items():
        if location and not is_uri(location):
            raise StorageError(
                f"{name} = {location} is a path on one machine, but the Ray cluster has "
                f"{n_nodes} nodes and its tasks run on any of them: use shared storage, a URI "
                f"such as s3://BUCKET/... or gs://BUCKET/..., or file://{location} when that "
                "path is a file system mounted on every node"
            )


def upload_dir(local_dir: str | Path, location: str | Path) -> None:
    """Copy a local folder's files to ``location``, streamed (model shards are gigabytes);
    on an object store each object appears only when its upload completes."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if local_path(location) is not None:  # copy_files makes the folders below it, not it
        Path(path).mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(str(Path(local_dir).resolve()), path,
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except OSError as e:
        raise StorageError(f"cannot copy {local_dir} to {location}: {e}") from e


def replace_dir(local_dir: str | Path, location: str | Path) -> None:
    """Put a local folder's files at ``location`` in place of what was there (training's
    adapter export).

    A local folder (or a ``file://`` one) is replaced whole: the copy is made beside it and
    renamed into place, so a copy cut short (a full disk, a killed job) leaves the old
    folder as it was, and readers never find half of the new one. An object store has no
    rename: the old objects are deleted, then the new ones uploaded (each appears whole).
    """
    local = local_path(location)
    if local is None:
        delete(location)
        upload_dir(local_dir, location)
        return
    target = Path(local)
    partial = target.with_name(f".{target.name}.partial")
    old = target.with_name(f".{target.name}.old")
    for leftover in (partial, old):  # from a copy cut short before
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        upload_dir(local_dir, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if target.exists():
        os.rename(target, old)
    os.rename(partial, target)
    shutil.rmtree(old, ignore_errors=True)


def download_dir(location: str | Path, local_dir: str | Path) -> None:
    """Copy every file under ``location`` into the local folder ``local_dir``, streamed;
    nothing there leaves ``local_dir`` absent."""
    import pyarrow.fs as pafs

    if not _relative_files(location, recursive=True):
        return
    fs, path = filesystem(location)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(path, str(Path(local_dir).resolve()), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
    except OSError as e:
        raise StorageError(f"cannot copy {location} to {local_dir}: {e}") from e


def cache_root() -> Path:
    """Where copies of remote models live on this node: ``$ECGVLM_CACHE_DIR`` or
    ``~/.cache/ecgvlm``."""
    return Path(os.environ.get("ECGVLM_CACHE_DIR") or Path.home() / ".cache" / "ecgvlm")


def node_local(location: str | Path) -> str:
    """A local folder holding ``location``'s files: the folder itself when it is local,
    else a copy in this node's cache, made once per node.

    Weights are memory-mapped from local files (safetensors), so a model or adapter kept in
    an object store is copied before loading. Processes on one node share the copy: the
    first takes a lock and downloads into a temporary folder, renamed into place when whole;
    the others wait on the lock and find it. A changed remote folder needs a new URI (or an
    emptied cache): copies are keyed by URI, not by content.
    """
    import fcntl
    import hashlib

    local = local_path(location)
    if local is not None:
        return local
    text = str(location).rstrip("/")
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    root = cache_root() / "remote" / key
    # The copy keeps the folder's own name (``.../<key>/mitdb``): readers that recognise a
    # data set by its folder see the same name as on the store.
    target = root / posixpath.basename(text)
    if target.is_dir():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            partial = root / f".{target.name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            download_dir(text, partial)
            if not partial.is_dir():
                raise StorageError(f"{location} holds no files")
            os.rename(partial, target)
    return str(target)


@contextmanager
def staged_dir(location: str | Path) -> Iterator[Path]:
    """A local folder to write into that ends up at ``location``: the folder itself when
    ``location`` is local; otherwise a temporary folder uploaded on success."""
    local = local_path(location)
    if local is not None:
        os.makedirs(local, exist_ok=True)
        yield Path(local)
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ecgvlm-stage-") as tmp:
        yield Path(tmp)
        upload_dir(tmp, location)
