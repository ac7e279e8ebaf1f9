"""Checkpoints of a sweep: each finished batch of sequences saved as it is done, so that an
interrupted sweep resumes where it stopped, with identical numbers.

A checkpoint folder holds ``manifest.json`` (the sweep's fingerprint: model config and weights,
token digest, settings) and one ``batch_NNNNN.sums.parquet`` per finished batch (plus its
``.per_token.parquet`` when the sweep keeps one). The sums file is written last, atomically: its
presence marks the batch as done. A folder written by a different sweep is refused, naming what
differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from torch import Tensor

from stages_of_inference._utils import atomic_path, atomic_write_json
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
    """Raise a ``ValueError`` naming every difference if ``found`` is not ``expected``."""
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
        """Save one finished batch (the sums file last: its presence marks the batch done)."""
        stem = f"batch_{batch.index:05d}"
        if batch.per_token is not None:
            with atomic_path(self.folder / f"{stem}.per_token.parquet") as tmp:
                batch.per_token.to_parquet(tmp, index=False)
        with atomic_path(self.folder / f"{stem}.sums.parquet") as tmp:
            batch.sums.to_parquet(tmp, index=False)

    def _load(self, per_token: bool) -> dict[int, BatchResult]:
        done: dict[int, BatchResult] = {}
        for path in sorted(self.folder.glob("batch_*.sums.parquet")):
            index = int(path.name.split(".")[0].split("_")[1])
            table = None
            if per_token:
                tok_path = self.folder / f"batch_{index:05d}.per_token.parquet"
                if not tok_path.exists():
                    continue
                table = pd.read_parquet(tok_path)
            done[index] = BatchResult(index, pd.read_parquet(path), table)
        return done
