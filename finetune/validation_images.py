"""Validation images: what to render (``--validation_prompt``, and kohya's ``--sample_prompts`` file with its
per-prompt options), rendering it with the model being trained, and showing it to the trackers."""

import dataclasses
import os
from typing import List, Optional

import numpy as np
import torch

from modelscope_sd import prompts
from modelscope_sd.nan_images import check_decodes
from modelscope_sd.prompt_file import read_prompt_file

STEPS = 25  # validation images' default denoising steps


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
    """kohya's sample-prompt file (`modelscope_sd.prompt_file`): one image per prompt, named sample00, sample01, …"""
    return [SamplePrompt(**entry, name=f'sample{index:02d}')
            for index, entry in enumerate(read_prompt_file(path, 'sample_prompts'))]


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
    from modelscope_sd.schedulers import make_scheduler, seeded
    base = pipe.scheduler
    try:
        generators = [torch.Generator('cpu').manual_seed(sample.seed + i) for i in range(sample.num_images)]
        pipe.scheduler = seeded(make_scheduler(sample.scheduler or base, base.config), generators, sample.num_images)
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
        check_decodes(pipe.vae)  # as the pipeline's: an fp16 VAE that decodes NaN (black) images goes on in fp32
        return pipe
    return make


def _inference_scheduler(model_dir: str):
    """The model's own sampling scheduler (training uses DDPM's noise schedule)."""
    import diffusers
    config = diffusers.PNDMScheduler.load_config(model_dir, subfolder='scheduler')
    return getattr(diffusers, config['_class_name']).from_config(config)
