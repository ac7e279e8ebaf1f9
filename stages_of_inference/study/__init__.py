"""The whole study: every analysis for one or more models, and a self-contained report.

The modules, from the bottom up (each imports only the ones above it in this list; the layering
is checked by ``tests/test_layers.py``):

* :mod:`~stages_of_inference.study.options`: the ``run`` options of the settings (no torch);
* :mod:`~stages_of_inference.study.registry`: :class:`Analysis` (one entry per analysis),
  :func:`register`, :class:`Study` (what a study made);
* :mod:`~stages_of_inference.study.readings`: the written readings of the figures;
* :mod:`~stages_of_inference.study.analyses`: the built-in analyses, one entry each;
* :mod:`~stages_of_inference.study.config`: :class:`StudyConfig`, the settings;
* :mod:`~stages_of_inference.study.identity`: fingerprints, model and batch identity, the record;
* :mod:`~stages_of_inference.study.folder`: the folder a study owns, :func:`load_study`;
* :mod:`~stages_of_inference.study.tasks`: the study as tasks, the task function, the task store;
* :mod:`~stages_of_inference.study.html`: the report; :mod:`~stages_of_inference.study.finish`:
  finishing an analysis, writing the study;
* :mod:`~stages_of_inference.study.engine`: the one runner's books, and running in this process;
* :mod:`~stages_of_inference.study.distributed` (Ray), :mod:`~stages_of_inference.study.sharded`
  (``--shard`` and ``merge``), :mod:`~stages_of_inference.study.run` (:func:`run_study`).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it; resolved on first use, so that the command line's
# parser (which reads study.options) imports no torch
_NAMES = {
    "DEFAULT_OUT_DIR": "config", "StudyConfig": "config", "build_report": "html", "REGISTRY": "registry",
    "Analysis": "registry", "Context": "registry", "Figure": "registry", "Style": "registry", "register": "registry",
    "Finishing": "registry", "Study": "registry", "StudyMismatchError": "folder", "FolderError": "folder",
    "load_study": "folder", "run_study": "run", "merge_studies": "sharded", "run_shard": "sharded",
    "RayOptions": "distributed",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'stages_of_inference.study' has no attribute {name!r}")
    importlib.import_module("stages_of_inference.study.config")  # the built-in analyses are registered with it
    value = getattr(importlib.import_module(f"stages_of_inference.study.{_NAMES[name]}"), name)
    globals()[name] = value
    return value
