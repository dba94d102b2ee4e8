"""Reproducible PNGs: the generation settings in a ``parameters`` text chunk, in A1111's format, so that
A1111/ComfyUI show them and ``read_png`` turns them back into the call that re-creates the image."""

import itertools
import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from .hires import A1111_NAMES as A1111_UPSCALERS, DEFAULT_STRENGTH, MAX_SCALE, normalize_upscaler, target_size
from .images import model_size
from .prompts import emphasis_name
from .schedulers import SCHEDULE_TYPES, check_scheduler_name, named_schedulers, scheduler_name

PARAMETERS_KEY = 'parameters'
# our scheduler names ↔ A1111's sampler names
A1111_SAMPLERS = {
    'pndm': 'PLMS', 'ddim': 'DDIM', 'ddpm': 'DDPM', 'euler': 'Euler', 'euler_ancestral': 'Euler a', 'heun': 'Heun',
    'lms': 'LMS', 'lms_karras': 'LMS Karras', 'dpm++_2m': 'DPM++ 2M', 'dpm++_2m_karras': 'DPM++ 2M Karras',
    'dpm++_2m_sde': 'DPM++ 2M SDE', 'dpm++_2m_sde_karras': 'DPM++ 2M SDE Karras',
    'dpm++_2m_sde_heun': 'DPM++ 2M SDE Heun', 'unipc': 'UniPC',
    'dpm2': 'DPM2', 'dpm2_karras': 'DPM2 Karras', 'dpm2_ancestral': 'DPM2 a', 'dpm2_ancestral_karras': 'DPM2 a Karras',
    'dpm++_sde': 'DPM++ SDE', 'dpm++_sde_karras': 'DPM++ SDE Karras',
}
_FROM_A1111 = {v.lower(): k for k, v in A1111_SAMPLERS.items()}
# keys read back into the call, and A1111's keys that only describe files (hashes, its version)
_APPLIED = {'Steps', 'Sampler', 'Schedule type', 'CFG scale', 'Seed', 'Size', 'Model', 'Rescale CFG', 'Clip skip',
            'Denoising strength', 'Lora', 'Textual inversion', 'Emphasis', 'VAE', 'Variation seed',
            'Variation seed strength'}
# read back when the hires fix is ('Hires upscale', or a 'Hires resize' that is a scale)
_HIRES = {'Hires upscale', 'Hires resize', 'Hires steps', 'Hires upscaler', 'Hires prompt', 'Hires negative prompt',
          'Hires sampler', 'Hires schedule type'}
_INFORMATIONAL = {'Model hash', 'VAE hash', 'Lora hashes', 'TI hashes', 'Hashes', 'Version'}
# A1111's own pattern for "Key: value, Key: "quoted, value""
_PARAM = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ',:"\n') else value


