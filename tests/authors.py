"""The authors' interventions, written out plainly, as the reference the engine is checked against.

Deletion is the zero-ablation of a block's ``hook_attn_out`` and ``hook_mlp_out``
(:func:`stages_of_inference.interventions.hooks.drop_layer`); a swap exchanges two blocks'
weights and rebuilds the model (:func:`weight_swapped`). Used by the equivalence tests and by
``benchmarks/bench_sweep.py``.
"""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer


def weight_swapped(model: HookedTransformer, i: int) -> HookedTransformer:
    """The authors' swap: a fresh model of the same config loaded with a state dict whose
    ``blocks.i.*`` and ``blocks.{i+1}.*`` entries are exchanged (no re-processing)."""
    a, b = f"blocks.{i}.", f"blocks.{i + 1}."
    state = {}
    for name, value in model.state_dict().items():
        if name.startswith(a):
            name = b + name[len(a):]
        elif name.startswith(b):
            name = a + name[len(b):]
        state[name] = value
    fresh = HookedTransformer(model.cfg, tokenizer=model.tokenizer)
    fresh.load_state_dict(state)
    return fresh.eval()


def authors_entropy_bits(logits: torch.Tensor) -> torch.Tensor:
    """The authors' entropy (``model_intervention.py``, ``entropy_calculation.ipynb``), literally:
    probabilities clamped at 1e-9, then ``-sum(p * log2 p)`` of the clamped vector; in float64."""
    p = torch.clamp(torch.softmax(logits.double(), dim=-1), min=1e-9)
    return -torch.sum(p * torch.log2(p), dim=-1)
