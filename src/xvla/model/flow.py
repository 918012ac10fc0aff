"""Flow objectives and samplers.

`x0_renoise` (the released checkpoints): x_t = t*noise + (1-t)*action (t=1 is pure noise), the network predicts the
clean action, and the sampler re-noises the current estimate with one fixed noise draw at t = 1, (N-1)/N, ..., 1/N.

`velocity` (an option for models trained from scratch): x_t = (1-t)*noise + t*action, the network predicts the
velocity action - noise (MSE), and the sampler integrates it with Euler steps from t=0 to t=1.

Samplers take `denoise(x_t [B,T,A], t [B]) -> [B,T,A]` and contain no host syncs (no `.item()`, no branches on
tensor values), so the loop can be compiled or captured.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]

T_MAX = 1.0 - 1e-5  # stratified t wraps below 1


def stratified_t(u: Tensor, batch_size: int) -> Tensor:
    """One u ~ U[0,1) [1] -> t_b = (u + b/B) mod (1 - 1e-5), [B]."""
    offsets = torch.arange(batch_size, device=u.device, dtype=u.dtype) / batch_size
    return (u + offsets) % T_MAX


def interpolate(action: Tensor, noise: Tensor, t: Tensor, objective: str) -> Tensor:
    """The noisy action x_t [B, T, A] for t [B]."""
    tt = t.view(-1, 1, 1).to(action.dtype)
    if objective == "velocity":
        return (1 - tt) * noise + tt * action
    return tt * noise + (1 - tt) * action


def renoise_sample(denoise: Denoiser, noise: Tensor, steps: int) -> Tensor:
    """Re-noising x0 sampler as released: a_hat=0; for i=N..1: a_hat = net(i/N * noise + (1-i/N) * a_hat, i/N)."""
    b = noise.shape[0]
    a_hat = torch.zeros_like(noise)
    for i in range(steps, 0, -1):
        t = torch.full((b,), i / steps, device=noise.device, dtype=noise.dtype)
        a_hat = denoise(t.view(-1, 1, 1) * noise + (1 - t.view(-1, 1, 1)) * a_hat, t)
    return a_hat


def euler_sample(denoise: Denoiser, noise: Tensor, steps: int) -> Tensor:
    """Euler integration of the velocity field from t=0 (noise) to t=1 (action)."""
    b = noise.shape[0]
    x = noise
    dt = 1.0 / steps
    for i in range(steps):
        t = torch.full((b,), i * dt, device=noise.device, dtype=noise.dtype)
        x = x + dt * denoise(x, t)
    return x
