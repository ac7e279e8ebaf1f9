"""The shared logistic-regression probe: learns linear labels, not shuffled ones; deterministic."""

from __future__ import annotations

import pytest
import torch

from stages_of_inference.probes import ProbeResult, fit_probe


def _data(n: int = 600, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.1, 10.0, d)  # very different feature scales
    w = torch.randn(d, generator=g) / torch.linspace(0.1, 10.0, d)
    return x, (x @ w > 0.3).long()


def test_linear_label_is_learned():
    x, y = _data()
    r = fit_probe(x, y)
    assert isinstance(r, ProbeResult)
    assert r.accuracy > 0.93
    assert r.accuracy > r.baseline + 0.3
    assert r.n_train + r.n_test == len(y) and r.n_test == 150
    assert r.classes == (0, 1)


def test_shuffled_labels_stay_near_the_majority_baseline():
    x, y = _data(n=800, d=32)
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    r = fit_probe(x, y)
    assert r.train_accuracy > r.accuracy  # it does fit the training rows
    assert abs(r.accuracy - r.baseline) < 0.1
    assert r.accuracy < 0.65


def test_multiclass_labels_and_label_values_are_kept():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 4
    cls = torch.randint(0, 3, (450,), generator=g)
    x = centres[cls] + torch.randn(450, 8, generator=g)
    labels = torch.tensor([7, 11, 42])[cls]
    r = fit_probe(x, labels)
    assert r.classes == (7, 11, 42)
    assert r.accuracy > 0.95
    assert set(r.predict(x[:20]).tolist()) <= {7, 11, 42}
    assert r.weight.shape == (3, 8)


def test_boolean_labels_and_determinism():
    x, y = _data()
    a = fit_probe(x, y.bool(), seed=3)
    b = fit_probe(x, y.bool(), seed=3)
    c = fit_probe(x, y.bool(), seed=4)
    assert a.accuracy == b.accuracy and torch.equal(a.weight, b.weight)
    assert a.classes == (0, 1)
    assert not torch.equal(a.weight, c.weight)  # another split, another fit


def test_majority_baseline_is_the_training_majority_on_test_rows():
    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(100, dtype=torch.long)
    y[:20] = 1
    r = fit_probe(x, y, test_fraction=0.5)
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    assert r.baseline == pytest.approx(float((y[perm[:50]] == 0).double().mean()))


def test_works_under_inference_mode():
    x, y = _data()
    with torch.inference_mode():
        r = fit_probe(x, y)
    assert r.accuracy > 0.93


def test_bad_input_is_refused():
    x, y = _data(n=40)
    with pytest.raises(ValueError, match="two classes"):
        fit_probe(x, torch.zeros(40, dtype=torch.long))
    with pytest.raises((ValueError, TypeError)):  # jaxtyping's check in the test run, ours otherwise
        fit_probe(x, y[:10])
    with pytest.raises(ValueError, match="test_fraction"):
        fit_probe(x, y, test_fraction=1.0)
    with pytest.raises(ValueError, match="at least 4 rows"):
        fit_probe(x[:3], y[:3])
    with pytest.raises(ValueError, match="NaN"):
        fit_probe(torch.full((40, 16), float("nan")), y)
