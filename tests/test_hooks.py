"""Composable hooks: the authors' deletion hooks, the execution step, collectors under plans."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer

from stages_of_inference import LayerPlan, reordered, run_plan
from stages_of_inference.interventions.hooks import (
    ResidualReadout,
    collect,
    current_step,
    drop_layer,
    drop_layers,
)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_drop_layer_zeroes_both_outputs_so_the_residual_passes(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    hooks = drop_layer(tiny_model, 2)
    assert [name for name, _ in hooks] == ["blocks.2.hook_attn_out", "blocks.2.hook_mlp_out"]
    with tiny_model.hooks(fwd_hooks=hooks):
        _, cache = tiny_model.run_with_cache(tiny_tokens)
    assert torch.count_nonzero(cache["blocks.2.hook_attn_out"]) == 0
    assert torch.count_nonzero(cache["blocks.2.hook_mlp_out"]) == 0
    assert torch.equal(cache["blocks.2.hook_resid_post"], cache["blocks.2.hook_resid_pre"])
    # the hooks leave no trace after the context
    _, clean = tiny_model.run_with_cache(tiny_tokens)
    assert torch.count_nonzero(clean["blocks.2.hook_attn_out"]) > 0


def test_drop_layer_validates(tiny_model: HookedTransformer) -> None:
    with pytest.raises(ValueError, match=r"cannot drop block 4: the model has blocks 0 \.\. 3"):
        drop_layer(tiny_model, 4)
    with pytest.raises(TypeError):
        drop_layer(tiny_model, "1")  # type: ignore[arg-type]
    assert len(drop_layers(tiny_model, [0, 3])) == 4


def test_hooks_compose_with_plans(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    """Zeroing block 1 by hooks inside a plan that drops block 3 equals dropping both."""
    n = tiny_model.cfg.n_layers
    both = run_plan(tiny_model, tiny_tokens, LayerPlan.drop(n, 1, 3))
    composed = run_plan(tiny_model, tiny_tokens, LayerPlan.drop(n, 3), fwd_hooks=drop_layer(tiny_model, 1))
    assert (both - composed).abs().max() <= 1e-4
    with reordered(tiny_model, LayerPlan.drop(n, 3)):
        via_forward = tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=drop_layer(tiny_model, 1))
    assert (both - via_forward).abs().max() <= 1e-4


def test_current_step_is_none_outside_and_counts_steps(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    n = tiny_model.cfg.n_layers
    steps: list[tuple[int, int] | None] = []
    hooks = [(f"blocks.{i}.hook_resid_pre", lambda x, hook: steps.append(current_step(tiny_model))) for i in range(n)]
    plan = LayerPlan(order=(3, 1, 1, 0), n_layers=n)
    run_plan(tiny_model, tiny_tokens, plan, fwd_hooks=hooks)
    assert steps == [(0, 3), (1, 1), (2, 1), (3, 0)]
    steps.clear()
    with reordered(tiny_model, plan):
        tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=hooks)
        tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=hooks)  # the count restarts every forward
    assert steps == [(0, 3), (1, 1), (2, 1), (3, 0)] * 2
    assert current_step(tiny_model) is None


def test_collectors_work_under_reordering(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    """A residual readout taken under a swap sees the swapped stream; its point k is still the
    input of block k (by name), which under swap(1) (order 0, 2, 1, 3) runs right after block 0."""
    n = tiny_model.cfg.n_layers
    seen: dict[int, torch.Tensor] = {}
    readout = ResidualReadout(lambda k, x: seen.__setitem__(k, x.clone()), points=[2])
    with reordered(tiny_model, LayerPlan.swap(n, 1)):
        collect(tiny_model, tiny_tokens, [readout], progress=False)
        _, cache = tiny_model.run_with_cache(tiny_tokens)
    assert torch.equal(seen[2], cache["blocks.2.hook_resid_pre"])
    assert torch.equal(seen[2], cache["blocks.0.hook_resid_post"])
    assert torch.equal(cache["blocks.1.hook_resid_pre"], cache["blocks.2.hook_resid_post"])
