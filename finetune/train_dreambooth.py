"""DreamBooth for Stable Diffusion v1.x: teach the model a subject from a few photos.

    accelerate launch finetune/train_dreambooth.py --instance_data_dir ./dog --instance_prompt 'a photo of sks dog' \\
        --with_prior_preservation --class_prompt 'a photo of dog' --output_dir sd-dreambooth

Full UNet fine-tune by default: ``output_dir`` becomes a complete model (diffusers layout plus
configuration.json) for ``pipeline(task=..., model=output_dir)``. ``--use_lora`` trains adapters instead,
loadable with ``lora_dir=output_dir``. Missing class images are generated from ``--class_prompt`` with our
pipeline before training and reused by later runs. ModelScope's example flags work too.
"""

import glob
import logging
import os
import re
import shutil
import sys
import tempfile
from typing import List, Optional, Tuple

from finetune import run_lock
from finetune.checkpoint import TEMP_PREFIX
from finetune.config import DreamBoothConfig
from finetune.data import (PriorPreservationDataset, check_images, dataset_summary, image_paths, load_records,
                           records_from_image_folder, training_dataset)
from finetune.diffusion import pipeline_clip_skip
from finetune.flags import run_trainer
from finetune.models import kohya_file_name, load_components, save_lora, training_metadata
from finetune.training import log_how_to_load, prepare_models, render_result, start_run, train_loop
from finetune.validation_images import validation_pipeline_factory
from modelscope_sd.constants import MODEL_INDEX
from modelscope_sd.loading import write_configuration
from modelscope_sd.single_file import save_single_file

logger = logging.getLogger('finetune.train_dreambooth')
RESULT_IMAGE = 'dreambooth_result.png'
CLASS_PROMPT_KEY = 'modelscope_sd.class_prompt'
CLASS_MODEL_KEY = 'modelscope_sd.class_model'  # the model (and VAE) that made a class image
CLASS_IMAGE_NAME = re.compile(r'class-(\d+)\.png')


def checkpoint_file_name(config: DreamBoothConfig) -> str:
    """--export_checkpoint's file in output_dir: kohya's --output_name, else the folder's name."""
    return (config.output_name or os.path.basename(os.path.normpath(os.path.abspath(config.output_dir)))) + '.safetensors'


@run_lock.releasing
def main(config: DreamBoothConfig, notes: Optional[List[str]] = None) -> str:
    accelerator = start_run(config, notes)
    if config.with_prior_preservation:
        check_class_images(config)  # before any model loads
    with accelerator.main_process_first():  # one process downloads, the others then read the cache
        instance = check_images(instance_records(config), config.skip_bad_images, config.resolution,
                                config.enable_bucket)
        parts = load_components(config.pretrained_model_name_or_path, config.revision, config.vae,
                                config.clip_skip)  # checks the base
    if config.with_prior_preservation:
        generate_class_images(config, accelerator)
    summary = dataset_summary(instance, config.instance_data_dir or config.dataset_name)
    trained = prepare_models(accelerator, config, parts, lora=config.use_lora, dataset=summary)

    def dataset(records, name=''):
        return training_dataset(config, records, parts['tokenizer'], parts['unet'], name=name)

    data = dataset(instance)
    if config.with_prior_preservation:
        classes = records_from_image_folder(config.class_data_dir, caption=config.class_prompt)
        data = PriorPreservationDataset(data, dataset(classes[:config.num_class_images], 'class'),
                                        config.prior_loss_weight)
    train_loop(accelerator, config, parts, trained, data,
               pipeline_for_validation=validation_pipeline_factory(accelerator, parts))
    if accelerator.is_main_process:
        unet, text_encoder = accelerator.unwrap_model(parts['unet']), accelerator.unwrap_model(parts['text_encoder'])
        if config.use_lora:
            save_lora(config.output_dir, unet, text_encoder if config.train_text_encoder else None,
                      metadata=training_metadata(config, parts['model_dir'], summary), kohya_file=kohya_file_name(config))
        else:
            pipe = save_full_model(config.output_dir, parts['model_dir'], unet, text_encoder,
                                   parts['vae'] if config.vae else None)
            if config.export_checkpoint:
                path = save_single_file(pipe, os.path.join(config.output_dir, checkpoint_file_name(config)),
                                        metadata=training_metadata(config, parts['model_dir'], summary))
                logger.info('Single-file checkpoint for A1111/ComfyUI: %s', path)
        logger.info('Saved to %s', config.output_dir)
        log_how_to_load(config, lora=config.use_lora)
        if config.prompt:
            if config.use_lora:
                render_result(config.prompt, config.seed, RESULT_IMAGE, config.pretrained_model_name_or_path,
                              config.revision, lora_dir=config.output_dir, vae=config.vae, clip_skip=config.clip_skip)
            else:
                render_result(config.prompt, config.seed, RESULT_IMAGE, config.output_dir, clip_skip=config.clip_skip)
    return config.output_dir


