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

from finetune import run_lock
from finetune.config import LoraTrainConfig
from finetune.data import check_images, dataset_summary, load_records, training_dataset
from finetune.flags import run_trainer
from finetune.models import kohya_file_name, load_components, save_lora, training_metadata
from finetune.training import log_how_to_load, prepare_models, render_result, start_run, train_loop
from finetune.validation_images import validation_pipeline_factory
from modelscope_sd.constants import LORA_WEIGHT_NAME

logger = logging.getLogger('finetune.train_lora')
RESULT_IMAGE = 'lora_result.png'


@run_lock.releasing
def main(config: LoraTrainConfig, notes: Optional[List[str]] = None) -> str:
    accelerator = start_run(config, notes)
    with accelerator.main_process_first():  # one process downloads dataset and model, the others read the cache
        # data first: a bad dataset fails before any model is loaded
        records = check_images(load_records(config.train_data_dir or config.dataset_name, 'train'),
                               config.skip_bad_images, config.resolution, config.enable_bucket)
        validation = [] if config.train_data_dir else load_records(config.dataset_name, 'validation')
        parts = load_components(config.pretrained_model_name_or_path, config.revision, config.vae,
                                config.clip_skip)
    summary = dataset_summary(records, config.train_data_dir or config.dataset_name)
    trained = prepare_models(accelerator, config, parts, lora=True, dataset=summary)

    def dataset(items, validation=False):
        return training_dataset(config, items, parts['tokenizer'], parts['unet'], validation)

    train_loop(accelerator, config, parts, trained, dataset(records),
               validation_dataset=dataset(check_images(validation, config.skip_bad_images), validation=True)
               if validation else None,
               pipeline_for_validation=validation_pipeline_factory(accelerator, parts))
    path = os.path.join(config.output_dir, LORA_WEIGHT_NAME)
    if accelerator.is_main_process:
        path = save_lora(config.output_dir, accelerator.unwrap_model(parts['unet']),
                         accelerator.unwrap_model(parts['text_encoder']) if config.train_text_encoder else None,
                         metadata=training_metadata(config, parts['model_dir'], summary),
                         kohya_file=kohya_file_name(config))
        logger.info('Adapter saved to %s', path)
        log_how_to_load(config, lora=True)
        if config.prompt:
            render_result(config.prompt, config.seed, RESULT_IMAGE, config.pretrained_model_name_or_path,
                          config.revision, lora_dir=config.output_dir, vae=config.vae, clip_skip=config.clip_skip)
    return path


if __name__ == '__main__':
    logging.basicConfig(format='%(asctime)s %(levelname)s %(name)s: %(message)s', level=logging.INFO)
    run_trainer(main, LoraTrainConfig, sys.argv[1:], __doc__, os.path.basename(__file__))
