"""Checks of user input that need no heavy import (the command line runs them before any model
loads): counts, devices, output paths, corpora.
"""

from __future__ import annotations

import numbers
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["PRECISIONS", "available_devices", "check_count", "check_device", "check_output_path", "check_precision"]

BACKEND_CHOICES = ("auto", "hooked", "bridge")
"""What a ``backend`` setting may say: ``"auto"`` picks ``"hooked"`` where TransformerLens has it, else ``"bridge"``."""

PRECISIONS = ("fp32", "bf16", "fp16")
"""The computing precisions every analysis that runs a model accepts (:mod:`stages_of_inference.precision`)."""


def check_precision(precision: Any) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a one-line ``ValueError``.

    Example:
        >>> check_precision("bf16")
        'bf16'
        >>> check_precision("int8")
        Traceback (most recent call last):
        ...
        ValueError: precision must be one of 'fp32', 'bf16', 'fp16', got 'int8'
    """
    if not isinstance(precision, str) or precision not in PRECISIONS:
        allowed = ", ".join(repr(p) for p in PRECISIONS)
        raise ValueError(f"precision must be one of {allowed}, got {precision!r}")
    return precision


def check_count(value: Any, name: str, what: str = "a positive integer") -> int:
    """``value`` as an ``int`` if it is a whole number of at least 1 (numpy integers accepted,
    booleans refused), else a ``ValueError`` naming ``name``.

    Example:
        >>> import numpy as np
        >>> check_count(np.int64(2), "batch_size")
        2
        >>> check_count(True, "batch_size")
        Traceback (most recent call last):
        ...
        ValueError: batch_size must be a positive integer, got True
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def available_devices() -> list[str]:
    """The device kinds this torch build can use here: ``cpu``, and ``cuda`` / ``mps`` when present.

    Example:
        >>> available_devices()[0]
        'cpu'
    """
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def check_device(device: Any) -> str | None:
    """``device`` as a device name this torch build can use (``None`` stays ``None``: the best
    available), else a ``ValueError`` naming the devices there are.

    Example:
        >>> check_device("cpu"), check_device(None)
        ('cpu', None)
        >>> check_device("banana")
        Traceback (most recent call last):
        ...
        ValueError: unknown device 'banana'; this machine has: cpu
    """
    if device is None:
        return None
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; this machine has: {', '.join(available_devices())}") from None
    available = available_devices()
    if parsed.type not in available:
        raise ValueError(f"device {str(device)!r} is not available in this torch build here; this machine has: "
                         f"{', '.join(available)}")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(device)


def check_output_path(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """``path`` if a folder (or file) can be written there, else a ``ValueError`` (a
    ``NotADirectoryError`` where a file stands in the way) saying why.
    Nothing is created: a temporary file is made and removed in the nearest existing folder.

    Example:
        >>> check_output_path("/proc/no/such/place")
        Traceback (most recent call last):
        ...
        ValueError: output folder /proc/no/such/place cannot be written: /proc does not accept new files (...)
    """
    target = Path(path).expanduser()
    probe = target if target.is_dir() else target.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"{what} {target} cannot be written: {probe} is a file, not a folder")
    if target.exists() and not target.is_dir() and what.endswith("folder"):
        raise NotADirectoryError(f"{what} {target} exists and is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".soi-write-check."):
            pass
    except OSError as error:
        raise ValueError(f"{what} {target} cannot be written: {probe} does not accept new files "
                         f"({error.strerror or error})") from None
    return target
