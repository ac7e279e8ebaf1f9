"""A small, deterministic logistic-regression probe in torch, shared by the stage analyses.

:func:`fit_probe` splits the rows into a training and a held-out set with a seeded permutation,
standardises the features with the training set's statistics, fits a multinomial logistic
regression (binary is the two-class case) with an L2 penalty by full-batch L-BFGS in float64, and
reports held-out accuracy beside the majority-class baseline (the accuracy of always predicting
the training set's most frequent class). Same inputs and seed, same numbers.

Used by :func:`stages_of_inference.stages.feature_engineering.probe_layers` (probes on the
residual stream) and by the prediction-ensembling analysis (probes on neuron activations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["ProbeResult", "fit_probe"]


@dataclass(frozen=True)
class ProbeResult:
    """A fitted probe and how well it does.

    Attributes:
        accuracy: held-out accuracy (fraction of test rows whose predicted class is right).
        baseline: held-out accuracy of always predicting the training set's majority class.
        train_accuracy: accuracy on the training rows.
        n_train: number of training rows.
        n_test: number of held-out rows.
        classes: the label values, in the order of the probe's output columns.
        weight: ``[n_classes, d]`` weights acting on *standardised* features.
        bias: ``[n_classes]`` biases.
        mean: ``[d]`` training-set feature means used for standardising.
        std: ``[d]`` training-set feature standard deviations (floored) used for standardising.
    """

    accuracy: float
    baseline: float
    train_accuracy: float
    n_train: int
    n_test: int
    classes: tuple[int, ...]
    weight: Tensor
    bias: Tensor
    mean: Tensor
    std: Tensor

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def gain(self) -> float:
        """Held-out accuracy above the majority baseline."""
        return self.accuracy - self.baseline

    def logits(self, features: Float[Tensor, "n d"]) -> Float[Tensor, "n n_classes"]:
        """Class logits of new rows (raw, unstandardised features)."""
        x = (features.to(self.mean) - self.mean) / self.std
        return x @ self.weight.T + self.bias

    def predict(self, features: Float[Tensor, "n d"]) -> Int[Tensor, " n"]:
        """Predicted label values of new rows (raw, unstandardised features).

        Example:
            >>> import torch
            >>> x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
            >>> probe = fit_probe(x, (x[:, 0] > 0).long())
            >>> probe.predict(torch.tensor([[5.0, 0.0, 0.0], [-5.0, 0.0, 0.0]])).tolist()
            [1, 0]
        """
        classes = torch.tensor(self.classes, device=self.weight.device)
        return classes[self.logits(features).argmax(dim=-1)]


def fit_probe(
    features: Float[Tensor, "n d"],
    labels: Int[Tensor, " n"] | Bool[Tensor, " n"],
    *,
    test_fraction: float = 0.25,
    seed: int = 0,
    l2: float = 1e-2,
    max_iter: int = 200,
) -> ProbeResult:
    """Fit a logistic-regression probe on a seeded train split and score it on the held-out rest.

    Args:
        features: one row per example (e.g. a token's residual stream or neuron activations).
        labels: one integer (or boolean) label per row; any number of classes, at least two.
        test_fraction: share of rows held out for scoring, in (0, 1); both splits keep at least one row.
        seed: seeds the train/test permutation (fitting itself is deterministic).
        l2: L2 penalty on the weights (not the biases), ``l2 / 2 * ||W||^2`` added to the mean
            cross-entropy; the features are standardised, so one value suits any feature scale.
        max_iter: maximum L-BFGS iterations.

    Returns:
        A :class:`ProbeResult` with held-out accuracy, the majority baseline and the fitted weights.

    Raises:
        ValueError: on mismatched shapes, fewer than two distinct labels, too few rows, or
            settings out of range.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(400, 8, generator=g)
        >>> y = (x @ torch.randn(8, generator=g) > 0).long()
        >>> r = fit_probe(x, y, seed=0)
        >>> r.accuracy > 0.9, round(r.baseline, 2) < 0.7
        (True, True)
    """
    if features.ndim != 2:
        raise ValueError(f"features must have shape [n, d], got shape {tuple(features.shape)}")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"labels must have shape [n] matching features' {features.shape[0]} rows, got {tuple(labels.shape)}"
        )
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    if l2 < 0:
        raise ValueError(f"l2 must be non-negative, got {l2}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be a positive number of iterations, got {max_iter}")
    n = features.shape[0]
    if n < 4:
        raise ValueError(f"a probe needs at least 4 rows (train and held-out), got {n}")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")

    if features.device.type == "mps":  # MPS has no float64: fit on the CPU
        features = features.cpu()
    device = features.device
    labels = labels.to(device=device, dtype=torch.long)
    classes, y = torch.unique(labels, sorted=True, return_inverse=True)
    k = classes.numel()
    if k < 2:
        raise ValueError(f"labels take a single value ({int(classes[0])}); a probe needs at least two classes")

    n_test = min(max(1, round(n * test_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    test_idx, train_idx = perm[:n_test], perm[n_test:]

    with torch.inference_mode(False), torch.enable_grad():
        x = features.detach().to(torch.float64)
        x_train, x_test = x[train_idx], x[test_idx]
        y_train, y_test = y[train_idx].clone(), y[test_idx].clone()
        mean = x_train.mean(dim=0)
        std = x_train.std(dim=0, unbiased=False).clamp_min(1e-6) if x_train.shape[0] > 1 else torch.ones_like(mean)
        z_train = ((x_train - mean) / std).clone()
        z_test = (x_test - mean) / std

        weight = torch.zeros(k, x.shape[1], dtype=torch.float64, device=device, requires_grad=True)
        bias = torch.zeros(k, dtype=torch.float64, device=device, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            logits = z_train @ weight.T + bias
            loss = torch.nn.functional.cross_entropy(logits, y_train) + 0.5 * l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        weight, bias = weight.detach(), bias.detach()

    train_acc = float(((z_train @ weight.T + bias).argmax(-1) == y_train).double().mean())
    test_acc = float(((z_test @ weight.T + bias).argmax(-1) == y_test).double().mean())
    majority = torch.bincount(y_train, minlength=k).argmax()
    baseline = float((y_test == majority).double().mean())
    return ProbeResult(
        accuracy=test_acc,
        baseline=baseline,
        train_accuracy=train_acc,
        n_train=int(train_idx.numel()),
        n_test=int(n_test),
        classes=tuple(int(c) for c in classes.tolist()),
        weight=weight,
        bias=bias,
        mean=mean,
        std=std,
    )
