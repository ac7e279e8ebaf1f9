"""Result objects: long-form DataFrames with provenance, saved as Parquet or CSV plus JSON.

Every analysis returns pandas DataFrames whose ``attrs["provenance"]`` records how they were
made (:func:`provenance`). A :class:`Result` groups named tables with one provenance record and
saves them to a folder; nothing here ever unpickles.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import transformer_lens

from stages_of_inference import __version__, self_check
from stages_of_inference._tl import Model
from stages_of_inference._utils import atomic_path, atomic_write_json, file_sha256
from stages_of_inference.backends import backend_of, weight_mode
from stages_of_inference.batch import TokenBatch, describe_any

__all__ = ["FILES_KEY", "FORMATS", "PROVENANCE_FILE", "DamagedResultError", "Result", "config_hash", "file_sha256",
           "load_table", "model_name", "provenance", "runtime", "save_table", "weights_hash", "with_provenance"]

FORMATS = ("parquet", "csv")

PROVENANCE_FILE = "provenance.json"
"""The provenance record of a saved :class:`Result`, beside its tables."""


def config_hash(model: Model) -> str:
    """A short stable hash of a model's TransformerLens config (which weights-independent shape it
    has; its name, device and device count are left out).
    """
    cfg = {k: str(v) for k, v in sorted(model.cfg.to_dict().items()) if k not in ("device", "n_devices", "model_name")}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def weights_hash(model: Model) -> str:
    """A hash of every parameter and buffer's bytes: which weights a checkpoint was made with.

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=5, act_fn="relu"))
        >>> len(weights_hash(m))
        16
    """
    digest = hashlib.blake2b(digest_size=8)
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(value.dtype).encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def model_name(model: Model) -> str:
    """The model's name: ``model.cfg.model_name`` (``load_model`` sets it to the name it was given)."""
    return str(model.cfg.model_name)


def provenance(
    model: Model | None = None,
    tokens: TokenBatch | torch.Tensor | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """How a result was made: model, data, settings and library versions.

    The data are described by :meth:`TokenBatch.describe` (corpus, seed, shape, digest); a plain
    tensor records its shape and digest, with corpus and seed ``None``.

    Example:
        >>> p = provenance(None, None, analysis="demo", seed=0)
        >>> p["settings"]["analysis"], "stages_of_inference" in p["versions"]
        ('demo', True)
    """
    record: dict[str, Any] = {
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "stages_of_inference": __version__,
            "transformer_lens": getattr(transformer_lens, "__version__", None) or _distribution_version("transformer-lens"),
            "torch": torch.__version__,
            "pandas": pd.__version__,
            "python": platform.python_version(),
        },
        "settings": {k: _jsonable(v) for k, v in settings.items()},
        "runtime": runtime(model),
    }
    if model is not None:
        record["model"] = {
            "name": model_name(model),
            "config_hash": config_hash(model),
            "n_layers": model.cfg.n_layers,
            "d_model": model.cfg.d_model,
            "d_vocab": model.cfg.d_vocab,
            "dtype": str(model.cfg.dtype),
            "device": str(model.cfg.device),
            **_backend_record(model),
        }
    if tokens is not None:
        record["tokens"] = describe_any(tokens)
    return record


