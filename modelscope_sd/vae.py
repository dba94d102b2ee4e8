"""A VAE other than the model's own, as A1111's VAE setting gives one: the fine-tuned SD1.5 VAEs
(``vae-ft-mse-840000-ema-pruned.safetensors``) that civitai models ask for, as a single file in the original
layout, a diffusers folder (an ``AutoencoderKL`` or a whole model's ``vae/``) or a ModelScope hub id."""

import json
import os
import tempfile
from typing import Union

import torch

from .constants import PICKLE_SUFFIXES
from .loading import check_safetensors, resolve_model_dir


def load_vae(vae, base, *, allow_pickle: bool = False, local_files_only: bool = False):
    """``vae`` (a path, a hub id or an ``AutoencoderKL``) on ``base``'s device and dtype. A single file takes its
    layer sizes and scaling factor from ``base``'s config, as A1111 puts such a file in place of the model's."""
    from diffusers import AutoencoderKL

    if isinstance(vae, AutoencoderKL):
        model = vae
    elif not isinstance(vae, (str, os.PathLike)):
        raise TypeError(f'vae must be a path, a hub id or a diffusers AutoencoderKL, got {type(vae).__name__}')
    elif os.path.isfile(vae):
        model = _single_file(os.fspath(vae), base, allow_pickle)
    else:
        folder = resolve_model_dir(os.fspath(vae), None, local_files_only, argument='vae')
        if os.path.isfile(os.path.join(folder, 'vae', 'config.json')):  # a whole diffusers model: its VAE
            model = AutoencoderKL.from_pretrained(folder, subfolder='vae')
        elif os.path.isfile(os.path.join(folder, 'config.json')):
            _check_is_a_vae(vae, os.path.join(folder, 'config.json'))
            model = AutoencoderKL.from_pretrained(folder)
        else:
            raise ValueError(f'vae={vae!r} is neither a VAE file nor a diffusers VAE folder (config.json and '
                             'weights, or a model folder with vae/).')
    _check_fits(vae, model, base)
    return torch.nn.Module.to(model, base.device, base.dtype)  # torch's to(): diffusers' warns on every cast


def _check_is_a_vae(vae, config_path: str) -> None:
    """A folder's config.json names its diffusers class: a model's unet/ or text_encoder/ is not a VAE."""
    with open(config_path, encoding='utf-8') as file:
        config = json.load(file)
    kind = config.get('_class_name') or ', '.join(config.get('architectures') or [])
    if kind and kind != 'AutoencoderKL':
        raise ValueError(f'vae={vae!r} holds a {kind} (its config.json), not an AutoencoderKL: pass the model folder '
                         '(its vae/ is used), its vae/ folder, or a VAE file.')


def _single_file(path: str, base, allow_pickle: bool):
    from diffusers import AutoencoderKL

    suffix = os.path.splitext(path)[1].lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ValueError(f'vae={path!r} is a pickle file, and loading pickle can run arbitrary code. Use its '
                             '.safetensors version, or pass allow_pickle=True if you trust this file.')
    elif suffix == '.safetensors':
        keys = check_safetensors(path)
        if not any(k.startswith(('encoder.', 'decoder.', 'first_stage_model.')) for k in keys):
            raise ValueError(f'vae={path!r} holds no VAE weights (encoder.*, decoder.*): it is not a VAE file.')
    else:
        raise ValueError(f'vae={path!r}: a VAE file must be .safetensors (or, with allow_pickle=True, one of '
                         f'{PICKLE_SUFFIXES}).')
    with tempfile.TemporaryDirectory() as config:  # the model's own VAE config: sizes and scaling factor
        base.save_config(config)
        return AutoencoderKL.from_single_file(path, config=config, local_files_only=True)


def _check_fits(source: Union[str, object], model, base) -> None:
    theirs, ours = model.config.latent_channels, base.config.latent_channels
    if theirs != ours:
        raise ValueError(f'vae={source!r} makes {theirs}-channel latents; this model\'s UNet takes {ours}: it is a '
                         'VAE of another model family.')
