"""LoRA fine-tuning of Stable Diffusion v1.x on image-caption data.

    accelerate launch finetune/train_lora.py --dataset_name buptwq/lora-stable-diffusion-finetune \\
        --output_dir sd-lora --resolution 512 --max_train_steps 1000 --rank 4

The adapter lands in ``output_dir/pytorch_lora_weights.safetensors`` (diffusers format; ``--export_kohya``
adds a kohya/A1111 file) and loads with ``pipeline(..., lora_dir=output_dir)`` or diffusers'
``load_lora_weights``. ModelScope's example flags (``--model``, ``--work_dir``, ``--max_epochs`` …) work too.
"""

import logging
import os
import sys
from typing import List, Optional

import torch
from accelerate.utils import set_seed

from finetune.config import LoraTrainConfig, parse_args
from finetune.data import CaptionDataset, check_images, load_records
from finetune.models import (TEXT_ENCODER_TARGETS, add_lora, load_components, register_lora_checkpoint_hooks,
                             save_lora, training_metadata)
from finetune.training import make_accelerator, prepare_output_dir, train_loop, weight_dtype

logger = logging.getLogger('finetune.train_lora')
RESULT_IMAGE = 'lora_result.png'


def main(config: LoraTrainConfig, notes: Optional[List[str]] = None) -> str:
    prepare_output_dir(config)
    accelerator = make_accelerator(config)
    for note in notes or []:
        logger.info(note)
    # data first: a bad dataset fails before any model is loaded
    records = check_images(load_records(config.train_data_dir or config.dataset_name, 'train'),
                           config.skip_bad_images)
    validation = [] if config.train_data_dir else load_records(config.dataset_name, 'validation')
    parts = load_components(config.pretrained_model_name_or_path, config.revision)
    set_seed(config.seed)  # adapter initialisation
    unet, text_encoder, vae = parts['unet'], parts['text_encoder'], parts['vae']
    # frozen base in the compute precision, adapters in fp32
    dtype = weight_dtype(accelerator)
    for module in (unet, text_encoder, vae):
        module.requires_grad_(False)
        module.to(accelerator.device, dtype=None if dtype == torch.float32 else dtype)
    targets = [m.strip() for m in config.target_modules.split(',') if m.strip()]
    add_lora(unet, config.rank, config.lora_alpha, config.lora_dropout, targets)
    trained = [unet]
    if config.train_text_encoder:
        add_lora(text_encoder, config.rank, config.lora_alpha, config.lora_dropout, TEXT_ENCODER_TARGETS)
        trained.append(text_encoder)
    for module in trained:
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    register_lora_checkpoint_hooks(accelerator, {'unet': unet, 'text_encoder': text_encoder})

    def dataset(items):
        return CaptionDataset(items, parts['tokenizer'], config.resolution, config.center_crop,
                              config.random_flip, config.seed)

    def validation_pipeline():
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(
            parts['model_dir'], unet=accelerator.unwrap_model(unet), text_encoder=accelerator.unwrap_model(text_encoder),
            vae=vae, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(accelerator.device)

    train_loop(accelerator, config, parts, trained, dataset(records),
               validation_dataset=dataset(check_images(validation, config.skip_bad_images)) if validation else None,
               pipeline_for_validation=validation_pipeline)
    path = os.path.join(config.output_dir, 'pytorch_lora_weights.safetensors')
    if accelerator.is_main_process:
        path = save_lora(config.output_dir, accelerator.unwrap_model(unet),
                         accelerator.unwrap_model(text_encoder) if config.train_text_encoder else None,
                         metadata=training_metadata(config, parts['model_dir']), export_kohya=config.export_kohya)
        logger.info('Adapter saved to %s', path)
        if config.prompt:
            render_result(config.prompt, config.seed, RESULT_IMAGE, config.pretrained_model_name_or_path,
                          config.revision, lora_dir=config.output_dir)
    return path


def render_result(prompt: str, seed: int, filename: str, model: str, revision: Optional[str] = None,
                  lora_dir: Optional[str] = None) -> str:
    """As ModelScope's example does after training: one image for ``--prompt``, in the working folder."""
    import cv2

    from modelscope_sd import StableDiffusionText2ImagePipeline
    pipe = StableDiffusionText2ImagePipeline(model, model_revision=revision, lora_dir=lora_dir, progress_bar=False)
    path = os.path.abspath(filename)
    cv2.imwrite(path, pipe({'text': prompt, 'seed': seed})['output_imgs'][0])
    logger.info('Rendered %r to %s', prompt, path)
    return path


if __name__ == '__main__':
    logging.basicConfig(format='%(asctime)s %(levelname)s %(name)s: %(message)s', level=logging.INFO)
    main(*parse_args(LoraTrainConfig, sys.argv[1:], __doc__))
