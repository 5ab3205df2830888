"""L-BFGS for many independent problems at once: one problem per column of a parameter matrix.

One-vs-rest probes are K separate logistic regressions over the same features. Solving them
as one joint problem lets one matrix product serve all K, but a joint L-BFGS mixes their
curvature and line searches and needs about three times the iterations of each problem alone.
Here every column keeps its own L-BFGS memory, step size (Armijo backtracking) and
convergence test, while the objective is still evaluated for all columns with one product:
the iteration count of the slowest column, at the price per iteration of a single problem.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class ColumnObjective(Protocol):
    """K independent objectives of the columns of (weight [D, K], bias [K])."""

    def columns(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Per-column values [K] and whatever `gradient` can reuse (e.g. the logits)."""
        ...

    def gradient(
        self, weight: torch.Tensor, bias: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients [D, K] and [K] at the point `columns` was evaluated at."""
        ...


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=0)


def columnwise_lbfgs(
    objective: ColumnObjective,
    weight: torch.Tensor,
    bias: torch.Tensor,
    max_iter: int = 300,
    tol: float = 1e-5,
    history: int = 10,
    armijo: float = 1e-4,
    max_backtracks: int = 10,
    noise: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Minimise every column's objective; returns (weight, bias, iterations of the slowest column).

    A column stops when its largest gradient entry is at most `tol` (or its line search can
    no longer decrease it); the loop ends when every column has stopped or after `max_iter`.
    The sufficient-decrease test allows `noise` (relative; default a few float eps) of
    rounding in the values: near the optimum a float32 sum over many samples cannot resolve
    the decrease a good step makes, and rejecting it would stall on backtracking.
    """
    if noise is None:
        noise = 16 * torch.finfo(weight.dtype).eps
    d = weight.shape[0]
    params = torch.cat([weight, bias[None]], dim=0)  # [D + 1, K]: the bias is the last row
    values, cache = objective.columns(params[:d], params[d])
    grad_w, grad_b = objective.gradient(params[:d], params[d], cache)
    grad = torch.cat([grad_w, grad_b[None]], dim=0)
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (s, y, 1 / s.y) per column
    stalled = torch.zeros(params.shape[1], dtype=torch.bool, device=params.device)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        active = (grad.abs().amax(dim=0) > tol) & ~stalled
        if not active.any():
            iterations -= 1
            break
        # two-loop recursion, every column with its own memory
        q = grad.clone()
        alphas = []
        for s, y, rho in reversed(pairs):
            alpha = rho * _dot(s, q)
            q -= alpha * y
            alphas.append(alpha)
        if pairs:
            s, y, rho = pairs[-1]
            sy, yy = _dot(s, y), _dot(y, y)
            q *= torch.where(rho > 0, sy / yy.clamp_min(1e-30), torch.ones_like(sy))
        else:  # first step: as torch's L-BFGS, at most a unit step of the normalised gradient
            q *= (1.0 / grad.abs().sum(dim=0).clamp_min(1e-30)).clamp(max=1.0)
        for (s, y, rho), alpha in zip(pairs, reversed(alphas), strict=True):
            q += s * (alpha - rho * _dot(y, q))
        direction = torch.where(active, -q, torch.zeros_like(q))
        slope = _dot(grad, direction)
        uphill = active & (slope >= 0)  # lost curvature information: fall back to steepest descent
        if uphill.any():
            direction[:, uphill] = -grad[:, uphill]
            slope = _dot(grad, direction)
        # Armijo backtracking, each column its own step
        step = active.to(params.dtype)
        for _ in range(max_backtracks):
            trial = params + step * direction
            trial_values, trial_cache = objective.columns(trial[:d], trial[d])
            allowance = noise * values.abs().clamp_min(1.0)
            accepted = (trial_values <= values + armijo * step * slope + allowance) | ~active
            if accepted.all():
                break
            step = torch.where(accepted, step, step * 0.5)
        else:
            stalled |= ~accepted  # no decrease found: that column is at its numerical optimum
            step = torch.where(accepted, step, torch.zeros_like(step))
            trial = params + step * direction
            trial_values, trial_cache = objective.columns(trial[:d], trial[d])
        grad_w, grad_b = objective.gradient(trial[:d], trial[d], trial_cache)
        new_grad = torch.cat([grad_w, grad_b[None]], dim=0)
        s, y = trial - params, new_grad - grad
        sy = _dot(s, y)
        rho = torch.where(sy > 1e-10, 1.0 / sy.clamp_min(1e-10), torch.zeros_like(sy))
        pairs.append((s, y, rho))
        if len(pairs) > history:
            pairs.pop(0)
        params, values, grad = trial, trial_values, new_grad
    return params[:d].contiguous(), params[d].contiguous(), iterations
