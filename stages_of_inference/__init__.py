"""stages_of_inference: layer deletion, layer swaps, the logit lens and neuron analyses of the
four stages of inference (Lad, Lee, Gurnee & Tegmark, "The Remarkable Robustness of LLMs: Stages
of Inference?", arXiv:2406.19384), on TransformerLens ``HookedTransformer`` models.

Importing the package loads no model, touches no network and does not even import torch: every
public name is resolved on first use.

Example:
    >>> import stages_of_inference as soi
    >>> soi.LayerPlan.drop(4, 1).order
    (0, 2, 3)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_NAMES = {
    "load_model": "stages_of_inference.models",
    "list_models": "stages_of_inference.models",
    "load_tokens": "stages_of_inference.data",
    "load_token_batch": "stages_of_inference.data",
    "TokenBatch": "stages_of_inference.batch",
    "LayerPlan": "stages_of_inference.interventions.plan",
    "run_plan": "stages_of_inference.interventions.forward",
    "reordered": "stages_of_inference.interventions.forward",
    "EngineOptions": "stages_of_inference.interventions.options",
    "robustness_sweep": "stages_of_inference.robustness",
    "SweepResult": "stages_of_inference.robustness",
    "Result": "stages_of_inference.results",
    "provenance": "stages_of_inference.results",
    "relative_depth": "stages_of_inference._utils",
    "run_study": "stages_of_inference.study",
}
# public submodule -> module path
_MODULES = {
    "hooks": "stages_of_inference.interventions.hooks",
    "interventions": "stages_of_inference.interventions",
    "metrics": "stages_of_inference.metrics",
    "lens": "stages_of_inference.lens",
    "tuned_lens": "stages_of_inference.tuned_lens",
    "jacobian_lens": "stages_of_inference.jacobian_lens",
    "stages": "stages_of_inference.stages",
    "plots": "stages_of_inference.plots",
    "results": "stages_of_inference.results",
    "models": "stages_of_inference.models",
    "data": "stages_of_inference.data",
    "study": "stages_of_inference.study",
    "backends": "stages_of_inference.backends",
    "precision": "stages_of_inference.precision",
}

__all__ = sorted([*_NAMES, *_MODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'stages_of_inference' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
