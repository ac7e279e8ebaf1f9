"""LayerPlan: constructors, description, validation and the JSON round trip."""

from __future__ import annotations

import dataclasses

import pytest

from stages_of_inference import LayerPlan
from stages_of_inference.interventions.plan import KINDS


def test_constructors_give_the_expected_orders() -> None:
    assert LayerPlan.identity(4).order == (0, 1, 2, 3)
    assert LayerPlan.drop(5, 2).order == (0, 1, 3, 4)
    assert LayerPlan.drop(5, 0, 4).order == (1, 2, 3)
    assert LayerPlan.drop(5, [1, 3]).order == (0, 2, 4)
    assert LayerPlan.swap(4, 2).order == (0, 1, 3, 2)
    assert LayerPlan.repeat(4, 1).order == (0, 1, 1, 2, 3)
    assert LayerPlan.repeat(4, [1, 2], times=3).order == (0, 1, 1, 1, 2, 2, 2, 3)
    assert LayerPlan.permute(3, (2, 1, 0)).order == (2, 1, 0)
    assert LayerPlan(order=(0, 0, 2), n_layers=3).order == (0, 0, 2)


@pytest.mark.parametrize(
    ("plan", "kind", "label"),
    [
        (LayerPlan.identity(4), "identity", "identity"),
        (LayerPlan.drop(6, 3), "drop", "drop 3"),
        (LayerPlan.drop(6, 0, 5), "drop", "drop 0,5"),
        (LayerPlan.swap(6, 4), "swap", "swap 4<->5"),
        (LayerPlan.repeat(6, [2, 3]), "repeat", "repeat 2,3 x2"),
        (LayerPlan.permute(3, [2, 0, 1]), "permute", "permute 2,0,1"),
        (LayerPlan(order=(0, 2, 2), n_layers=3), "custom", "custom 0,2,2"),
    ],
)
def test_kind_label_and_repr(plan: LayerPlan, kind: str, label: str) -> None:
    assert plan.kind == kind and kind in KINDS
    assert plan.label == label
    assert eval(repr(plan), {"LayerPlan": LayerPlan}) == plan  # repr is the constructor call


@pytest.mark.parametrize(
    "plan",
    [LayerPlan.identity(1), LayerPlan.drop(30, 7), LayerPlan.swap(30, 28), LayerPlan.repeat(5, [0, 4], 3),
     LayerPlan(order=(3, 3, 0), n_layers=4)],
)
def test_json_round_trip(plan: LayerPlan) -> None:
    text = plan.to_json()
    back = LayerPlan.from_json(text)
    assert back == plan and back.order == plan.order and back.n_layers == plan.n_layers
    assert hash(back) == hash(plan)
    assert LayerPlan.from_dict(plan.to_dict()) == plan


def test_plans_are_immutable() -> None:
    plan = LayerPlan.drop(4, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.order = (0, 1)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LayerPlan(order=(), n_layers=4), "empty"),
        (lambda: LayerPlan(order=(0, 4), n_layers=4), r"\[4\] out of range .* 0 \.\. 3"),
        (lambda: LayerPlan(order=(-1, 0), n_layers=4), "out of range"),
        (lambda: LayerPlan(order=(0,), n_layers=0), "n_layers must be at least 1"),
        (lambda: LayerPlan.drop(4, 4), r"cannot drop block\(s\) \[4\]"),
        (lambda: LayerPlan.drop(2, 0, 1), "cannot drop all 2 blocks"),
        (lambda: LayerPlan.drop(4, 1, 1), "twice"),
        (lambda: LayerPlan.drop(4), "at least one"),
        (lambda: LayerPlan.swap(4, 3), r"i in 0 \.\. 2"),
        (lambda: LayerPlan.repeat(4, 1, times=0), "times must be at least 1"),
        (lambda: LayerPlan.repeat(4, 9), "cannot repeat"),
        (lambda: LayerPlan.permute(3, [0, 1]), "exactly once"),
        (lambda: LayerPlan.from_json("not json"), "not a LayerPlan JSON"),
        (lambda: LayerPlan.from_json('{"order": [0]}'), "exactly the keys"),
        (lambda: LayerPlan.identity(3).check(4), "plan for a model with 3 blocks, but this model has 4"),
    ],
)
def test_validation_errors_are_clear(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_non_integer_indices_are_refused() -> None:
    # (under the test run's runtime type checker the annotation refuses them first: also a TypeError)
    with pytest.raises(TypeError, match="int"):
        LayerPlan(order=(0, 1.5), n_layers=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tuple|sequence"):
        LayerPlan(order="012", n_layers=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="int"):
        LayerPlan.drop(4, 1.0)  # type: ignore[arg-type]


def test_dropped_and_len() -> None:
    plan = LayerPlan.drop(6, 1, 4)
    assert plan.dropped == (1, 4)
    assert len(plan) == 4 and list(plan) == [0, 2, 3, 5]
    assert LayerPlan.identity(3).is_identity and not plan.is_identity
