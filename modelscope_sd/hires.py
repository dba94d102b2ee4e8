"""A1111's hires fix: text-to-image at the model's size, upscaled, then image-to-image at the larger size, so
SD1.5 (trained at 512) makes 1024-pixel images without repeated subjects. The options keep A1111's API names:
``hr_scale``, ``hr_upscaler`` and ``hr_second_pass_steps``; ``strength`` is the second pass's denoising strength.
"""

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image

UPSCALERS = ('latent', 'lanczos')  # A1111's "Latent" (bilinear, in latent space) and "Lanczos" (in pixels)
DEFAULT_STRENGTH = 0.7  # A1111's default denoising strength for the second pass
MAX_SCALE = 4.0  # A1111's limit


def target_size(height: int, width: int, scale: float) -> Tuple[int, int]:
    """The second pass's size: the first pass's times ``scale``, down to a multiple of 8."""
    return int(height * scale) // 8 * 8, int(width * scale) // 8 * 8


def upscale(pipe, latents: torch.Tensor, size: Tuple[int, int],
            upscaler: str) -> Union[torch.Tensor, List[Image.Image]]:
    """The first pass's latents at ``size`` (pixels): latents for 'latent', images for 'lanczos' (decoded,
    resized, and encoded again by the second pass)."""
    height, width = size
    if upscaler == 'latent':
        factor = pipe.vae_scale_factor
        return F.interpolate(latents, size=(height // factor, width // factor), mode='bilinear', align_corners=False)
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    images = pipe.image_processor.postprocess(decoded, output_type='pil')
    return [image.resize((width, height), Image.LANCZOS) for image in images]


def normalize_upscaler(name: Optional[str]) -> str:
    """Ours or A1111's spelling ('Latent', 'Lanczos'); None is 'latent', A1111's default."""
    return 'latent' if name is None else str(name).strip().lower()
