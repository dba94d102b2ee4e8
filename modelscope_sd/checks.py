"""The checks of a pipeline call: every user-facing option checked once, before any work, with what was given,
what is allowed and the fix (diffusers' ``check_inputs``, for our options)."""

import difflib
import inspect
import logging
import math
import numbers
import os
from typing import Any, Dict, List

import numpy as np
import torch

from . import hires
from . import images as images_lib
from . import lora as lora_utils
from . import prompts as prompts_lib
from . import schedulers as schedulers_lib
from .embeddings import embedding_file
from .loading import hub_id_hint, is_hub_id
from .prompt_editing import split_and

logger = logging.getLogger(__name__)
_MAX_SEED = 2**63 - 1


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_call(pipeline, prompt, negative_prompt, num_inference_steps, guidance_scale, guidance_rescale, height,
               width, num_images_per_prompt, eta, seed, generator, latents, scheduler, clip_skip, emphasis, lora_scale,
               progress_bar, image, mask_image, strength, hr_scale, hr_upscaler, hr_second_pass_steps, hr_prompt,
               hr_negative_prompt, hr_scheduler, batch_size, callback_on_step_end, callback_on_step_end_tensor_inputs,
               subseed, subseed_strength) -> None:
    """Every option of a call to ``pipeline`` (a `StableDiffusionText2ImagePipeline`), checked before any work.
    ``pipeline=None`` checks all that needs no model: the command line does so before it loads one."""
    if prompt is None:
        raise ValueError("The prompt is missing: call pipe('a photo of a cat') or pipe({'text': '...'}).")
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(p, str) for p in prompt):
            raise TypeError(f'text must be a str or a non-empty list of str, got {prompt!r:.80}')
    elif not isinstance(prompt, str):
        raise TypeError(f'text must be a str or a list of str, got {type(prompt).__name__}')
    prompts = prompt if isinstance(prompt, list) else [prompt]
    for text in prompts:
        prompts_lib.check_syntax('text', text)
    for name, value in (('negative_prompt', negative_prompt), ('hr_prompt', hr_prompt),
                        ('hr_negative_prompt', hr_negative_prompt)):
        _check_prompt_option(name, value, len(prompts))
    check_numbers(height, width, num_inference_steps, num_images_per_prompt, batch_size, guidance_scale,
                  guidance_rescale, eta, seed)
    if guidance_rescale and image is not None:
        raise ValueError('guidance_rescale applies to text-to-image only: diffusers\' image-to-image and '
                         'inpainting pipelines do not take it. Leave it out (0) with image=...')
    if seed is not None and generator is not None:
        raise ValueError('Pass seed or generator, not both.')
    if generator is not None and not (isinstance(generator, torch.Generator) or (
            isinstance(generator, list) and all(isinstance(g, torch.Generator) for g in generator))):
        raise TypeError(f'generator must be a torch.Generator or a list of them, got {type(generator).__name__}')
    if latents is not None and not isinstance(latents, torch.Tensor):
        raise TypeError(f'latents must be a torch.Tensor, got {type(latents).__name__}')
    if latents is not None and latents.is_floating_point() and not bool(torch.isfinite(latents).all()):
        raise ValueError('latents hold NaN or inf, which give black images: pass finite start latents.')
    _check_variation(subseed, subseed_strength, latents, mask_image)
    if clip_skip is not None:
        check_int('clip_skip', clip_skip, minimum=0)
    if emphasis is not None:
        prompts_lib.emphasis_name(emphasis)
    if progress_bar is not None and not isinstance(progress_bar, bool):
        raise TypeError(f'progress_bar must be True or False, got {progress_bar!r}')
    for name, value in (('scheduler', scheduler), ('hr_scheduler', hr_scheduler)):
        if value is None:
            continue
        if pipeline is not None:
            pipeline._scheduler(value, name)  # built once per name from the model's config; refuses unknown names
        else:
            schedulers_lib.check_scheduler_name(value, argument=name)
    _check_image_inputs(image, mask_image, strength, latents, hr_scale)
    _check_hires(hr_scale, hr_upscaler, hr_second_pass_steps, hr_prompt, hr_negative_prompt, hr_scheduler, image,
                 guidance_rescale)
    _check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs, mask_image)
    if any(split_and(text) for text in prompts + ([hr_prompt] if isinstance(hr_prompt, str) else hr_prompt or [])):
        _check_and(guidance_scale)
    n_images = len(prompts) * num_images_per_prompt
    if isinstance(generator, list) and len(generator) != n_images:
        raise ValueError(f'generator is a list of {len(generator)} but this call makes {n_images} images '
                         f'(prompts × num_images_per_prompt): pass one generator per image, one generator, '
                         f'or seed=...')
    if pipeline is not None:
        _check_for_model(pipeline, num_inference_steps, eta, latents, scheduler, clip_skip, lora_scale, image,
                         mask_image, hr_scale, hr_second_pass_steps, hr_scheduler, height, width, n_images)