def instance_records(config: DreamBoothConfig):
    """Every instance photo gets the instance prompt, whatever caption its source had."""
    records = load_records(config.instance_data_dir or config.dataset_name, 'train', caption=config.instance_prompt)
    if not records:
        raise ValueError(f'dataset_name={config.dataset_name!r} holds no instance images.')
    return records


def generate_class_images(config: DreamBoothConfig, accelerator) -> int:
    """Fill ``class_data_dir`` up to ``num_class_images`` with images of the *class* prompt, made by our pipeline
    from the base model. Image i is ``class-i.png`` from seed + i, whichever process makes it and whenever: the
    missing ones are split over the processes, and an interrupted fill resumes with the ones still missing.
    Returns how many this process made."""
    if accelerator.is_main_process:
        os.makedirs(config.class_data_dir, exist_ok=True)
        for leftover in glob.glob(os.path.join(config.class_data_dir, '*.partial.png')):
            os.remove(leftover)
    accelerator.wait_for_everyone()
    runs = class_image_runs(config)
    accelerator.wait_for_everyone()  # every process has counted before any writes
    if not runs:
        logger.info('Reusing the class images in %s.', config.class_data_dir)
        return 0
    logger.info('Generating %d class images for %r in %s on %d process(es).', sum(n for _, n in runs),
                config.class_prompt, config.class_data_dir, accelerator.num_processes)
    mine = runs[accelerator.process_index::accelerator.num_processes]
    if mine:
        _render_class_images(config, accelerator.device, mine)
    accelerator.wait_for_everyone()
    return sum(n for _, n in mine)


def check_class_images(config: DreamBoothConfig) -> None:
    """The class images this trainer made carry their prompt and the model that made them. Ones made for another
    class prompt (a shared class_data_dir, or an output_dir trained over with a new class) would be reused as this
    class's prior: refused. Ones another model made are still pictures of the class: reused, with a warning."""
    from PIL import Image
    other_prompt, other_model, ours = [], [], class_model(config)
    for path in image_paths(config.class_data_dir) if os.path.isdir(config.class_data_dir) else []:
        if CLASS_IMAGE_NAME.fullmatch(os.path.basename(path)):
            with Image.open(path) as image:  # our text chunks come before the pixels: nothing is decoded
                prompt, model = image.info.get(CLASS_PROMPT_KEY), image.info.get(CLASS_MODEL_KEY)
            if prompt is not None and prompt != config.class_prompt:
                other_prompt.append((os.path.basename(path), prompt))
            if model is not None and model != ours:
                other_model.append((os.path.basename(path), model))
    if other_prompt:
        raise ValueError(f'class_data_dir={config.class_data_dir!r} holds {len(other_prompt)} class image(s) made '
                         f'for another class prompt ({other_prompt[0][1]!r}, e.g. {other_prompt[0][0]}), not '
                         f'class_prompt={config.class_prompt!r}. Delete them to have them made again, or pass '
                         'another --class_data_dir.')
    if other_model:
        logger.warning('class_data_dir=%r holds %d class image(s) made by another model (%s, e.g. %s), not %s. They '
                       'are reused as the prior, which should be what this model makes: delete them to have it make '
                       'them again, or pass another --class_data_dir.', config.class_data_dir, len(other_model),
                       other_model[0][1], other_model[0][0], ours)


