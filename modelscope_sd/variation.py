"""A1111's variation seeds ("Variation seed", "Variation seed strength"; ``subseed`` and ``subseed_strength`` in
its API): an image's start noise is its seed's noise turned part of the way, along a great circle, towards the
noise of a second seed, so that small strengths give variations of one picture."""

from contextlib import contextmanager
from typing import List, Optional

import torch
from diffusers.utils.torch_utils import randn_tensor

from .images import model_size


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


def turned(noise: torch.Tensor, subseeds: List[int], strength: float) -> torch.Tensor:
    """Each image's ``noise`` (N, C, H, W) turned by ``strength`` towards the noise of its subseed, drawn at the
    same size on a CPU generator, as seeds are."""
    sub = randn_tensor(noise.shape, generator=[torch.Generator('cpu').manual_seed(s) for s in subseeds],
                       device=noise.device, dtype=noise.dtype)
    return torch.stack([slerp(strength, a.float(), b.float()) for a, b in zip(noise, sub)]).to(noise.dtype)


def start_latents(sd, height: Optional[int], width: Optional[int], generator, subseeds: List[int],
                  strength: float) -> torch.Tensor:
    """The start latents of a text-to-image call of diffusers pipeline ``sd`` with variation seeds: drawn from
    ``generator`` as its ``prepare_latents`` draws them (so the generator goes on as in a call without), each
    image's turned by ``strength`` towards the noise of its subseed."""
    size, factor = model_size(sd), sd.vae_scale_factor
    shape = (len(subseeds), sd.unet.config.in_channels, (height or size) // factor, (width or size) // factor)
    return turned(randn_tensor(shape, generator=generator, device=sd.device, dtype=sd.unet.dtype), subseeds, strength)


@contextmanager
def turning_added_noise(scheduler, subseeds: List[int], strength: float):
    """While open, the noise ``scheduler.add_noise`` puts on image latents is turned towards the subseeds' noise.
    diffusers' image-to-image starts there (the image's latents noised to the first timestep it runs), so this is
    A1111's variation for image-to-image and for the hires fix's second pass, whose noise A1111 turns too."""
    add_noise = scheduler.add_noise

    def add_turned_noise(original_samples, noise, timesteps):
        return add_noise(original_samples, turned(noise, subseeds, strength), timesteps)

    scheduler.add_noise = add_turned_noise
    try:
        yield
    finally:
        del scheduler.add_noise