def _check_for_model(pipeline, num_inference_steps, eta, latents, scheduler, clip_skip, lora_scale, image,
                     mask_image, hr_scale, hr_second_pass_steps, hr_scheduler, height, width, n_images) -> None:
    """The checks that need the loaded model: its text encoder's depth, adapters, UNet and scheduler config."""
    if clip_skip is not None:
        layers = pipeline.sd.text_encoder.config.num_hidden_layers
        check_int('clip_skip', clip_skip, minimum=0, maximum=layers - 1)
    if lora_scale is not None:
        if pipeline.lora_fused and pipeline.denoiser is not None:
            raise ValueError('lora_scale cannot change per call with fast=True: the compiled path fuses the '
                             'adapters into the weights. Set the weight when building the pipeline '
                             '(lora_scale=...), or build it without fast=True to vary it per call.')
        if pipeline.lora_fused:
            raise ValueError('lora_scale cannot change per call: the adapters were fused (fuse_lora=True). '
                             'Build the pipeline with fuse_lora=False to vary the scale.')
        if not pipeline.adapters:
            raise ValueError('lora_scale was given but no LoRA is loaded: build the pipeline with lora_dir=...')
        lora_utils.check_scales(lora_scale, pipeline.adapters)
    if pipeline.sd.unet.config.in_channels == 9 and mask_image is None:
        raise ValueError('This is an inpainting model (9-channel UNet): pass image=... and mask_image=...')
    first = pipeline._scheduler(scheduler)
    own_second = pipeline._scheduler(hr_scheduler) if hr_scale is not None and hr_scheduler is not None else None
    _check_eta(eta, first, own_second)
    check_step_spacing(first, num_inference_steps, 'num_inference_steps')
    if hr_scale is not None:  # the hires fix's second pass: its own scheduler, or the first pass's
        check_step_spacing(first if own_second is None else own_second, hr_second_pass_steps or num_inference_steps,
                           'hr_second_pass_steps')
    if latents is not None:
        _check_latents(pipeline, latents, n_images, height, width, image)
    _warn_of_a_large_image(pipeline, image, height, width)


def _warn_of_a_large_image(pipeline, image, height, width) -> None:
    """An input image sets the call's size (diffusers' image-to-image keeps it), and a phone photo's 4032x3024 is 46
    times SD1.5's 512x512: minutes and GiBs where seconds were expected, and subjects repeated past twice the size
    the model was trained at. Said once per call, with a size of the model's area that keeps the aspect ratio."""
    if image is None or (height is not None and width is not None):
        return
    h, w = images_lib.target_size(image, height, width)
    native = images_lib.model_size(pipeline.sd)
    if h * w <= images_lib.LARGE_AREA * native * native:
        return
    scale = native / math.sqrt(h * w)
    logger.warning('image is %dx%d, so this call runs at %dx%d: %.0f times the %dx%d the model was trained at (slow, '
                   'much memory, and repeated subjects). Pass height and width to resize it, e.g. height=%d, '
                   'width=%d.', image.width, image.height, w, h, h * w / native ** 2, native, native,
                   max(8, round(h * scale / 8) * 8), max(8, round(w * scale / 8) * 8))


def check_numbers(height, width, num_inference_steps, num_images_per_prompt, batch_size, guidance_scale,
                  guidance_rescale, eta, seed) -> None:
    """A call's sizes, counts, scales and seed."""
    for name, value in (('height', height), ('width', width)):
        if value is None:
            continue
        if not _is_int(value):
            raise TypeError(f'{name} must be an int, got {value!r} ({type(value).__name__})')
        if value <= 0 or value % 8:
            raise ValueError(f'{name}={value} must be a positive multiple of 8 (e.g. 512, 576, 768).')
    check_int('num_inference_steps', num_inference_steps, minimum=1)
    check_int('num_images_per_prompt', num_images_per_prompt, minimum=1)
    if batch_size is not None:
        check_int('batch_size', batch_size, minimum=1)
    check_number('guidance_scale', guidance_scale, minimum=0.0)
    check_number('guidance_rescale', guidance_rescale, minimum=0.0)
    if guidance_rescale > 1:
        raise ValueError(f'guidance_rescale={guidance_rescale} must be between 0 (off) and 1; 0.7 is the usual '
                         'value.')
    check_number('eta', eta, minimum=0.0)
    if seed is not None:
        check_seed('seed', seed)


