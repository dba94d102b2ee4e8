"""Validation images: what to render (``--validation_prompt``, and kohya's ``--sample_prompts`` file with its
per-prompt options), rendering it with the model being trained, and showing it to the trackers."""

import dataclasses
import json
import os
from typing import List, Optional

import numpy as np
import torch

from modelscope_sd import prompts

STEPS = 25  # validation images' default denoising steps
# kohya's sample-prompt options (a .txt line's ' --x VALUE', a .json/.toml entry's key) → SamplePrompt fields
LINE_OPTIONS = {'n': 'negative_prompt', 'w': 'width', 'h': 'height', 'd': 'seed', 'l': 'guidance_scale',
                's': 'num_inference_steps', 'ss': 'scheduler'}
FILE_KEYS = {'prompt': 'prompt', 'negative_prompt': 'negative_prompt', 'width': 'width', 'height': 'height',
             'seed': 'seed', 'scale': 'guidance_scale', 'sample_steps': 'num_inference_steps',
             'sample_sampler': 'scheduler'}


@dataclasses.dataclass(frozen=True)
class SamplePrompt:
    """One validation render: ``num_images`` images of image i at seed + i, as the pipeline makes them;
    unset fields take the run's (seed, scheduler) or the model's (size) defaults."""
    prompt: str
    negative_prompt: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    seed: Optional[int] = None
    guidance_scale: float = 7.5
    num_inference_steps: int = STEPS
    scheduler: Optional[str] = None
    num_images: int = 1
    name: str = 'validation'  # file-name stem and tracker tag