def runtime(model: Model | None = None) -> dict[str, Any]:
    """Where and how the numbers were computed, which a low precision's numbers depend on (a BLAS
    or cuBLAS picks its kernels, and so its order of summation, by device, thread count and
    shapes): the device, torch's intra-op threads, the CPU or GPU, and the CUDA version. The
    batch size, stacking and precision an analysis used are in its ``settings``.

    Example:
        >>> sorted(runtime())
        ['cuda', 'device', 'processor', 'torch_threads']
    """
    device = str(model.cfg.device) if model is not None else "cpu"
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {"device": device, "torch_threads": torch.get_num_threads(), "processor": gpu or _cpu_name(),
            "cuda": torch.version.cuda}


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    """The CPU's model name where the system tells it (Linux), else the machine type."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _backend_record(model: Model) -> dict[str, Any]:
    """The backend, how it holds the weights (:func:`~stages_of_inference.backends.weight_mode`) and
    what the load-time self-check found (:mod:`~stages_of_inference.self_check`; absent for a model
    this library did not load).
    """
    try:
        record: dict[str, Any] = {"backend": backend_of(model), "weights": weight_mode(model)}
    except TypeError:  # a stand-in object without a seam (tests of the record itself)
        return {}
    found = self_check.finding(model)
    if found is not None:
        record["self_check"] = found.record()
    return record


def _distribution_version(name: str) -> str:
    """The installed version of a distribution (TransformerLens 3.x has no ``__version__``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def with_provenance(df: pd.DataFrame, record: Mapping[str, Any]) -> pd.DataFrame:
    """Attach a provenance record to ``df.attrs`` and return ``df``."""
    df.attrs["provenance"] = dict(record)
    return df


def save_table(df: pd.DataFrame, path: str | Path, fmt: str = "parquet") -> Path:
    """Save ``df`` to ``path`` (suffix set from ``fmt``) and its provenance to ``path`` + ``.json``.

    Both files are written atomically. Returns the data file's path.

    Example:
        >>> import pandas as pd, tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> p = save_table(with_provenance(pd.DataFrame({"layer": [0, 1]}), {"seed": 0}), d / "t")
        >>> load_table(p).attrs["provenance"]["seed"]
        0
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; allowed: {', '.join(FORMATS)}")
    path = Path(path).with_suffix(f".{fmt}")
    with atomic_path(path) as tmp:
        if fmt == "parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
    atomic_write_json(path.with_suffix(path.suffix + ".json"), df.attrs.get("provenance", {}))
    return path


def load_table(path: str | Path) -> pd.DataFrame:
    """Load a table written by :func:`save_table`, with its provenance in ``attrs``."""
    path = Path(path)
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    elif path.suffix == ".csv":
        df = pd.read_csv(path)
    else:
        raise ValueError(f"cannot read {path.name}: expected a .parquet or .csv file")
    meta = path.with_suffix(path.suffix + ".json")
    df.attrs["provenance"] = json.loads(meta.read_text()) if meta.exists() else {}
    return df


@dataclass
class Result:
    """Named long-form tables that share one provenance record.

    Attributes:
        tables: table name -> DataFrame (each also carries the provenance in ``attrs``).
        provenance: how the tables were made (see :func:`provenance`).

    Example:
        >>> import pandas as pd, tempfile
        >>> r = Result({"summary": pd.DataFrame({"layer": [0]})}, {"seed": 0})
        >>> out = r.save(tempfile.mkdtemp() + "/r")
        >>> Result.load(out).tables["summary"].equals(r.tables["summary"])
        True
    """

    tables: dict[str, pd.DataFrame]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for df in self.tables.values():
            df.attrs["provenance"] = self.provenance

    def __getitem__(self, name: str) -> pd.DataFrame:
        try:
            return self.tables[name]
        except KeyError:
            raise KeyError(f"no table {name!r}; this result has: {', '.join(self.tables)}") from None

    def save(self, out_dir: str | Path, fmt: str = "parquet", tmp_dir: str | Path | None = None) -> Path:
        """Write every table and ``provenance.json`` into ``out_dir`` (replaced as a whole,
        atomically, through a temporary folder in ``tmp_dir`` or beside ``out_dir``).
        ``provenance.json`` also records the SHA-256 of every file beside it (``files``), which
        :meth:`load` checks.
        """
        if fmt not in FORMATS:
            raise ValueError(f"unknown table format {fmt!r}; allowed: {', '.join(FORMATS)}")
        out_dir = Path(out_dir)
        with atomic_path(out_dir, tmp_dir) as tmp:
            tmp.mkdir()
            for name, df in self.tables.items():
                save_table(df, tmp / name, fmt)
            files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
            atomic_write_json(tmp / PROVENANCE_FILE, {**self.provenance, FILES_KEY: files})
        return out_dir

    @classmethod
    def load(cls, out_dir: str | Path) -> Result:
        """Read a folder written by :meth:`save` as untrusted input: ``provenance.json`` must be a
        JSON object whose ``files`` maps plain file names in the folder to their SHA-256; every
        file is checked against its digest, and only regular files are opened (a FIFO, a device
        or a link is never read). Anything else raises :class:`DamagedResultError` naming the file.
        """
        out_dir = Path(out_dir)
        meta = out_dir / PROVENANCE_FILE
        if not os.path.lexists(meta):
            raise FileNotFoundError(f"{out_dir} holds no saved result (no provenance.json)")
        record = _read_record(meta)
        files = record.pop(FILES_KEY, None)
        for name, digest in _checked_files(files, meta).items():
            path = out_dir / name
            if not _regular(path):
                raise DamagedResultError(f"{path} is missing (or not a regular file)")
            if file_sha256(path) != digest:
                raise DamagedResultError(f"{path} was altered after it was written (its SHA-256 differs from "
                                         f"the one in {PROVENANCE_FILE})")
        tables = {}
        for path in sorted(out_dir.iterdir()):
            if path.suffix in (".parquet", ".csv") and not _regular(path):
                raise DamagedResultError(f"{path} is not a regular file")
            if path.suffix in (".parquet", ".csv"):
                try:
                    tables[path.stem] = load_table(path)
                except (OSError, ValueError) as error:  # pyarrow's and json's errors are ValueErrors
                    raise DamagedResultError(f"{path} cannot be read ({type(error).__name__}: "
                                             f"{str(error).splitlines()[0][:160]})") from None
        return cls(tables, record)


class DamagedResultError(ValueError):
    """A saved result's files cannot be read back as they were written."""


MAX_RECORD_BYTES = 64 << 20
"""A ``provenance.json`` larger than this is damaged (records are small)."""


def _regular(path: Path) -> bool:
    """Whether ``path`` is a regular file (not followed through a link; a FIFO is not opened)."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _read_record(meta: Path) -> dict[str, Any]:
    """``provenance.json`` as a dict, read only if it is a regular file of a sane size."""
    if not _regular(meta):
        raise DamagedResultError(f"{meta} is not a regular file")
    if meta.lstat().st_size > MAX_RECORD_BYTES:
        raise DamagedResultError(f"{meta} is larger than {MAX_RECORD_BYTES} bytes")
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise DamagedResultError(f"{meta} cannot be read ({type(error).__name__}: {str(error)[:160]})") from None
    if not isinstance(record, dict):
        raise DamagedResultError(f"{meta} is not a JSON object")
    return record


def _checked_files(files: Any, meta: Path) -> dict[str, str]:
    """The ``files`` of a record: plain names of files beside it (never a path leading out of its
    folder) and their SHA-256 digests.
    """
    if files is None:
        return {}
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise DamagedResultError(f"{meta}: its {FILES_KEY!r} is not a mapping of file names to digests")
    for name in files:
        if not name or name in (".", "..") or "/" in name or "\\" in name or name != Path(name).name:
            raise DamagedResultError(f"{meta} names {name!r}, which is not a file of its folder")
    return files


FILES_KEY = "files"
"""The key of ``provenance.json`` that records the SHA-256 of each file of a saved result."""
