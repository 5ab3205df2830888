"""Ridge regression on frozen features (age from the pooled embedding), in closed form in torch.

The objective is scikit-learn's `Ridge(alpha)` with an intercept, on features standardised
by the training samples' mean and standard deviation: ||y - Xw - b||^2 + alpha ||w||^2.
One eigendecomposition of the standardised Gram matrix serves every alpha of a grid, so
choosing alpha costs one [D, D] decomposition however many values are tried.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_ALPHA_GRID = (1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3, 1e4, 1e5)


@dataclass
class RidgeRegression:
    """A fitted ridge: standardisation, then x @ weight + bias."""

    weight: torch.Tensor  # [D]
    bias: float
    mean: torch.Tensor  # [D]
    scale: torch.Tensor  # [D]
    alpha: float

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.device, torch.float64)
        return ((x - self.mean) / self.scale) @ self.weight + self.bias


def ridge_path(
    x: torch.Tensor,
    y: np.ndarray | torch.Tensor,
    alphas: Sequence[float],
    standardize: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[RidgeRegression]:
    """The ridge fit for each alpha on (x [N, D], y [N]), in float64.

    `standardize` gives the (mean, scale) of the features (default: mean and unbiased standard
    deviation of x, 1 where a dimension is constant, as the logistic probe standardises).
    """
    if any(a <= 0 for a in alphas):
        raise ValueError(f"ridge alphas must be > 0, got {list(alphas)}")
    x = x.to(torch.float64)
    if standardize is None:
        mean, scale = x.mean(dim=0), x.std(dim=0)  # NaN for one sample: replaced by 1 below
        scale = torch.where(scale > 1e-6, scale, torch.ones_like(scale))
    else:
        mean, scale = (t.to(x.device, torch.float64) for t in standardize)
    y = torch.as_tensor(y, dtype=torch.float64, device=x.device)
    xs = (x - mean) / scale
    centre = xs.mean(dim=0)  # zero when standardised on x itself; not when (mean, scale) are given
    y_mean = y.mean()
    xc = xs - centre
    eigenvalues, eigenvectors = torch.linalg.eigh(xc.T @ xc)
    projected = eigenvectors.T @ (xc.T @ (y - y_mean))
    fits = []
    for alpha in alphas:
        weight = eigenvectors @ (projected / (eigenvalues.clamp(min=0) + alpha))
        bias = float(y_mean - centre @ weight)
        fits.append(RidgeRegression(weight, bias, mean, scale, float(alpha)))
    return fits


def fit_ridge(
    x: torch.Tensor,
    y: np.ndarray | torch.Tensor,
    alpha: float,
    standardize: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> RidgeRegression:
    return ridge_path(x, y, [alpha], standardize)[0]


def select_ridge(
    x_fit: torch.Tensor,
    y_fit: np.ndarray,
    x_check: torch.Tensor,
    y_check: np.ndarray,
    grid: Sequence[float] = DEFAULT_ALPHA_GRID,
) -> tuple[RidgeRegression, dict[float, float]]:
    """The fit whose mean absolute error on (x_check, y_check) is lowest (ties: the larger
    alpha), and the error of every alpha."""
    fits = ridge_path(x_fit, y_fit, sorted(grid, reverse=True))
    target = torch.as_tensor(y_check, dtype=torch.float64)
    errors = {fit.alpha: float((fit.predict(x_check).cpu() - target).abs().mean()) for fit in fits}
    best = min(fits, key=lambda fit: (errors[fit.alpha], -fit.alpha))
    return best, errors
