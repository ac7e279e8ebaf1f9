"""Small helpers shared by the whole package: depth, validation, progress, atomic files."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from jaxtyping import Int
from torch import Tensor

from stages_of_inference._checks import check_count  # noqa: F401 (used across the package from here)
from stages_of_inference._tl import Model
from stages_of_inference.backends import as_seam
from stages_of_inference.batch import tensor_of

T = TypeVar("T")


def relative_depth(index: int, n_points: int) -> float:
    """Relative depth of point ``index`` out of ``n_points`` evenly spaced points, in [0, 1].

    The one rule the whole package uses. For blocks, ``n_points = n_layers`` gives the paper's
    ``i / (n_layers - 1)``; for logit-lens readouts (the embedding, then after each block),
    ``n_points = n_layers + 1`` gives ``k / n_layers``.

    Example:
        >>> relative_depth(5, 12)
        0.45454545454545453
        >>> relative_depth(12, 13)
        1.0
    """
    if n_points < 1:
        raise ValueError(f"n_points must be at least 1, got {n_points}")
    if not 0 <= index < n_points:
        raise ValueError(f"index {index} is out of range for {n_points} points (0..{n_points - 1})")
    return 0.0 if n_points == 1 else index / (n_points - 1)


def check_model(model: Any) -> Model:
    """The model itself (the adapted model, given a model seam); a ``TypeError`` for anything the
    library cannot adapt (:func:`stages_of_inference.backends.as_seam` decides: a
    ``HookedTransformer``, a ``TransformerBridge`` or a model seam).
    """
    return as_seam(model).model


TOKEN_DTYPES = (torch.int64, torch.int32)
"""The dtypes a token batch may have (narrower integers cannot hold a modern vocabulary's ids)."""


def check_tokens(model: Model, tokens: Any, min_len: int = 3) -> Int[Tensor, "batch pos"]:
    """Validate a token batch for ``model`` and move it to the model's device.

    Tokens must be a 2-D tensor of ``int64`` (or ``int32``) ids ``[batch, pos]`` (or a
    :class:`~stages_of_inference.batch.TokenBatch` of one) with at least ``min_len`` positions
    (BOS, and enough positions to score a next token), no longer than the model's context, and
    with ids inside the vocabulary.
    """
    tokens = tensor_of(tokens)
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(
            f"tokens must be a torch.Tensor of shape [batch, pos] or a TokenBatch, got {type(tokens).__name__}"
        )
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape [batch, pos], got shape {tuple(tokens.shape)}")
    if tokens.dtype not in TOKEN_DTYPES:
        raise TypeError(f"tokens must be integer ids of dtype torch.int64 (or torch.int32), got dtype {tokens.dtype}")
    if tokens.device.type == "meta":
        raise ValueError("tokens are on the meta device, which holds no values; give token ids on the CPU or the "
                         "model's device")
    batch, pos = tokens.shape
    if batch < 1:
        raise ValueError("tokens is an empty batch: need at least one sequence")
    if pos < min_len:
        raise ValueError(f"sequences need at least {min_len} positions (BOS plus text), got {pos}")
    if pos > model.cfg.n_ctx:
        raise ValueError(f"sequences of {pos} positions exceed the model's context of {model.cfg.n_ctx}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= model.cfg.d_vocab:
        raise ValueError(f"token ids must lie in [0, {model.cfg.d_vocab - 1}], found ids in [{lo}, {hi}]")
    return tokens.to(device=model.cfg.device, dtype=torch.long)


def progress(iterable: Iterable[T], enabled: bool = True, **kwargs: Any) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm progress bar when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


class WriteError(OSError):
    """A file could not be written (a full disk, a read-only filesystem): one line naming the file
    and the system's reason. Nothing half-written is left at the file's name.

    Example:
        >>> str(WriteError(28, "/data/x could not be written: No space left on device"))
        '/data/x could not be written: No space left on device'
    """

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


_FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Turn a full disk or a read-only filesystem met while writing ``path`` into a
    :class:`WriteError` that names it (pyarrow reports these as an ``OSError`` without an errno:
    its message says which).
    """
    try:
        yield
    except WriteError:
        raise
    except OSError as error:
        text = str(error)
        known = error.errno in _FULL_OR_READ_ONLY or any(
            os.strerror(code) in text for code in _FULL_OR_READ_ONLY)
        if not known:
            raise
        reason = error.strerror or next(os.strerror(c) for c in _FULL_OR_READ_ONLY if os.strerror(c) in text)
        raise WriteError(error.errno, f"{path} could not be written: {reason}") from None


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, tmp_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    The temporary file lies in ``tmp_dir`` (a folder on the same filesystem, e.g. a study
    folder's private one, where a killed writer's leftovers are cleared) or, by default, beside
    ``path`` as ``.<name>.<random>.tmp``. The file gets the permissions a plain ``open(path,
    "w")`` would give (``0o666`` less the umask), not the owner-only ones of the temporary file.
    """
    path = Path(path)
    with _naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=tmp_dir or path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return path


def _umask() -> int:
    """The process' umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str, tmp_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (:func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), tmp_dir)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, tmp_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (:func:`atomic_write_bytes`)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", tmp_dir)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], tmp_dir: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """Yield a temporary path; rename it onto ``path`` only if the block succeeds.

    Works for files and folders: whatever the block writes at the temporary path replaces
    ``path`` in one rename (a folder already at ``path`` is first moved aside into the same
    temporary folder, then removed), so a crash leaves the old ``path``, the new one or none,
    never half of one. The temporary folder is made in ``tmp_dir`` (same filesystem) or beside
    ``path`` (``.<name>.<random>.tmp``).
    """
    path = Path(path)
    with _naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=tmp_dir or path.parent))
    target = tmp / path.name
    try:
        with _naming(path):
            yield target
            if path.is_dir() and not path.is_symlink():
                os.replace(path, tmp / ".replaced")
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class LockedError(ValueError):
    """Another process holds the lock (and the caller would not wait, or waited long enough)."""


def _open_lock(path: Path) -> int:
    """The lock file's descriptor: created if missing, never through a symlink, only a regular file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as error:
        kind = "a symbolic link" if path.is_symlink() else "a folder" if path.is_dir() else "not usable"
        raise LockedError(f"the lock file {path} is {kind} ({error.strerror or error}); it must be a regular file "
                          "this library created: remove it if no run is using the folder") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LockedError(f"the lock file {path} is not a regular file; remove it if no run is using the folder")
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        here = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str], wait_s: float = 0.0, what: str = "") -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` for the ``with`` block; the file is created for it and
    removed when the block ends.

    Another process holding it makes this wait up to ``wait_s`` seconds, then raise
    :class:`LockedError` naming ``what`` and the process that holds it. The lock is the operating
    system's (``fcntl.flock``): a killed holder releases it. The file is never opened through a
    symbolic link and must be a regular file (anything else: :class:`LockedError`, one line).
    Where there is no ``fcntl`` (Windows), no lock is taken.

    Example:
        >>> import tempfile, pathlib
        >>> lock = pathlib.Path(tempfile.mkdtemp()) / ".lock"
        >>> with file_lock(lock, what="the demo folder"):
        ...     print("held", lock.exists())
        held True
        >>> lock.exists()
        False
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - POSIX only
        yield Path(path)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        fd = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            if time.monotonic() >= deadline:
                raise LockedError(f"{what or path} is in use by {holder} (lock {path})") from None
            time.sleep(0.5)
            continue
        if _same_file(fd, path):  # not a file its last holder removed while this process waited on it
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()}".encode(), 0)
        yield path
    finally:
        if _same_file(fd, path):
            path.unlink()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def remove_stale_temporaries(folder: str | os.PathLike[str], name: str) -> list[Path]:
    """Remove the temporaries :func:`atomic_path` leaves beside ``folder / name`` when its
    process is killed (``.{name}.*.tmp``). Call it only while holding the lock that keeps other
    writers of ``folder`` out. Returns what was removed.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); (d / ".entry.x1.tmp").mkdir(); (d / "entry").mkdir()
        >>> [p.name for p in remove_stale_temporaries(d, "entry")], sorted(p.name for p in d.iterdir())
        (['.entry.x1.tmp'], ['entry'])
    """
    if not name:
        raise ValueError("name the entry whose temporaries are removed")
    removed = []
    for tmp in Path(folder).glob(f".{name}.*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes (hex), read a block at a time.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "f"; _ = p.write_bytes(b"abc")
        >>> file_sha256(p)[:12]
        'ba7816bf8f01'
    """
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
