"""Checkpoints of a sweep: each finished batch of sequences saved as it is done, so that an
interrupted sweep resumes where it stopped, with identical numbers.

A checkpoint folder holds ``manifest.json`` (the sweep's fingerprint: model config and weights,
token digest, settings) and per finished batch ``batch_NNNNN.sums.parquet`` (plus its
``.per_token.parquet`` and ``.effects.parquet`` when the sweep keeps them) and ``batch_NNNNN.json``, the SHA-256 of those
files, written last: a batch is done when its marker exists and its files still match it (a
batch altered or truncated since is computed again). A folder written by a different sweep is
refused, naming what differs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
from torch import Tensor

from stages_of_inference._utils import atomic_path, atomic_write_json, file_sha256
from stages_of_inference.batch import token_digest
from stages_of_inference.interventions.executor import BatchResult
from stages_of_inference.results import config_hash, weights_hash

__all__ = ["CHECKPOINT_DIR", "CheckpointMismatchError", "MANIFEST", "SweepCheckpoint", "refuse_mismatch",
    "sweep_fingerprint"]

CHECKPOINT_DIR = "checkpoint"
"""The checkpoint's folder inside a sweep's ``out_dir``."""

MANIFEST = "manifest.json"
"""The checkpoint's fingerprint file."""


def sweep_fingerprint(model: Any, tokens: Tensor, settings: dict[str, Any]) -> dict[str, Any]:
    """What a sweep's numbers depend on: the model's config and weights, the tokens, the settings."""
    return {
        "model_config_hash": config_hash(model),
        "model_weights_hash": weights_hash(model),
        "tokens_shape": list(tokens.shape),
        "tokens_sha256": token_digest(tokens),
        **settings,
    }


class CheckpointMismatchError(ValueError):
    """A checkpoint folder holds another sweep's checkpoint, or is not a checkpoint at all."""


def refuse_mismatch(where: Path, found: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise a ``ValueError`` naming every difference if ``found`` is not ``expected``.

    Example:
        >>> from pathlib import Path
        >>> refuse_mismatch(Path("ckpt"), {"batch_size": 8}, {"batch_size": 8})
        >>> refuse_mismatch(Path("ckpt"), {"batch_size": 8}, {"batch_size": 4})
        Traceback (most recent call last):
        ...
        stages_of_inference.interventions.checkpoint.CheckpointMismatchError: ckpt was written by a different sweep, so it cannot be resumed: batch_size: checkpoint has 8, this run has 4. ...
    """
    keys = sorted(set(found) | set(expected))
    diffs = [f"{k}: checkpoint has {found.get(k)!r}, this run has {expected.get(k)!r}"
             for k in keys if found.get(k) != expected.get(k)]
    if diffs:
        raise CheckpointMismatchError(
            f"{where} was written by a different sweep, so it cannot be resumed: " + "; ".join(diffs)
            + ". Use another out_dir, or delete this one to start over."
        )


class SweepCheckpoint:
    """The checkpoint of a sweep whose result goes to ``out_dir``.

    Example:
        >>> import tempfile, pandas as pd
        >>> ckpt = SweepCheckpoint(tempfile.mkdtemp())
        >>> ckpt.open({"seed": 0}, per_token=False)
        {}
        >>> ckpt.save(BatchResult(0, pd.DataFrame({"plan_id": [-1], "n_tokens": [3]}), None))
        >>> list(SweepCheckpoint(ckpt.out_dir).open({"seed": 0}, per_token=False))
        [0]
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.folder = self.out_dir / CHECKPOINT_DIR

    def open(self, fingerprint: dict[str, Any], per_token: bool) -> dict[int, BatchResult]:
        """Start or resume: the finished batches (none for a new checkpoint); a folder that is
        not empty and holds no checkpoint, or holds another sweep's, is refused.
        """
        if self.out_dir.exists() and any(self.out_dir.iterdir()) and not self.folder.is_dir():
            raise CheckpointMismatchError(
                f"out_dir {self.out_dir} is not empty and holds no sweep checkpoint or result; "
                "give a new or empty folder (it is replaced by the result when the sweep finishes)"
            )
        manifest = self.folder / MANIFEST
        if not manifest.exists():
            atomic_write_json(manifest, fingerprint)
            return {}
        refuse_mismatch(self.folder, json.loads(manifest.read_text()), fingerprint)
        return self._load(per_token)

    def save(self, batch: BatchResult) -> None:
        """Save one finished batch; its marker, the digests of its files, is written last: a
        batch counts as done only when the marker exists and its files still match it.
        """
        stem = f"batch_{batch.index:05d}"
        files = {f"{stem}.sums.parquet": batch.sums}
        if batch.per_token is not None:
            files[f"{stem}.per_token.parquet"] = batch.per_token
        if batch.effects is not None:
            files[f"{stem}.effects.parquet"] = batch.effects
        for name, table in files.items():
            with atomic_path(self.folder / name) as tmp:
                table.to_parquet(tmp, index=False)
        atomic_write_json(self.folder / f"{stem}.json", {name: file_sha256(self.folder / name) for name in files})

    def _load(self, per_token: bool) -> dict[int, BatchResult]:
        done: dict[int, BatchResult] = {}
        for marker in sorted(self.folder.glob("batch_*.json")):
            index = int(marker.stem.split("_")[1])
            batch = self._read(marker, index, per_token)
            if batch is not None:
                done[index] = batch
        return done

    def _read(self, marker: Path, index: int, per_token: bool) -> BatchResult | None:
        """A finished batch, or ``None`` (to be computed again) when its files do not match its marker."""
        stem = f"batch_{index:05d}"
        try:
            digests = json.loads(marker.read_text())
            if any(file_sha256(self.folder / name) != digest for name, digest in digests.items()):
                raise ValueError("a file differs from its digest")
            sums = pd.read_parquet(self.folder / f"{stem}.sums.parquet")
            table = pd.read_parquet(self.folder / f"{stem}.per_token.parquet") if per_token else None
            effects_file = f"{stem}.effects.parquet"
            effects = pd.read_parquet(self.folder / effects_file) if effects_file in digests else None
        except (OSError, ValueError) as error:
            warnings.warn(f"checkpoint batch {index} in {self.folder} is damaged ({error}); computing it again",
                          stacklevel=4)
            return None
        return BatchResult(index, sums, table, effects)
