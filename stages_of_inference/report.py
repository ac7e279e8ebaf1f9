"""The study under its earlier name: everything is in :mod:`stages_of_inference.study` now."""

from __future__ import annotations

from stages_of_inference.study import *  # noqa: F403
from stages_of_inference.study import __all__  # noqa: F401
from stages_of_inference.study.registry import PAPER_ANALYSES as ANALYSES  # noqa: F401
