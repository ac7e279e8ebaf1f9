"""The whole study: every analysis for one or more models, and a self-contained report.

* :mod:`~stages_of_inference.study.config`: :class:`StudyConfig`, the settings, which also declare
  the ``stages-of-inference run`` options;
* :mod:`~stages_of_inference.study.registry`: one :class:`Analysis` entry per analysis (its settings,
  how it runs, its figures, its reading); :func:`register` adds one;
* :mod:`~stages_of_inference.study.run`: :func:`run_study`, reuse of finished results, :func:`load_study`;
* :mod:`~stages_of_inference.study.tasks`: the study as tasks (analysis, model, shard), their
  content-addressed results; :mod:`~stages_of_inference.study.sharded`: ``--shard I/N`` and
  ``merge``; :mod:`~stages_of_inference.study.distributed`: the Ray engine (docs: distributed/);
* :mod:`~stages_of_inference.study.readings` and :mod:`~stages_of_inference.study.html`: the report.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it; resolved on first use, so that the command line's
# parser (which reads study.config) imports no torch
_NAMES = {
    "DEFAULT_OUT_DIR": "config", "StudyConfig": "config", "build_report": "html", "REGISTRY": "registry",
    "Analysis": "registry", "Context": "registry", "Figure": "registry", "Style": "registry", "register": "registry",
    "Study": "run", "StudyMismatchError": "run", "load_study": "run", "run_study": "run",
    "Finishing": "registry", "merge_studies": "sharded", "run_shard": "sharded", "RayOptions": "distributed",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'stages_of_inference.study' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"stages_of_inference.study.{_NAMES[name]}"), name)
    globals()[name] = value
    return value