def check_seed(name: str, value) -> None:
    """A seed given (A1111's -1 has been drawn by now): the range torch's generator takes."""
    check_int(name, value)
    if not 0 <= value <= _MAX_SEED:
        raise ValueError(f'{name}={value} is out of range: it must be between 0 and {_MAX_SEED}, or -1 for a random '
                         'seed.')


def is_minus_one(value) -> bool:
    """A1111's seed of -1 (random): the int -1, not -1.0 or True."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value == -1


def _check_eta(eta, scheduler, hr_scheduler=None) -> None:
    """eta is DDIM's η: diffusers passes it only to a scheduler whose step takes it, and drops it silently for the
    others (all the rest of ours)."""
    used = [s for s in (scheduler, hr_scheduler) if s is not None]
    if eta and not any('eta' in inspect.signature(s.step).parameters for s in used):
        names = ' and '.join(repr(schedulers_lib.scheduler_name(s)) for s in used)
        raise ValueError(f"eta={eta} is DDIM's η: with the {names} scheduler{'s' if len(used) > 1 else ''} "
                         "diffusers drops it and it changes nothing. Pass scheduler='ddim' with it, or leave eta "
                         "out.")


def _check_prompt_option(name: str, value, n_prompts: int) -> None:
    """negative_prompt, hr_prompt, hr_negative_prompt: None, a str, or one str per prompt."""
    if value is None:
        return
    if isinstance(value, list):
        if len(value) != n_prompts or not all(isinstance(p, str) for p in value):
            raise ValueError(f'{name} as a list needs one str per prompt ({n_prompts}), got {value!r:.80}')
    elif not isinstance(value, str):
        raise TypeError(f'{name} must be a str or a list of str, got {type(value).__name__}')
    for text in value if isinstance(value, list) else [value]:
        prompts_lib.check_syntax(name, text)


def _check_image_inputs(image, mask_image, strength, latents, hr_scale) -> None:
    if mask_image is not None and image is None:
        raise ValueError('mask_image needs image: pass the picture to repaint as image=...')
    if strength is not None:
        if image is None and hr_scale is None:
            raise ValueError('strength applies to image-to-image and inpainting (pass image=... as well) and to '
                             'the hires fix\'s second pass (pass hr_scale=... as well).')
        check_number('strength', strength, minimum=0.0)
        if strength > 1:
            raise ValueError(f'strength={strength} must be between 0 and 1 (0 keeps the image, 1 repaints it).')
    if mask_image is not None and mask_image.size != image.size:
        raise ValueError(f'mask_image is {mask_image.width}x{mask_image.height} but image is '
                         f'{image.width}x{image.height}: they must be the same size.')
    if image is not None and mask_image is None and latents is not None:
        raise ValueError('latents cannot be given for image-to-image: the start latents come from image.')


def _check_hires(hr_scale, hr_upscaler, hr_second_pass_steps, hr_prompt, hr_negative_prompt, hr_scheduler, image,
                 guidance_rescale) -> None:
    if hr_scale is None:
        for name, value in (('hr_upscaler', hr_upscaler), ('hr_second_pass_steps', hr_second_pass_steps),
                            ('hr_prompt', hr_prompt), ('hr_negative_prompt', hr_negative_prompt),
                            ('hr_scheduler', hr_scheduler)):
            if value is not None:
                raise ValueError(f'{name} is an option of the hires fix, which hr_scale turns on: pass hr_scale '
                                 '(e.g. 2) too.')
        return
    check_number('hr_scale', hr_scale, minimum=1.0)
    if hr_scale > hires.MAX_SCALE:
        raise ValueError(f'hr_scale={hr_scale} must be between 1 and {hires.MAX_SCALE:g} (2 makes 1024 from 512).')
    if hires.normalize_upscaler(hr_upscaler) not in hires.UPSCALERS:
        raise ValueError(f'hr_upscaler={hr_upscaler!r} is not one of {hires.UPSCALERS}.')
    if hr_second_pass_steps is not None:
        check_int('hr_second_pass_steps', hr_second_pass_steps, minimum=1)
    if image is not None:
        raise ValueError('hr_scale is the hires fix of text-to-image. With image=..., pass the larger height and '
                         'width instead, as A1111\'s img2img does.')
    if guidance_rescale:
        raise ValueError('guidance_rescale cannot go with hr_scale: the second pass is diffusers\' '
                         'image-to-image, which does not take it.')


def _check_variation(subseed, subseed_strength, latents, mask_image) -> None:
    """A1111's variation seeds: they turn text-to-image's start latents, or the noise image-to-image adds."""
    if subseed is not None:
        check_seed('subseed', subseed)
    check_number('subseed_strength', subseed_strength, minimum=0.0)
    if subseed_strength > 1:
        raise ValueError(f'subseed_strength={subseed_strength} must be between 0 (off) and 1 (the subseed\'s noise).')
    if subseed_strength and latents is not None:
        raise ValueError('subseed_strength turns the start noise the seed draws; with latents=... there is none to '
                         'turn. Pass one of the two.')
    if subseed_strength and mask_image is not None:
        raise ValueError('subseed_strength applies to text-to-image, image-to-image and the hires fix, not to '
                         'inpainting. Leave it out (0) with mask_image=...')


def _check_callback(callback, tensor_inputs, mask_image) -> None:
    if callback is None:
        if tensor_inputs is not None:
            raise ValueError('callback_on_step_end_tensor_inputs names what callback_on_step_end receives: pass '
                             'callback_on_step_end too.')
        return
    if not callable(callback):
        raise TypeError('callback_on_step_end must be callable as diffusers calls it, f(pipe, step, timestep, '
                        f'callback_kwargs) -> dict, got {type(callback).__name__}')
    if tensor_inputs is not None:
        from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
        allowed = (StableDiffusionPipeline if mask_image is None else StableDiffusionInpaintPipeline
                   )._callback_tensor_inputs
        if isinstance(tensor_inputs, str) or not all(name in allowed for name in tensor_inputs):
            raise ValueError(f'callback_on_step_end_tensor_inputs={tensor_inputs!r}: a list of names from '
                             f'{allowed}.')


def _check_and(guidance_scale) -> None:
    """A1111's AND (composable prompts) sums guidance per subprompt."""
    if guidance_scale <= 1:
        raise ValueError(f"text: A1111's AND (composable prompts) cannot go with guidance_scale={guidance_scale}: it "
                         'sums guidance, which needs > 1. Write one prompt, or raise guidance_scale.')


