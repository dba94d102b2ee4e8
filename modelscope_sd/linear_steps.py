"""A scheduler as a table of numbers, so that a whole denoising step can run as one captured CUDA graph.

Every scheduler the pipeline offers updates the latents linearly: the latents entering step i are a fixed
combination of the start latents x0, the earlier (guided) model outputs eps_0..eps_{i-1}, and, for the
stochastic ones (Euler a, DDPM, DPM++ 2M SDE, DDIM with eta > 0), the noise drawn so far; DPM++ SDE's noise is
its Brownian tree's, over sigma intervals the table records. The coefficients depend only on the timesteps, so
they are found once per (scheduler, steps, eta) by running the scheduler itself on unit vectors, and then
checked against a run on random data. A scheduler that fails the check (thresholding, clipping, its own random
numbers) gets no plan and keeps diffusers' loop.
"""

import copy
import inspect
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple
from unittest import mock

import torch

# Probes run in float64; schedulers upcast to float32 inside a step, hence the tolerance.
_RTOL = 1e-4


@dataclass
class LinearPlan:
    """``coefs[i]`` · [x0, eps_0..eps_{n-1}, noise_0..noise_{m-1}] = the latents entering step i (row n: the
    final latents); ``scales[i]`` is the scheduler's ``scale_model_input`` factor at step i."""
    timesteps: torch.Tensor  # [n]
    scales: torch.Tensor  # [n]
    coefs: torch.Tensor  # [n + 1, 1 + n + m]
    noise_dtypes: List[Optional[torch.dtype]]  # per noise draw: None = the model's dtype
    # DPM++ SDE: the (sigma, sigma_next) of each draw, asked of the scheduler's Brownian tree, not of randn
    brownian: Optional[List[Tuple[float, float]]] = None

    @property
    def num_model_calls(self) -> int:
        return len(self.timesteps)


def _set_timesteps(scheduler, num_inference_steps: int, begin_index: int):
    """A copy of ``scheduler`` with its timesteps set as diffusers' loop sets them, and the timesteps it runs
    from ``begin_index`` on (image-to-image starts part-way)."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(num_inference_steps, device='cpu')
    if begin_index and hasattr(sched, 'set_begin_index'):  # PNDM has none: it counts its own steps
        sched.set_begin_index(begin_index)
    return sched, sched.timesteps[begin_index:]


def _run_scheduler(scheduler, num_inference_steps: int, eta: float, begin_index: int, x0: torch.Tensor,
                   model_output: Callable[[int], torch.Tensor], noise: Callable[[int], torch.Tensor]):
    """Run a copy of ``scheduler`` the way diffusers' denoising loop does, from ``begin_index`` on, with given
    model outputs and with its ``randn_tensor`` draws answered by ``noise``. Returns the timesteps, the latents
    entering each step, the ``scale_model_input`` result and factor of each step, the final latents, the dtype
    asked for by each draw and, for a Brownian-tree scheduler, the sigma interval of each draw."""
    sched, timesteps = _set_timesteps(scheduler, num_inference_steps, begin_index)
    step_kwargs = {'eta': eta} if 'eta' in inspect.signature(sched.step).parameters else {}
    draws: List[Optional[torch.dtype]] = []
    intervals: List[Tuple[float, float]] = []

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        draws.append(dtype)
        return noise(len(draws) - 1).to(dtype or torch.float32)

    def brownian(sigma, sigma_next):
        intervals.append((float(sigma), float(sigma_next)))
        return randn_tensor(None)

    if hasattr(sched, 'noise_sampler'):  # DPM++ SDE builds its tree at the first step unless one is set
        sched.noise_sampler = brownian

    module = sys.modules[type(sched).__module__]
    patch = mock.patch.object(module, 'randn_tensor', randn_tensor) if hasattr(module, 'randn_tensor') else nullcontext()
    ones = torch.ones((1, 1, 1, 1), dtype=x0.dtype)
    inputs, scaled, factors = [], [], []
    x = x0
    with patch:
        for i, t in enumerate(timesteps):
            inputs.append(x)
            factors.append(float(sched.scale_model_input(ones, t).flatten()[0]))
            scaled.append(sched.scale_model_input(x, t))
            x = sched.step(model_output(i), t, x, **step_kwargs, return_dict=False)[0]
    return timesteps, inputs, (scaled, factors), x, (draws, intervals)


def _close(expected: torch.Tensor, got: torch.Tensor) -> bool:
    return bool(torch.isfinite(got).all()) and float((expected - got).abs().max()) <= _RTOL * max(
        1.0, float(expected.abs().max()))


def plan_scheduler(scheduler, num_inference_steps: int, eta: float = 0.0,
                   begin_index: int = 0) -> Optional[LinearPlan]:
    """The coefficient table of ``scheduler`` at ``num_inference_steps`` from timestep ``begin_index`` on, or
    None when it is not linear (or has no steps left)."""
    if getattr(scheduler.config, 'thresholding', False) or getattr(scheduler.config, 'clip_sample', False):
        return None  # both clamp the predicted image: not linear
    gen = torch.Generator().manual_seed(0)
    shape = (2, 1, 2, 2)
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64) * scheduler.init_noise_sigma * 3
    n = len(_set_timesteps(scheduler, num_inference_steps, begin_index)[1])
    if n == 0:
        return None
    eps = torch.randn((n,) + shape, generator=gen, dtype=torch.float64) * 3
    noises: List[torch.Tensor] = []

    def random_noise(j):
        noises.append(torch.randn(shape, generator=gen, dtype=torch.float64))
        return noises[j]

    _, inputs, (scaled, _), final, (draws, intervals) = _run_scheduler(
        scheduler, num_inference_steps, eta, begin_index, x0, eps.__getitem__, random_noise)
    # the same run on unit vectors: basis 0 is x0, 1..n the model outputs, n+1.. the noise draws
    size = 1 + n + len(draws)
    basis = torch.eye(size, dtype=torch.float64).view(size, size, 1, 1, 1)
    zero = torch.zeros_like(basis[0])
    timesteps, b_inputs, (_, factors), b_final, (b_draws, _) = _run_scheduler(
        scheduler, num_inference_steps, eta, begin_index, basis[0], lambda i: basis[1 + i],
        lambda j: basis[1 + n + j] if j < len(draws) else zero)
    if len(b_draws) != len(draws):
        return None
    coefs = torch.stack([x.reshape(size) for x in b_inputs + [b_final]]).to(torch.float64)
    scales = torch.tensor(factors, dtype=torch.float64)
    # check: the table must re-create the random run, step by step
    data = torch.cat([x0[None], eps, torch.stack(noises)]) if noises else torch.cat([x0[None], eps])
    rebuilt = torch.tensordot(coefs, data, dims=1)
    expected = torch.stack([x.to(torch.float64) for x in inputs + [final]])
    if not _close(expected, rebuilt):
        return None
    if not all(_close(s.to(torch.float64), scales[i] * inputs[i].to(torch.float64)) for i, s in enumerate(scaled)):
        return None
    dtypes = [None if d in (None, torch.float64) else d for d in draws]
    return LinearPlan(timesteps=timesteps.to(torch.float32), scales=scales, coefs=coefs, noise_dtypes=dtypes,
                      brownian=intervals or None)