def format_parameters(prompt: str, negative_prompt: Optional[str], steps: int, scheduler: str,
                      guidance_scale: float, seed: Optional[int], width: int, height: int, model: str,
                      loras: Sequence[Tuple[str, float]] = (), clip_skip: Optional[int] = None,
                      strength: Optional[float] = None, embeddings: Sequence[str] = (),
                      guidance_rescale: float = 0.0, hires: Optional[Dict[str, Any]] = None,
                      emphasis: Optional[str] = None, vae: Optional[str] = None,
                      variation: Optional[Tuple[int, float]] = None) -> str:
    """A1111's ``parameters`` text. With ``hires`` (hr_scale, hr_upscaler, hr_second_pass_steps, and this image's
    hr_prompt and hr_negative_prompt), ``width`` and ``height`` are the first pass's size and ``strength`` the second
    pass's, as A1111 writes them; the hires prompts only where they differ from the first pass's, as A1111 does.
    ``variation``: (subseed, subseed_strength)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f'Negative prompt: {negative_prompt}')
    sampler, schedule = _a1111_sampler(scheduler)
    fields = [('Steps', steps), ('Sampler', sampler), ('Schedule type', schedule), ('CFG scale', guidance_scale),
              ('Seed', seed), ('Size', f'{width}x{height}'), ('Model', model)]
    if variation is not None:
        fields += [('Variation seed', variation[0]), ('Variation seed strength', variation[1])]
    if guidance_rescale:
        fields.append(('Rescale CFG', guidance_rescale))  # Forge's key
    if clip_skip is not None:
        fields.append(('Clip skip', clip_skip + 1))  # A1111 counts the last layer as 1
    if strength is not None:
        fields.append(('Denoising strength', strength))
    if emphasis is not None and emphasis_name(emphasis) != 'Original':  # A1111 writes it when not its default
        fields.append(('Emphasis', emphasis_name(emphasis)))
    if hires:
        fields += [('Hires upscale', hires['hr_scale']), ('Hires steps', hires.get('hr_second_pass_steps')),
                   ('Hires upscaler', A1111_UPSCALERS[normalize_upscaler(hires.get('hr_upscaler'))])]
        for key, text, first in (('Hires prompt', hires.get('hr_prompt'), prompt),
                                 ('Hires negative prompt', hires.get('hr_negative_prompt'), negative_prompt or '')):
            if text is not None and text != first:
                fields.append((key, text))
        if hires.get('hr_scheduler') is not None and hires['hr_scheduler'] != scheduler:
            hires_sampler, hires_schedule = _a1111_sampler(hires['hr_scheduler'])
            fields += [('Hires sampler', hires_sampler), ('Hires schedule type', hires_schedule)]
    if vae is not None:  # A1111 writes the file's name; the path or hub id given here loads again
        fields.append(('VAE', vae))
    if loras:
        fields.append(('Lora', '; '.join(f'{path}={scale}' for path, scale in loras)))
    if embeddings:  # our key: A1111's "TI hashes" name files by hash, which cannot be loaded back
        fields.append(('Textual inversion', '; '.join(embeddings)))
    lines.append(', '.join(f'{key}: {_quote(str(value))}' for key, value in fields if value is not None))
    return '\n'.join(lines)


def _a1111_sampler(scheduler: str) -> Tuple[str, Optional[str]]:
    """A1111's sampler name for ours, and its schedule type where the name alone does not say it (A1111 1.9+
    writes e.g. 'Sampler: DPM++ 2M SDE, Schedule type: Exponential')."""
    if scheduler in A1111_SAMPLERS:
        return A1111_SAMPLERS[scheduler], None
    base, _, schedule = scheduler.rpartition('_')
    if schedule in SCHEDULE_TYPES and base in A1111_SAMPLERS:
        return A1111_SAMPLERS[base], schedule.capitalize()
    return scheduler, None


def _sampler(sampler: str, schedule: Optional[str]) -> str:
    """Our scheduler name for A1111's sampler and schedule type (A1111 1.9+ writes Karras, Exponential, Beta apart
    from the sampler; 'Uniform' is the sampler's plain sigmas). Another schedule type keeps the sampler's name."""
    ours = _FROM_A1111.get(sampler.lower(), sampler)
    schedule = (schedule or '').lower()
    if schedule in SCHEDULE_TYPES and not ours.endswith(f'_{schedule}'):
        if f'{ours}_{schedule}' in named_schedulers():
            return f'{ours}_{schedule}'
    return ours


def parse_parameters(text: str) -> Dict[str, Any]:
    """A1111 ``parameters`` text → {'call': options for the pipeline call, 'model': ..., 'vae': ... (or None),
    'lora_dir': [...], 'lora_scale': [...], 'textual_inversion': [...], 'not_applied': settings the call leaves
    out}."""
    lines = text.strip('\n').split('\n')
    params = {k.strip(): (json.loads(v) if v.startswith('"') else v.strip()) for k, v in _PARAM.findall(lines[-1])}
    if 'Steps' not in params:
        raise ValueError('No generation parameters found: the last line should read "Steps: …, Sampler: …".')
    body = lines[:-1]
    negative_at = next((i for i, line in enumerate(body) if line.startswith('Negative prompt:')), len(body))
    negative = '\n'.join(body[negative_at:])[len('Negative prompt:'):].strip() if negative_at < len(body) else None
    width, height = (int(v) for v in params['Size'].split('x'))
    call = {'text': '\n'.join(body[:negative_at]), 'num_inference_steps': int(params['Steps']),
            'guidance_scale': float(params['CFG scale']), 'width': width, 'height': height,
            'scheduler': _sampler(params['Sampler'], params.get('Schedule type'))}
    if negative:
        call['negative_prompt'] = negative
    if params.get('Seed') not in (None, 'None'):
        call['seed'] = int(params['Seed'])
    if 'Variation seed strength' in params and float(params['Variation seed strength']):
        call['subseed_strength'] = float(params['Variation seed strength'])
        if params.get('Variation seed') not in (None, 'None'):
            call['subseed'] = int(params['Variation seed'])
    if 'Rescale CFG' in params:
        call['guidance_rescale'] = float(params['Rescale CFG'])
    if 'Clip skip' in params:
        call['clip_skip'] = int(params['Clip skip']) - 1
    hr_scale = _hires_scale(params, width, height)
    applied = _APPLIED | _INFORMATIONAL | (_HIRES if hr_scale is not None else set())
    not_applied = [key if key != 'Hires resize' else f'Hires resize {params[key]} (not the first pass\'s size scaled: '
                   'A1111 crops to it)' for key in params if key not in applied]
    if 'Emphasis' in params:
        try:
            call['emphasis'] = emphasis_name(params['Emphasis'])
        except ValueError:  # a mode this pipeline does not know
            not_applied.append(f'Emphasis {params["Emphasis"]}')
    if 'Denoising strength' in params and 'Hires resize' in params and hr_scale is None:
        not_applied.append('Denoising strength')  # of a hires pass to a size of its own, which hr_scale cannot say
    elif 'Denoising strength' in params:  # image-to-image's, or the hires fix's second pass's
        call['strength'] = float(params['Denoising strength'])
    if hr_scale is not None:
        call['hr_scale'] = hr_scale
        if int(params.get('Hires steps', 0)):
            call['hr_second_pass_steps'] = int(params['Hires steps'])
        upscaler = params.get('Hires upscaler', 'Latent')
        # A1111's "None" resizes the decoded image with Lanczos; its model upscalers (ESRGAN, ...) run as Lanczos
        call['hr_upscaler'] = upscaler.lower() if upscaler.lower() in A1111_UPSCALERS else 'lanczos'
        if upscaler.lower() not in (*A1111_UPSCALERS, 'none'):
            not_applied.append(f'Hires upscaler {upscaler} (ran as {A1111_UPSCALERS[call["hr_upscaler"]]})')
        for key, option in (('Hires prompt', 'hr_prompt'), ('Hires negative prompt', 'hr_negative_prompt')):
            if key in params:
                call[option] = params[key]
        hires_sampler = params.get('Hires sampler', 'Use same sampler')
        if hires_sampler != 'Use same sampler' or 'Hires schedule type' in params:  # A1111 writes those that differ
            sampler = params['Sampler'] if hires_sampler == 'Use same sampler' else hires_sampler
            hires_schedule = params.get('Hires schedule type', params.get('Schedule type'))
            call['hr_scheduler'] = _sampler(sampler, hires_schedule)
            not_applied += _schedule_not_applied('Hires schedule type', hires_schedule, call['hr_scheduler'])
    not_applied += _schedule_not_applied('Schedule type', params.get('Schedule type'), call['scheduler'])
    for option, key, instead in (('scheduler', 'Sampler', "the model's own"),
                                 ('hr_scheduler', 'Hires sampler', "the first pass's")):
        if option in call and not _offered(call[option]):  # A1111's DPM++ 3M SDE, DPM fast, Restart, LCM, ...
            not_applied.append(f'{key} {params.get(key, params["Sampler"])} (not offered here: {instead} runs '
                               f'unless --{option} names one)')
            del call[option]
    loras = [item.rsplit('=', 1) for item in params['Lora'].split('; ')] if params.get('Lora') else []
    embeddings = params['Textual inversion'].split('; ') if params.get('Textual inversion') else []
    return {'call': call, 'model': params.get('Model'), 'vae': params.get('VAE'), 'lora_dir': [p for p, _ in loras],
            'lora_scale': [float(s) for _, s in loras], 'textual_inversion': embeddings, 'not_applied': not_applied}


def _hires_scale(params: Dict[str, str], width: int, height: int) -> Optional[float]:
    """The hires fix's scale: A1111's 'Hires upscale', or its 'Hires resize' to a size (0: that side follows the
    other) where that is the first pass's size scaled, as hr_scale can say it; None where neither is, or where the
    resize changes the aspect ratio (A1111 then crops, which hr_scale cannot say)."""
    if 'Hires upscale' in params:
        return float(params['Hires upscale'])
    if 'Hires resize' not in params:
        return None
    try:
        to_x, to_y = (int(v) for v in params['Hires resize'].split('x'))
    except ValueError:
        return None
    if not to_x:  # A1111's sizes for a side left 0, in whole pixels
        to_x = to_y * width // height
    if not to_y:
        to_y = to_x * height // width
    wanted = (to_y // 8 * 8, to_x // 8 * 8)
    for scale in (to_x / width, to_x / width * (1 + 1e-9)):  # the second: a quotient rounded down past a pixel
        if target_size(height, width, scale) == wanted:
            return scale if 1 <= scale <= MAX_SCALE else None
    return None


def _offered(name: str) -> bool:
    try:
        check_scheduler_name(name)
    except ValueError:
        return False
    return True


def _schedule_not_applied(key: str, schedule: Optional[str], scheduler: str) -> List[str]:
    """A1111's schedule type where our scheduler name does not carry it (SGM Uniform, ...): named as not applied."""
    schedule = schedule or 'Automatic'
    if schedule.lower() in ('automatic', 'uniform') or scheduler.endswith(f'_{schedule.lower()}'):
        return []
    return [f'{key} {schedule}']