def _check_latents(pipeline, latents, n_images: int, height, width, image) -> None:
    """Start latents of this call's shape; without height/width their size sets the image size. diffusers
    would fail deep in the UNet, or silently make another size than the one asked for."""
    factor, channels = pipeline.sd.vae_scale_factor, pipeline.sd.vae.config.latent_channels
    given = tuple(latents.shape)
    layout = f'(images, {channels} channels, height/{factor}, width/{factor})'
    if len(given) != 4:
        raise ValueError(f'latents must be 4-D {layout}, got shape {given}.')
    if image is not None:  # inpainting: the output size comes from the image
        height, width = images_lib.target_size(image, height, width)
    expected = (n_images, channels, given[2] if height is None else height // factor,
                given[3] if width is None else width // factor)
    if given != expected:
        raise ValueError(f'latents has shape {given} but this call needs {expected} {layout}: one per image '
                         f'(prompts × num_images_per_prompt = {n_images}), at height={height}, width={width}.')


def check_step_spacing(scheduler, steps: int, name: str) -> None:
    """diffusers' 'leading' timestep spacing (PNDM, DDIM and DDPM under SD's scheduler config) takes every
    ``num_train_timesteps // steps``-th timestep from 0, plus the offset: past half the training timesteps that is
    every one, so 501 steps start at timestep 501 instead of near 999 (a noisy picture, silently), 1000 steps at
    timestep 1000 (past the model's last: an IndexError), and PNDM's 1001 at timestep 1."""
    total = scheduler.config.num_train_timesteps
    if scheduler.config.get('timestep_spacing') == 'leading' and steps > total // 2:
        first = (steps - 1) * (total // steps) + scheduler.config.get('steps_offset', 0)  # diffusers' formula
        raise ValueError(
            f"{name}={steps}: {type(scheduler).__name__} spaces its steps 'leading' (its timestep_spacing), which "
            f'for more than {total // 2} steps does not start denoising near timestep {total - 1} but at timestep '
            f'{first}, so the picture would stay noisy (or the call fail). Use at most {total // 2} steps with it, or '
            "a scheduler whose steps span the whole schedule at any count, such as scheduler='euler' or "
            "'dpm++_2m'.")


def check_runs_a_step(pipe, num_inference_steps: int, strength: float, name: str) -> None:
    """Image-to-image runs the last int(strength × steps) timesteps (PNDM one more): none at all would fail deep
    inside diffusers."""
    if int(num_inference_steps * strength) >= 1 or prompts_lib.model_calls(pipe, num_inference_steps, strength):
        return
    fix = f'{name} to {math.ceil(1 / strength)} or more, or ' if strength else ''
    least = math.ceil(100 / num_inference_steps) / 100
    raise ValueError(f'strength={strength} with {name}={num_inference_steps} runs no denoising step (diffusers runs '
                     f'int(strength × steps) of them): raise {fix}strength to {least} or more.')


def check_sources(lora_dir, textual_inversion, vae) -> None:
    """The adapter, embedding and VAE paths a pipeline is built with: a missing one fails before the minutes of
    loading the model, not after (their loaders read and check them again; hub ids are left to them)."""
    loras = lora_dir if isinstance(lora_dir, (list, tuple)) else [lora_dir]
    for name, path in [('lora_dir', path) for path in loras] + [('vae', vae)]:
        if isinstance(path, (str, os.PathLike)) and not (os.path.exists(path) or is_hub_id(os.fspath(path))):
            raise FileNotFoundError(f'{name}={os.fspath(path)!r}: no such file or folder, and not a hub id '
                                    f'(owner/name){hub_id_hint(os.fspath(path))}.')
    embeddings = (textual_inversion.values() if isinstance(textual_inversion, dict) else textual_inversion
                  if isinstance(textual_inversion, (list, tuple)) else [textual_inversion])
    for path in embeddings:
        if isinstance(path, (str, os.PathLike)):
            embedding_file(os.fspath(path))


def check_switches(**switches) -> None:
    """On/off arguments are True or False: a string such as 'no' would otherwise switch them on."""
    for name, value in switches.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f'{name} must be True or False, got {value!r} ({type(value).__name__}).')


def check_int(name, value, minimum=None, maximum=None):
    if not _is_int(value):
        raise TypeError(f'{name} must be an int, got {value!r} ({type(value).__name__})')
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        allowed = f'>= {minimum}' if maximum is None else f'between {minimum} and {maximum}'
        raise ValueError(f'{name}={value} is out of range: it must be {allowed}.')


def check_number(name, value, minimum):
    if not _is_number(value):
        raise TypeError(f'{name} must be a number, got {value!r} ({type(value).__name__})')
    if not math.isfinite(value):
        raise ValueError(f'{name}={value} must be a finite number.')
    if value < minimum:
        raise ValueError(f'{name}={value} must be >= {minimum}.')


_OUTPUT = ("output['output_imgs'] always holds OpenCV BGR uint8 arrays, as ModelScope's pipelines return them; "
           'leave it out (a PIL image: Image.fromarray(img[..., ::-1]); diffusers\' own outputs: pipe.sd(...))')
_OLD_CALLBACK = ("it is diffusers' old step callback, deprecated there; pass callback_on_step_end=lambda pipe, step, "
                 "timestep, kw: my_callback(step, timestep, kw['latents']) or {} (called every step)")
_EMBEDS = ('this pipeline encodes the text itself (long prompts, (word:1.2), BREAK, AND, [from:to:when]); pass '
           'the text, or call pipe.sd(prompt_embeds=..., negative_prompt_embeds=...) with embeddings made elsewhere')
_SCHEDULE = ('custom timestep or sigma lists are not offered; pass num_inference_steps and a scheduler (Karras '
             'sigmas: the *_karras ones), or call pipe.sd(...) with them')
_IP_ADAPTER = 'IP-Adapter is not offered here; load it with pipe.sd.load_ip_adapter(...) and call pipe.sd(...)'
# call arguments of diffusers' StableDiffusionPipeline (and of ModelScope's own SD pipeline) that this one does not
# take, with what to do instead
NOT_TAKEN = {
    'output_type': _OUTPUT, 'return_dict': _OUTPUT, 'callback': _OLD_CALLBACK, 'callback_steps': _OLD_CALLBACK,
    'prompt_embeds': _EMBEDS, 'negative_prompt_embeds': _EMBEDS,
    'cross_attention_kwargs': 'adapter weights are lora_scale=..., or <lora:name:weight> in the prompt',
    'timesteps': _SCHEDULE, 'sigmas': _SCHEDULE,
    'ip_adapter_image': _IP_ADAPTER, 'ip_adapter_image_embeds': _IP_ADAPTER,
}


def unknown_message(kind: str, unknown: Dict[str, Any], allowed: List[str]) -> str:
    known = [key for key in unknown if key in NOT_TAKEN]
    if known:
        return f"{known[0]!r} is not one of this pipeline's {kind}s: {NOT_TAKEN[known[0]]}."
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), allowed, n=1)
        parts.append(f"{key!r}" + (f" (did you mean '{close[0]}'?)" if close else ''))
    return f"Unknown {kind}{'s' if len(parts) > 1 else ''} {', '.join(parts)}. Allowed: {', '.join(allowed)}."
