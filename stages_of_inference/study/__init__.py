"""The whole study: every analysis for one or more models, and a self-contained report.

* :mod:`~stages_of_inference.study.config`: :class:`StudyConfig`, the settings, which also declare
  the ``stages-of-inference run`` options;
* :mod:`~stages_of_inference.study.registry`: one :class:`Analysis` entry per analysis (its settings,
  how it runs, its figures, its reading); :func:`register` adds one;
* :mod:`~stages_of_inference.study.run`: :func:`run_study`, reuse of finished results, :func:`load_study`;
* :mod:`~stages_of_inference.study.readings` and :mod:`~stages_of_inference.study.html`: the report.
"""

from __future__ import annotations

from stages_of_inference.study.config import DEFAULT_OUT_DIR, StudyConfig
from stages_of_inference.study.html import build_report
from stages_of_inference.study.registry import REGISTRY, Analysis, Context, Figure, Style, register
from stages_of_inference.study.run import Study, StudyMismatchError, load_study, run_study

__all__ = ["DEFAULT_OUT_DIR", "REGISTRY", "Analysis", "Context", "Figure", "Study", "StudyConfig",
           "StudyMismatchError", "Style", "build_report", "load_study", "register", "run_study"]