def save_png(path: str, image_bgr: np.ndarray, parameters: str) -> str:
    """Write the PNG at ``path``, or at ``stem-1.png``, ``stem-2.png``, … when a file is there already (a second
    run with the same seed and another prompt must not replace the first image). Returns the path written."""
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    image = Image.fromarray(np.ascontiguousarray(image_bgr[..., ::-1]))
    stem, suffix = os.path.splitext(path)
    for n in itertools.count():
        candidate = path if n == 0 else f'{stem}-{n}{suffix}'
        try:
            f = open(candidate, 'xb')  # exclusive create: never replaces a file, even one made meanwhile
        except FileExistsError:
            continue
        try:
            with f:
                image.save(f, format='PNG', pnginfo=info)
        except BaseException:  # a full disk or a Ctrl-C mid-write: no half image under a real name
            os.remove(candidate)
            raise
        return candidate


def read_png(path: str) -> Dict[str, Any]:
    """The settings an image carries: a PNG's ``parameters`` text chunk (ours and A1111's), or the EXIF
    UserComment in which A1111 writes the same text into JPEG and WEBP files."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--from_png {path!r}: no such file.')
    try:
        with Image.open(path) as image:
            chunks = getattr(image, 'text', {})  # a PNG's text chunks
            text = chunks.get(PARAMETERS_KEY) or _exif_comment(image)
            comfyui = bool(_COMFYUI_KEYS & set(chunks))
    except UnidentifiedImageError:
        raise ValueError(f'{path} is not an image: the settings come from a PNG written by modelscope-sd generate, '
                         'or an A1111 PNG, JPEG or WEBP.') from None
    if not text and comfyui:
        raise ValueError(f'{path} is a ComfyUI image: its settings are a node graph, which is not read here. Pass '
                         'the prompt, seed, steps, CFG and sampler of its KSampler node as flags.')
    if not text:
        raise ValueError(f'{path} carries no generation parameters (no "{PARAMETERS_KEY}" text chunk in a PNG, no '
                         'EXIF UserComment in a JPEG or WEBP, as A1111 writes them).')
    return parse_parameters(text)


_COMFYUI_KEYS = {'prompt', 'workflow'}  # the text chunks of ComfyUI's SaveImage: its graph, as JSON
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286


def _exif_comment(image: Image.Image) -> Optional[str]:
    """EXIF's UserComment: an 8-byte character code, then the text. A1111 (through piexif) writes 'UNICODE' and
    UTF-16 big-endian; some tools write little-endian under the same code, told apart here by where the zero bytes
    of the text's ASCII fall."""
    raw = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if not isinstance(raw, bytes):
        return raw or None
    code, payload = raw[:8], raw[8:]
    if code == b'UNICODE\0':
        big_endian = payload[0::2].count(0) >= payload[1::2].count(0)
        text = payload.decode('utf_16_be' if big_endian else 'utf_16_le', errors='replace')
    else:  # ASCII, or the code left undefined: A1111 reads those as UTF-8
        text = payload.decode('utf8', errors='replace')
    return text.rstrip('\0') or None