def load_sample_prompts(path: str) -> List[SamplePrompt]:
    """kohya's sample-prompt file: .txt, one prompt a line with options ('a dog --n blurry --w 512 --h 768
    --d 42 --l 7 --s 28 --ss euler_a', '#' comments), or .json (a list of lines or of dicts) or .toml
    ([prompt] defaults, [[prompt.subset]] entries) with kohya's keys. Every value is checked here, so a bad
    line fails before the model loads."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'sample_prompts={path!r}: no such file.')
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding='utf-8') as f:
        if ext == '.txt':
            entries = [(n, line.strip()) for n, line in enumerate(f, 1)
                       if line.strip() and not line.lstrip().startswith('#')]
        elif ext == '.json':
            entries = list(enumerate(_json_list(path, f), 1))
        elif ext == '.toml':
            entries = list(enumerate(_toml_entries(path, f), 1))
        else:
            raise ValueError(f'sample_prompts={path!r}: a .txt (one prompt a line), .json or .toml file, as kohya '
                             'reads them.')
    if not entries:
        raise ValueError(f'sample_prompts={path!r} holds no prompt.')
    where = 'line' if ext == '.txt' else 'entry'
    return [_sample(path, f'{where} {n}', entry, index) for index, (n, entry) in enumerate(entries)]


def _json_list(path, f) -> list:
    try:
        data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f'sample_prompts={path!r} is not valid JSON: {err}') from None
    if not isinstance(data, list):
        raise ValueError(f'sample_prompts={path!r}: a JSON list of prompts (strings, or objects with a "prompt").')
    return data


def _toml_entries(path, f) -> list:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise ValueError(f'sample_prompts={path!r}: .toml needs Python 3.11 (tomllib); use a .txt or .json '
                         'file.') from None
    try:
        data = tomllib.loads(f.read())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f'sample_prompts={path!r} is not valid TOML: {err}') from None
    table = data.get('prompt')
    if not isinstance(table, dict) or not isinstance(table.get('subset'), list):
        raise ValueError(f'sample_prompts={path!r}: kohya\'s TOML layout is a [prompt] table of defaults and '
                         '[[prompt.subset]] entries, each with a prompt.')
    defaults = {k: v for k, v in table.items() if k != 'subset'}
    return [{**defaults, **subset} for subset in table['subset']]


def _sample(path: str, where: str, entry, index: int) -> SamplePrompt:
    """A .txt line or a .json/.toml entry → SamplePrompt, each value checked and named with its place."""
    place = f'sample_prompts={path!r} {where}'
    if isinstance(entry, str):
        text, *options = (' ' + entry).split(' --')  # a line that starts with an option has no prompt
        values = {'prompt': text.strip()}
        for option in options:
            key, _, value = option.strip().partition(' ')
            if key.lower() not in LINE_OPTIONS:
                raise ValueError(f"{place}: --{key} is not an option here; kohya's options are "
                                 f"{', '.join('--' + k for k in LINE_OPTIONS)} (a prompt's own ' --' needs no "
                                 'space before it).')
            values[LINE_OPTIONS[key.lower()]] = value.strip()
    elif isinstance(entry, dict):
        unknown = sorted(set(entry) - set(FILE_KEYS) - {'enum'})
        if unknown:
            raise ValueError(f"{place}: {unknown} not known; kohya's keys are {', '.join(FILE_KEYS)}.")
        values = {FILE_KEYS[k]: v for k, v in entry.items() if k in FILE_KEYS}
    else:
        raise ValueError(f'{place}: a prompt string or an object with a "prompt", not {type(entry).__name__}.')
    if not isinstance(values.get('prompt'), str) or not values['prompt'].strip():
        raise ValueError(f'{place} has no prompt.')
    for name in ('prompt', 'negative_prompt'):
        if values.get(name) is not None:
            prompts.check_syntax(f'{place} {name}', str(values[name]))
    return SamplePrompt(**_typed(place, values), name=f'sample{index:02d}')


def _typed(place: str, values: dict) -> dict:
    kinds = {'width': int, 'height': int, 'seed': int, 'num_inference_steps': int, 'guidance_scale': float}
    typed = dict(values)
    for name, kind in kinds.items():
        if name not in values:
            continue
        try:
            typed[name] = kind(values[name])
        except (TypeError, ValueError):
            raise ValueError(f'{place}: {name}={values[name]!r} is not a{"n integer" if kind is int else " number"}.'
                             ) from None
    for name in ('width', 'height'):
        if name in typed and (typed[name] <= 0 or typed[name] % 8):
            raise ValueError(f'{place}: {name}={typed[name]} must be a positive multiple of 8 (e.g. 512).')
    if typed.get('num_inference_steps', 1) < 1:
        raise ValueError(f'{place}: num_inference_steps={typed["num_inference_steps"]} must be >= 1.')
    if typed.get('seed', 0) < 0:
        raise ValueError(f'{place}: seed={typed["seed"]} must be >= 0.')
    if not np.isfinite(typed.get('guidance_scale', 0.0)) or typed.get('guidance_scale', 0.0) < 0:
        raise ValueError(f'{place}: guidance_scale={typed["guidance_scale"]} must be a number >= 0 (7.5 is usual).')
    if typed.get('scheduler') is not None:
        check_scheduler_name(str(typed['scheduler']), f'{place}: ')
        typed['scheduler'] = str(typed['scheduler'])
    return typed


def check_scheduler_name(name: str, place: str) -> None:
    """Refuse a sampler name the pipeline does not take, before the model loads."""
    from diffusers import PNDMScheduler

    from modelscope_sd.schedulers import make_scheduler
    try:
        make_scheduler(name, PNDMScheduler().config)
    except ValueError as err:
        raise ValueError(f'{place}{err}') from None


def validation_samples(config) -> List[SamplePrompt]:
    """What each validation renders: ``--validation_prompt`` (``--num_validation_images`` images), then each
    ``--sample_prompts`` entry (one image), all at the run's seed and ``--validation_scheduler`` unless the entry
    sets its own."""
    samples = []
    if config.validation_prompt:
        samples.append(SamplePrompt(config.validation_prompt, num_images=config.num_validation_images))
    if config.sample_prompts:
        samples += load_sample_prompts(config.sample_prompts)
    return [dataclasses.replace(s, seed=config.seed if s.seed is None else s.seed,
                                scheduler=s.scheduler or config.validation_scheduler) for s in samples]


def render(pipe, sample: SamplePrompt, clip_skip: Optional[int]) -> list:
    """PIL images of ``sample`` from the diffusers ``pipe`` over the model being trained: the prompt as our
    pipeline reads it (weights, long prompts, edits, ``AND``), image i from a CPU generator at seed + i, as the
    pipeline's image i of a call with that seed. ``clip_skip``: the pipeline's count."""
    from modelscope_sd.schedulers import DPMSolverSDEScheduler, image_seeds, make_scheduler
    base = pipe.scheduler
    try:
        pipe.scheduler = make_scheduler(sample.scheduler or base, base.config)
        generators = [torch.Generator('cpu').manual_seed(sample.seed + i) for i in range(sample.num_images)]
        if isinstance(pipe.scheduler, DPMSolverSDEScheduler):  # its Brownian noise comes from each image's seed
            pipe.scheduler.image_seeds = image_seeds(generators, sample.num_images)
        text, context = prompts.call_arguments(pipe, sample.prompt, sample.num_inference_steps, sample.num_images,
                                               clip_skip, sample.negative_prompt)
        with context:
            return pipe(**text, num_images_per_prompt=sample.num_images, num_inference_steps=sample.num_inference_steps,
                        guidance_scale=sample.guidance_scale, width=sample.width, height=sample.height,
                        generator=generators).images
    finally:
        pipe.scheduler = base


def save_and_log(accelerator, folder: str, sample: SamplePrompt, images: list, step: int) -> None:
    """PNGs beside the run (validation: step-000100-0.png; a sample file's entries: step-000100-sample00.png),
    and the --report_to trackers that show images, each in the form it takes."""
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        suffix = str(i) if sample.name == 'validation' else sample.name + (f'-{i}' if len(images) > 1 else '')
        image.save(os.path.join(folder, f'step-{step:06d}-{suffix}.png'))
    for tracker in accelerator.trackers:
        if tracker.name == 'tensorboard':
            tracker.log_images({sample.name: np.stack([np.asarray(image) for image in images])}, step,
                               dataformats='NHWC')
        elif tracker.name in ('wandb', 'swanlab'):
            tracker.log_images({sample.name: images}, step)


def validation_pipeline_factory(accelerator, parts: dict):
    """A diffusers pipeline over the parts being trained, for validation images."""
    def make():
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline(
            unet=accelerator.unwrap_model(parts['unet']), text_encoder=accelerator.unwrap_model(parts['text_encoder']),
            vae=parts['vae'], tokenizer=parts['tokenizer'], safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
            scheduler=_inference_scheduler(parts['model_dir']))
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return make


def _inference_scheduler(model_dir: str):
    """The model's own sampling scheduler (training uses DDPM's noise schedule)."""
    import diffusers
    config = diffusers.PNDMScheduler.load_config(model_dir, subfolder='scheduler')
    return getattr(diffusers, config['_class_name']).from_config(config)
