"""kohya's sd-scripts command lines (train_network.py, train_db.py): its flags that differ from ours by name, each
mapped onto ours, accepted as changing nothing here (with the reason), or refused with what to do instead. Flags
with the same name and meaning (--train_data_dir, --clip_skip, --network_weights, --sample_prompts, ...) are ours
already. Each table entry: flag → (our field, value parser) or (None, function of the value → {field: value}),
as flags.MODELSCOPE_FLAGS."""

from typing import Tuple


def _alpha(value):
    alpha = float(value)
    if not alpha.is_integer():
        raise ValueError(f'--network_alpha {value}: LoRA alpha is a whole number here (--lora_alpha).')
    return {'lora_alpha': int(alpha)}


def _optimizer(value):
    table = {'adamw': {'optimizer': 'adamw'}, 'adamw8bit': {'optimizer': 'adamw', 'use_8bit_adam': True},
             'adafactor': {'optimizer': 'adafactor'}}
    if value.lower() not in table:
        raise ValueError(f'--optimizer_type {value!r}: the optimizers here are AdamW, AdamW8bit and Adafactor.')
    return table[value.lower()]


def _choice(flag: str, accepted: Tuple[str, ...], why: str):
    def check(value):
        if value.lower() not in accepted:
            raise ValueError(f'--{flag} {value!r}: {why}')
        return {}
    return check


def _dynamo_backend(value):
    """kohya's --dynamo_backend: inductor is --torch_compile here, no (kohya's default) changes nothing."""
    table = {'inductor': {'torch_compile': True}, 'no': {}}
    if value.lower() not in table:
        raise ValueError(f'--dynamo_backend {value!r}: the UNet compiles with inductor here (--torch_compile): pass '
                         'inductor or no.')
    return table[value.lower()]


def _switch(**values):
    """A kohya flag without a value that sets ours (``--flip_aug`` → --random_flip)."""
    return lambda value: values


FLAGS = {
    'network_dim': ('rank', int),
    'network_alpha': (None, _alpha),
    'unet_lr': ('learning_rate', float),
    'min_snr_gamma': ('snr_gamma', float),
    'max_train_epochs': (None, lambda v: {'num_train_epochs': int(v), 'max_train_steps': None}),
    'save_every_n_epochs': ('checkpointing_epochs', int),
    'save_every_n_steps': ('checkpointing_steps', int),
    'save_last_n_epochs': ('checkpoints_total_limit', int),
    'caption_dropout_rate': ('proportion_empty_prompts', float),
    'max_data_loader_n_workers': ('dataloader_num_workers', int),
    'optimizer_type': (None, _optimizer),
    'dynamo_backend': (None, _dynamo_backend),
    'dynamo_mode': ('torch_compile_mode', None),
    'lr_scheduler_num_cycles': ('lr_num_cycles', int),
    'lr_scheduler_power': ('lr_power', float),
    'log_with': ('report_to', None),
    'sample_every_n_steps': ('validation_steps', int),
    'sample_every_n_epochs': ('validation_epochs', int),
    'sample_sampler': ('validation_scheduler', None),
    'v_parameterization': (None, _switch(prediction_type='v_prediction')),
    'flip_aug': (None, _switch(random_flip=True)),
    'random_crop': (None, _switch(center_crop=False)),
    'cache_latents_to_disk': (None, _switch(cache_latents=True)),
    'network_module': (None, _choice('network_module', ('networks.lora',),
                                     'this trainer trains LoRA (networks.lora); LyCORIS kinds load for generation '
                                     'but do not train here.')),
    'save_model_as': (None, _choice('save_model_as', ('safetensors',), 'adapters are saved as .safetensors only.')),
    'caption_extension': (None, _choice('caption_extension', ('.txt', '.caption', 'txt', 'caption'),
                                        'captions are read from .txt files, or .caption where there is none.')),
    'loss_type': (None, _choice('loss_type', ('l2',), "the loss is the mean squared error (kohya's l2) here.")),
    'bucket_reso_steps': (None, _choice('bucket_reso_steps', ('64',),
                                        "bucket sides are multiples of 64, what SD1.5's UNet needs.")),
    'xformers': (None, None),
    'sdpa': (None, None),
    'mem_eff_attn': (None, None),
    'network_train_unet_only': (None, None),
    'persistent_data_loader_workers': (None, None),
    'save_precision': (None, None),
    'save_state': (None, None),
    'full_fp16': (None, None),
    'full_bf16': (None, None),  # the LoRA trainer's; DreamBooth's full fine-tune has the flag
    'logging_dir': (None, None),
    'log_prefix': (None, None),
    'prior_loss_weight': (None, None),  # the LoRA trainer's; DreamBooth's is a flag of its own
    'no_half_vae': (None, None),
    'lowram': (None, None),
    'fused_backward_pass': (None, None),  # the LoRA trainer's; DreamBooth's full fine-tune has the flag
}
IGNORED_REASONS = {
    'xformers': "PyTorch's scaled-dot-product attention (flash/memory-efficient kernels) is always used",
    'sdpa': "PyTorch's scaled-dot-product attention is always used",
    'mem_eff_attn': "PyTorch's scaled-dot-product attention (flash/memory-efficient kernels) is always used",
    'network_train_unet_only': 'only the UNet trains unless --train_text_encoder is given',
    'persistent_data_loader_workers': 'loader workers start again each epoch here',
    'save_precision': 'adapters are saved in float32 (a few MB)',
    'save_state': 'every checkpoint holds the optimizer, lr schedule and data position: --resume_from_checkpoint '
                  'latest continues a run',
    'full_fp16': 'trained weights stay float32 under --mixed_precision (adapters are a few MB, so fp16 ones would '
                 'save little and round small updates away)',
    'full_bf16': 'trained weights stay float32 under --mixed_precision (adapters are a few MB, so bf16 ones would '
                 "save little and round small updates away); the DreamBooth trainer's full fine-tune takes "
                 '--full_bf16',
    'logging_dir': 'logs go to OUTPUT_DIR/logs (tensorboard --logdir OUTPUT_DIR/logs)',
    'log_prefix': 'logs go to OUTPUT_DIR/logs under the run name modelscope-sd',
    'prior_loss_weight': 'the LoRA trainer has no class images; the DreamBooth trainer takes --prior_loss_weight '
                         'with --with_prior_preservation (and --use_lora for an adapter)',
    'no_half_vae': "the VAE runs in the --mixed_precision dtype; SD1.5's VAE does not overflow in fp16 as SDXL's does",
    'lowram': 'models load to RAM, then move to the device',
    'fused_backward_pass': "an adapter's gradients are a few MB; the DreamBooth trainer's full fine-tune takes "
                           '--fused_backward_pass',
}
VALUELESS = ('xformers', 'sdpa', 'mem_eff_attn', 'network_train_unet_only', 'persistent_data_loader_workers',
             'save_state', 'random_crop', 'full_fp16', 'full_bf16', 'v_parameterization', 'flip_aug',
             'cache_latents_to_disk', 'no_half_vae', 'lowram', 'fused_backward_pass')