def describe_outputs(pipe, options: Dict[str, Any], output: Dict[str, Any], model: str,
                     loras: List[Tuple[str, float]], embeddings: Sequence[str] = (),
                     vae: Optional[str] = None) -> List[str]:
    """One ``parameters`` text per image of a call, each with that image's own seed."""
    texts = []
    scheduler = scheduler_name(options.get('scheduler') or pipe.base_scheduler)
    prompts = options['text'] if isinstance(options['text'], list) else [options['text']]
    negative = options.get('negative_prompt')
    negatives = negative if isinstance(negative, list) else [negative] * len(prompts)
    per_prompt = options.get('num_images_per_prompt', 1)
    hires = {k: options.get(k) for k in ('hr_scale', 'hr_upscaler', 'hr_second_pass_steps')}
    if options.get('hr_scheduler') is not None:
        hires['hr_scheduler'] = scheduler_name(options['hr_scheduler'])
    hires_texts = {k: options.get(k) for k in ('hr_prompt', 'hr_negative_prompt')}
    strength, first_pass = options.get('strength'), None
    if hires['hr_scale'] is not None:  # A1111 writes the first pass's size and the second pass's strength
        strength = DEFAULT_STRENGTH if strength is None else strength
        size = model_size(pipe.sd)
        first_pass = (options.get('height') or size, options.get('width') or size)
    subseeds, strength_of_variation = output.get('subseeds'), options.get('subseed_strength')
    for i, image in enumerate(output['output_imgs']):
        seeds = output.get('seeds')
        height, width = first_pass or image.shape[:2]
        texts.append(format_parameters(
            prompts[i // per_prompt], negatives[i // per_prompt], options.get('num_inference_steps', 50),
            scheduler, options.get('guidance_scale', 7.5), seeds[i] if seeds else None, width, height, model, loras,
            options.get('clip_skip'), strength, embeddings, options.get('guidance_rescale', 0.0),
            None if hires['hr_scale'] is None else {**hires, **{
                k: v[i // per_prompt] if isinstance(v, list) else v for k, v in hires_texts.items()}},
            options.get('emphasis'), vae,
            (subseeds[i], strength_of_variation) if subseeds else None))
    return texts
