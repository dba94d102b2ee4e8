"""Image inputs (file paths or URLs, OpenCV BGR arrays, PIL images) for image-to-image and inpainting, and the
conversions every image in this package goes through."""

import io
import os
from typing import Tuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


LARGE_AREA = 4  # times the model's area past which a size is named as too large (SD1.5: past 1024x1024)


def model_size(sd) -> int:
    """The side, in pixels, that diffusers pipeline ``sd`` makes by default and its model was trained at: the UNet's
    sample size times the VAE's factor (512 for SD1.5)."""
    return sd.unet.config.sample_size * sd.vae_scale_factor


def to_rgb(image: Image.Image) -> Image.Image:
    """Grey, 16-bit, palette and alpha images → 8-bit RGB (alpha composited on white)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray((array / scale * 255).round().clip(0, 255).astype(np.uint8), 'L')
    if image.mode == 'P':
        image = image.convert('RGBA')
    if image.mode in ('RGBA', 'LA'):
        background = Image.new('RGBA', image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert('RGBA'))
    return image.convert('RGB')


def _open(value, name: str) -> Image.Image:
    if isinstance(value, str) and value.lower().startswith(('http://', 'https://')):
        return _read(_download(value, name), value, name)
    if isinstance(value, (str, os.PathLike)):
        if not os.path.isfile(value):
            raise FileNotFoundError(f'{name}={os.fspath(value)!r}: no such file.')
        with open(value, 'rb') as f:
            return _read(f.read(), os.fspath(value), name)
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim not in (2, 3) or (value.ndim == 3 and value.shape[2] not in (3, 4)):
            raise ValueError(f'{name} as an array must be uint8 H×W (grey) or H×W×3/4 in OpenCV BGR(A) order, '
                             f'got {value.dtype} {value.shape}.')
        if value.ndim == 2:
            return Image.fromarray(value, 'L')
        rgb = value[..., [2, 1, 0] + ([3] if value.shape[2] == 4 else [])]
        return Image.fromarray(np.ascontiguousarray(rgb), 'RGBA' if value.shape[2] == 4 else 'RGB')
    raise TypeError(f'{name} must be a file path or URL, a BGR numpy array or a PIL image, got {type(value).__name__}')


def _download(url: str, name: str, timeout: float = 30.0) -> bytes:
    """An image URL, as ModelScope's image pipelines take them."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError) as err:
        raise FileNotFoundError(f'{name}={url!r} could not be downloaded ({err}).') from err


def _read(data: bytes, where: str, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.copy()
    except UnidentifiedImageError as err:
        raise ValueError(f'{name}={where!r} is not an image (PNG, JPEG, WebP, ...) that PIL can read.') from err
    except OSError as err:  # a truncated one
        raise ValueError(f'{name}={where!r} is not a readable image ({err}).') from err


def load_image(value, name: str = 'image') -> Image.Image:
    return to_rgb(_open(value, name))


def load_mask(value, name: str = 'mask_image') -> Image.Image:
    """White (255) marks what to repaint; colour masks are read as grey."""
    mask = _open(value, name)
    return ImageOps.exif_transpose(mask).convert('L')


def target_size(image: Image.Image, height, width) -> Tuple[int, int]:
    """(height, width) given, or the image's own size rounded down to multiples of 8."""
    h = height if height is not None else image.height // 8 * 8
    w = width if width is not None else image.width // 8 * 8
    if h < 8 or w < 8:
        raise ValueError(f'image is {image.width}x{image.height}: it needs to be at least 8x8 pixels.')
    return h, w


def overlay(generated: torch.Tensor, original: Image.Image, mask: Image.Image) -> torch.Tensor:
    """Keep the original outside the mask: the VAE round trip would otherwise shift unmasked pixels. ``generated``
    is N×3×H×W in [0, 1]; the blend is fp32, on its device."""
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0).to(generated.device)
    kept = torch.from_numpy(np.asarray(original, dtype=np.float32) / 255.0).to(generated.device).permute(2, 0, 1)
    return generated.float() * m + kept * (1.0 - m)
