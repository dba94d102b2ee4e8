"""A1111's hires fix: text-to-image at the model's size, upscaled, then image-to-image at the larger size, so
SD1.5 (trained at 512) makes 1024-pixel images without repeated subjects. The options keep A1111's API names:
``hr_scale``, ``hr_upscaler`` and ``hr_second_pass_steps``; ``strength`` is the second pass's denoising strength.
"""

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image

# A1111's latent upscalers: torch's interpolation of the latents (mode, antialias), as A1111's table has them
LATENT_MODES = {'Latent': ('bilinear', False), 'Latent (antialiased)': ('bilinear', True),
                'Latent (bicubic)': ('bicubic', False), 'Latent (bicubic antialiased)': ('bicubic', True),
                'Latent (nearest)': ('nearest', False), 'Latent (nearest-exact)': ('nearest-exact', False)}
# and its plain pixel resizes of the decoded image (its model upscalers, ESRGAN and others, are not offered)
PIXEL_MODES = {'Lanczos': Image.LANCZOS, 'Nearest': Image.NEAREST}
A1111_NAMES = {name.lower(): name for name in (*LATENT_MODES, *PIXEL_MODES)}  # ours (lower case) → A1111's
UPSCALERS = tuple(A1111_NAMES)
DEFAULT_STRENGTH = 0.7  # A1111's default denoising strength for the second pass
MAX_SCALE = 4.0  # A1111's limit


def target_size(height: int, width: int, scale: float) -> Tuple[int, int]:
    """The second pass's size: the first pass's times ``scale``, down to a multiple of 8."""
    return int(height * scale) // 8 * 8, int(width * scale) // 8 * 8


def upscale(pipe, latents: torch.Tensor, size: Tuple[int, int],
            upscaler: str) -> Union[torch.Tensor, List[Image.Image]]:
    """The first pass's latents at ``size`` (pixels): latents for the latent upscalers, images for the pixel ones
    (decoded, resized, and encoded again by the second pass)."""
    height, width = size
    name = A1111_NAMES[upscaler]
    if name in LATENT_MODES:
        mode, antialias = LATENT_MODES[name]
        factor = pipe.vae_scale_factor
        return F.interpolate(latents, size=(height // factor, width // factor), mode=mode, antialias=antialias,
                             **({'align_corners': False} if mode in ('bilinear', 'bicubic') else {}))
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    images = pipe.image_processor.postprocess(decoded, output_type='pil')
    return [image.resize((width, height), PIXEL_MODES[name]) for image in images]


def normalize_upscaler(name: Optional[str]) -> str:
    """Ours or A1111's spelling ('Latent (nearest-exact)', 'Lanczos'); None is 'latent', A1111's default."""
    return 'latent' if name is None else str(name).strip().lower()