# kohya flags that change training in a way this trainer does not: refused, each with what to do here instead
REFUSED = {
    'reg_data_dir': 'regularization (class) images train with the DreamBooth trainer: run_train_dreambooth.sh '
                    '--use_lora --with_prior_preservation --class_data_dir DIR --class_prompt ...',
    'dataset_config': "kohya's dataset TOML is not read: pass --train_data_dir, whose <repeats>_<tokens> subfolders "
                      'are read as kohya reads them',
    'in_json': "kohya's fine-tuning metadata JSON is not read: put a metadata.jsonl (file_name, text) in "
               '--train_data_dir, or a .txt caption beside each image',
    'dataset_repeats': 'repeats come from the folder names: --train_data_dir with <repeats>_<tokens> subfolders',
    'color_aug': 'no color augmentation here (--random_flip is the augmentation besides the crop)',
    'face_crop_aug_range': 'no face-crop augmentation here',
    'bucket_no_upscale': 'buckets are of about --resolution² pixels and smaller images are scaled up to them',
    'huber_c': 'the loss is the mean squared error here (Huber losses are not offered)',
    'huber_schedule': 'the loss is the mean squared error here (Huber losses are not offered)',
    'scale_weight_norms': 'max-norm regularization of the adapter is not offered',
    'network_dropout': "kohya drops the adapter's rank-sized hidden units; --lora_dropout (peft's) drops its input, "
                       'the nearest here',
    'network_args': 'LoCon (conv_dim), block weights and other network arguments are not trained here: '
                    '--target_modules chooses the layers, --rank and --lora_alpha the shape',
    'multires_noise_iterations': 'multi-resolution noise is not offered; --noise_offset is',
    'multires_noise_discount': 'multi-resolution noise is not offered; --noise_offset is',
    'adaptive_noise_scale': 'adaptive noise scale is not offered; --noise_offset is',
    'ip_noise_gamma': 'input-perturbation noise is not offered',
    'zero_terminal_snr': 'zero-terminal-SNR rescaling of the noise schedule is not offered',
    'debiased_estimation_loss': 'debiased estimation is not offered; --snr_gamma (min-SNR) weights the loss',
    'scale_v_pred_loss_like_noise_pred': 'this v-prediction loss scaling is not offered; --snr_gamma weights the loss',
    'optimizer_args': 'pass AdamW\'s settings as flags: --adam_weight_decay, --adam_beta1, --adam_beta2, '
                      '--adam_epsilon',
    'dim_from_weights': '--network_weights needs --rank (--network_dim) to equal the file\'s rank, which the error '
                        'names if it differs',
    'network_train_text_encoder_only': 'the UNet always trains here; --train_text_encoder adds the text encoder',
    'v2': 'the architecture comes from the base model\'s own config; SD 2.x models are not tested here',
    'cache_text_encoder_outputs': "an SDXL flag: prompts are cached with --cache_latents when the text encoder "
                                  'does not train',
}
