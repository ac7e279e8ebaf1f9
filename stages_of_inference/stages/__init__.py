"""One analysis module per stage of inference (PAPER.md):

* :mod:`.detokenization`: attention to previous tokens, subjoiner heads;
* :mod:`.feature_engineering`: logit-lens trajectory, layer similarity (CKA), probes;
* :mod:`.prediction_ensembling`: prediction / suppression neurons, token-class neurons, ensembles;
* :mod:`.residual_sharpening`: final-block sharpening, suppression share, layer repetition;

and beyond the paper:

* :mod:`.sinks`: attention sinks, massive activations and residual norms, block by block.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("detokenization", "feature_engineering", "prediction_ensembling", "residual_sharpening", "sinks")
__all__ = list(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
