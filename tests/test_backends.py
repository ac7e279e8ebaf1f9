"""The model seam: the engine reaches a model only through it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_tiny_model

from stages_of_inference import LayerPlan, run_plan
from stages_of_inference._utils import check_model
from stages_of_inference.backends import ModelSeam, as_seam
from stages_of_inference.backends.hooked import HookedSeam
from stages_of_inference.interventions.executor import evaluate_plans


class RecordingSeam:
    """A seam that is not a HookedTransformer: it delegates to one and records every call."""

    def __init__(self, model: Any) -> None:
        self._inner = HookedSeam(model)
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if callable(value):
            def recorded(*args: Any, **kwargs: Any) -> Any:
                self.calls.append(name)
                return value(*args, **kwargs)
            return recorded
        return value

    # the Protocol's properties, looked up on the class by isinstance checks
    model = property(lambda self: self._inner.model)
    name = property(lambda self: self._inner.name)
    n_layers = property(lambda self: self._inner.n_layers)
    d_vocab = property(lambda self: self._inner.d_vocab)
    device = property(lambda self: self._inner.device)
    unembed_module = property(lambda self: self._inner.unembed_module)
    W_U = property(lambda self: self._inner.W_U)
    b_U = property(lambda self: self._inner.b_U)
    softcap = property(lambda self: self._inner.softcap)

    def blocks(self) -> Any:
        self.calls.append("blocks")
        return self._inner.blocks()

    def embed(self, tokens: Any) -> Any:
        self.calls.append("embed")
        return self._inner.embed(tokens)

    def run_block(self, *args: Any) -> Any:
        self.calls.append("run_block")
        return self._inner.run_block(*args)

    def final_norm(self, residual: Any) -> Any:
        self.calls.append("final_norm")
        return self._inner.final_norm(residual)

    def W_out(self, layer: int) -> Any:
        return self._inner.W_out(layer)

    def hooks(self, fwd_hooks: Any) -> Any:
        return self._inner.hooks(fwd_hooks)

    def has_hooks(self, module: Any) -> bool:
        return self._inner.has_hooks(module)

    def fast_blocks(self, embedded: Any, enabled: bool, dtype: Any = None) -> Any:
        self.calls.append("fast_blocks")
        return self._inner.fast_blocks(embedded, enabled, dtype)

    def loss(self, *args: Any) -> Any:
        return self._inner.loss(*args)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_sweep_and_run_plan_work_through_any_seam(family: str, tiny_tokens: torch.Tensor) -> None:
    model = make_tiny_model(family)
    seam = RecordingSeam(model)
    assert isinstance(seam, ModelSeam) and as_seam(seam) is seam
    n = model.cfg.n_layers
    plans = [LayerPlan.drop(n, i) for i in range(n)] + [LayerPlan.swap(n, 0)]
    for fast in (False, True):
        direct = evaluate_plans(model, tiny_tokens, plans, progress=False, fast_path=fast)
        through = evaluate_plans(seam, tiny_tokens, plans, progress=False, fast_path=fast)
        cols = ["kl_nats", "loss", "accuracy", "top1_agreement", "entropy_bits"]
        assert (direct[cols] - through[cols]).abs().to_numpy().max() == 0.0
    assert {"embed", "final_norm", "fast_blocks"} <= set(seam.calls)
    assert "run_block" in seam.calls  # the fast_path=False sweep ran every block through the seam
    seam.calls.clear()
    plan = LayerPlan.swap(n, 1)
    assert torch.equal(run_plan(seam, tiny_tokens, plan), run_plan(model, tiny_tokens, plan))
    assert seam.calls.count("run_block") == n and seam.calls.count("embed") == 1


def test_anything_else_is_refused_with_what_is_allowed() -> None:
    with pytest.raises(TypeError, match="expected a TransformerLens HookedTransformer or TransformerBridge, got str"):
        as_seam("gpt2")
    with pytest.raises(TypeError, match="got dict"):  # what every analysis' check_model says
        check_model({})
