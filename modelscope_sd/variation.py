"""A1111's variation seeds ("Variation seed", "Variation seed strength"; ``subseed`` and ``subseed_strength`` in
its API): an image's start noise is its seed's noise turned part of the way, along a great circle, towards the
noise of a second seed, so that small strengths give variations of one picture."""

from typing import List, Optional

import torch
from diffusers.utils.torch_utils import randn_tensor


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's ``slerp`` of one image's noise (C, H, W): ``val`` 0 gives ``low``, 1 gives ``high``; the angle is
    taken per column (norms over dim 1), as A1111 takes it."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:  # all but the same noise: A1111 blends linearly (with its weights as it has them)
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def start_latents(sd, height: Optional[int], width: Optional[int], generator, subseeds: List[int],
                  strength: float) -> torch.Tensor:
    """The start latents of a text-to-image call of diffusers pipeline ``sd`` with variation seeds: drawn from
    ``generator`` as its ``prepare_latents`` draws them (so the generator goes on as in a call without), each
    image's turned by ``strength`` towards the noise of its subseed (drawn on a CPU generator, as seeds are)."""
    size, factor = sd.unet.config.sample_size * sd.vae_scale_factor, sd.vae_scale_factor
    shape = (len(subseeds), sd.unet.config.in_channels, (height or size) // factor, (width or size) // factor)
    device, dtype = sd.device, sd.unet.dtype
    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    sub = randn_tensor(shape, generator=[torch.Generator('cpu').manual_seed(s) for s in subseeds], device=device,
                       dtype=dtype)
    mixed = [slerp(strength, a.float(), b.float()) for a, b in zip(noise, sub)]
    return torch.stack(mixed).to(dtype)