def class_model(config: DreamBoothConfig) -> str:
    """The model that makes the class images, as their PNGs record it: hub id or absolute path, revision, VAE and
    Clip skip."""
    def name(path):
        return os.path.abspath(path) if os.path.exists(path) else path
    described = name(config.pretrained_model_name_or_path)
    if config.revision:
        described += f'@{config.revision}'
    if config.vae:
        described += f' with VAE {name(config.vae)}'
    return described + (f', Clip skip {config.clip_skip}' if pipeline_clip_skip(config.clip_skip) else '')


def class_image_runs(config: DreamBoothConfig) -> List[Tuple[int, int]]:
    """(first index, count) batches of the class images still missing, at most ``sample_batch_size`` each.
    Images of other names in the folder (your own class photos) count towards ``num_class_images``."""
    names = [os.path.basename(p) for p in image_paths(config.class_data_dir)]
    generated = {int(m.group(1)) for m in map(CLASS_IMAGE_NAME.fullmatch, names) if m}
    others = len(names) - len(generated)
    missing = [i for i in range(others, config.num_class_images) if i not in generated]
    runs = []
    for i in missing:
        if runs and runs[-1][0] + runs[-1][1] == i and runs[-1][1] < config.sample_batch_size:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _render_class_images(config: DreamBoothConfig, device, runs: List[Tuple[int, int]]) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from modelscope_sd import StableDiffusionText2ImagePipeline
    pipe = StableDiffusionText2ImagePipeline(config.pretrained_model_name_or_path, model_revision=config.revision,
                                             device=str(device), progress_bar=False, vae=config.vae)
    for first, count in runs:
        output = pipe({'text': config.class_prompt, 'num_images_per_prompt': count, 'seed': config.seed + first,
                       'height': config.resolution, 'width': config.resolution,
                       'num_inference_steps': config.class_inference_steps,
                       'clip_skip': pipeline_clip_skip(config.clip_skip)})
        for offset, image in enumerate(output['output_imgs']):
            info = PngInfo()
            info.add_text(CLASS_PROMPT_KEY, config.class_prompt)
            info.add_text(CLASS_MODEL_KEY, class_model(config))
            path = os.path.join(config.class_data_dir, f'class-{first + offset:05d}.png')
            Image.fromarray(image[..., ::-1]).save(path + '.partial.png', pnginfo=info)
            os.replace(path + '.partial.png', path)  # a kill never leaves a half-written image


def save_full_model(output_dir: str, base_dir: str, unet, text_encoder, vae=None):
    """A complete diffusers model with ModelScope's configuration.json (and ``vae`` in place of the base model's,
    when given). Written to a temporary folder first; model_index.json, which makes the folder look like a model,
    is moved in last. Returns the pipeline."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base_dir, unet=unet, text_encoder=text_encoder,
                                                   **({} if vae is None else {'vae': vae}))
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=TEMP_PREFIX) as tmp:
        pipe.save_pretrained(tmp)
        write_configuration(tmp)
        for name in sorted(os.listdir(tmp), key=lambda n: n == MODEL_INDEX):
            target = os.path.join(output_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, name), target)
    return pipe


if __name__ == '__main__':
    logging.basicConfig(format='%(asctime)s %(levelname)s %(name)s: %(message)s', level=logging.INFO)
    run_trainer(main, DreamBoothConfig, sys.argv[1:], __doc__, os.path.basename(__file__))
