"""A rectified flow whose exact velocity and ODE solution are known in closed form.

Data ``x0 ~ N(mean, std^2 I)`` (per coordinate), noise ``eps ~ N(0, I)``, ``x_sigma = (1 - sigma) x0 + sigma eps``.
Writing ``a = 1 - sigma``, ``x_sigma`` is Gaussian with mean ``a mean`` and variance ``V = a^2 std^2 + sigma^2``;
its covariances with ``x0`` and ``eps`` are ``a std^2`` and ``sigma``. Gaussian conditioning then gives

    E[x0  | x_sigma = x] = mean + a std^2 (x - a mean) / V
    E[eps | x_sigma = x] = sigma (x - a mean) / V
    v(x, sigma) = E[eps - x0 | x] = (sigma - a std^2) (x - a mean) / V - mean.

The probability-flow ODE ``dx/dsigma = v`` is solved exactly by ``x(sigma) = a mean + sqrt(V) z``: it starts at
``z`` (sigma = 1) and ends at ``mean + std z`` (sigma = 0). That makes solver error measurable without a model.
"""

from __future__ import annotations

import torch

__all__ = ["GaussianFlow"]


class GaussianFlow:
    """Exact marginal velocity of rectified flow on Gaussian data, for testing solvers and smoke-running trainers.

    ``mean`` and ``std`` are floats or tensors broadcastable against the samples; ``std`` must be positive.
    """

    def __init__(self, mean: float | torch.Tensor, std: float | torch.Tensor):
        std = torch.as_tensor(std, dtype=torch.float64)
        if not bool((std > 0).all()):
            raise ValueError(f"std must be positive, got {std}")
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.std = std

    def _params_like(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean.to(dtype=x.dtype, device=x.device), self.std.to(dtype=x.dtype, device=x.device)

    def _variance(self, sigma: float, std: torch.Tensor) -> torch.Tensor:
        alpha = 1.0 - sigma
        return alpha * alpha * std * std + sigma * sigma

    def velocity(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """``E[eps - x0 | x_sigma = x]``, in the dtype of ``x``."""
        sigma = float(sigma)
        mean, std = self._params_like(x)
        alpha = 1.0 - sigma
        return (sigma - alpha * std * std) * (x - alpha * mean) / self._variance(sigma, std) - mean

    def x0_posterior_mean(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """``E[x0 | x_sigma = x]``, which equals ``x - sigma * velocity(x, sigma)``."""
        sigma = float(sigma)
        mean, std = self._params_like(x)
        alpha = 1.0 - sigma
        return mean + alpha * std * std * (x - alpha * mean) / self._variance(sigma, std)

    def exact_state(self, z: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """Where the exact ODE started at ``z`` (sigma = 1) is at ``sigma``."""
        sigma = float(sigma)
        mean, std = self._params_like(z)
        return (1.0 - sigma) * mean + torch.sqrt(self._variance(sigma, std)) * z

    def exact_endpoint(self, z: torch.Tensor) -> torch.Tensor:
        """Where the exact ODE started at ``z`` ends (sigma = 0): ``mean + std * z``."""
        mean, std = self._params_like(z)
        return mean + std * z

    def sample_data(
        self, shape: tuple[int, ...], *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Draw clean samples ``x0``; stands in for rollouts when no real model is present."""
        z = torch.randn(shape, generator=generator, dtype=dtype)
        return self.exact_endpoint(z)

    def __repr__(self) -> str:
        def show(t: torch.Tensor) -> str:
            return f"{t.item():g}" if t.numel() == 1 else f"tensor{tuple(t.shape)}"

        return f"GaussianFlow(mean={show(self.mean)}, std={show(self.std)})"
