"""The training loop both trainers run, top to bottom: accelerate for devices, precision, accumulation
and state; per-step seeding so that a resumed run repeats an uninterrupted one exactly."""

import contextlib
import logging
import math
import os
import signal
from typing import List, Optional

import torch
from tqdm.auto import tqdm

from modelscope_sd.fast import mode_for_device

from . import run_lock, validation_images
from .buckets import BucketBatchSampler
from .checkpoint import (check_not_past, check_resume_settings, find_checkpoint, read_state, remove_partial_writes,
                         save_checkpoint, warn_if_checkpoints_outgrow_the_disk)
from .config import (check_full_bf16, check_fused_backward_pass, full_bf16_conflict, fused_backward_pass_conflict,
                     target_module_list, trains_lora)
from .data import EpochSampler, cache_dataset, collate
from .diffusion import denoising_loss, pipeline_clip_skip
from .divergence import TrainingDiverged, check_finite
from .fused_backward import OptimizerInBackward
from .interrupt import StopRequests, TrainingInterrupted, ignore_stop_signals, restore_stop_signals
from .stochastic_adamw import StochasticAdamW

logger = logging.getLogger(__name__)

RUN_MARKERS = ('pytorch_lora_weights.safetensors', 'model_index.json', 'training_state.json')


def prepare_output_dir(config, resuming: bool) -> None:
    """Refuse to train over a finished or running run unless resuming a checkpoint or told to overwrite."""
    out = config.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f'output_dir={out!r} is a file: pass a folder (it is created if missing).')
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:  # a parent that is a file, a read-only or missing mount: said before anything loads
        raise ValueError(f'output_dir={out!r} cannot be created ({err.strerror}): pass a folder you can write '
                         'to.') from err
    # before anything in the folder is read or touched, as it may be another run's; released however main ends
    run_lock.hold(out)
    if not resuming and not config.overwrite_output_dir:
        held = [n for n in os.listdir(out) if n in RUN_MARKERS or n.startswith('checkpoint-')]
        if held and config.resume_from_checkpoint:  # 'latest', but no complete checkpoint to continue from
            raise ValueError(f'resume_from_checkpoint={config.resume_from_checkpoint!r}: output_dir={out!r} holds a '
                             f'run ({sorted(held)[:4]}) but no complete checkpoint, and a new run would replace '
                             'its results. Pass --overwrite_output_dir to train over it, or choose another output_dir.')
        if held:
            raise ValueError(f'output_dir={out!r} already holds a run ({sorted(held)[:4]}). Pass '
                             '--resume_from_checkpoint latest to continue it, --overwrite_output_dir to train '
                             'over it, or choose another output_dir.')
    remove_partial_writes(out)


def resume_settings(config) -> dict:
    """The flags a checkpoint's contents depend on; a resumed run must match them."""
    # the learning rates are in the optimizer's and the lr schedule's state, which a resume restores
    names = ['train_text_encoder', 'optimizer', 'use_8bit_adam', 'learning_rate', 'text_encoder_lr']
    lora = trains_lora(config)
    if lora:
        names += ['rank', 'lora_alpha', 'target_modules', 'use_dora']
    if hasattr(config, 'use_lora'):  # DreamBooth's
        names += ['full_bf16']
    settings = {'use_lora': lora, **{name: getattr(config, name) for name in names}}
    if 'target_modules' in settings:
        settings['target_modules'] = ','.join(sorted(target_module_list(config.target_modules)))
    return settings


def start_run(config, notes=None):
    """Check the output folder (and a checkpoint to resume against this run's settings), make the
    accelerator, log how ModelScope flags were mapped."""
    restore_stop_signals()
    checkpoint = find_checkpoint(config.output_dir, config.resume_from_checkpoint)
    prepare_output_dir(config, resuming=checkpoint is not None)
    if checkpoint:
        check_resume_settings(checkpoint, resume_settings(config))
        if config.max_train_steps:  # else the step count comes from the dataset, known in train_loop
            check_not_past(checkpoint, config.max_train_steps, trains_lora(config))
    elif config.resume_from_checkpoint == 'latest':  # said here, once: train_loop looks the checkpoint up again
        logger.warning("resume_from_checkpoint='latest' but %s holds no checkpoint: starting a new run.",
                       config.output_dir)
    accelerator = make_accelerator(config)
    if getattr(config, 'fused_backward_pass', False):  # precision and processes may come from accelerate's config
        check_fused_backward_pass(config, accelerator.mixed_precision, accelerator.num_processes)
    if getattr(config, 'full_bf16', False):
        check_full_bf16(config, accelerator.mixed_precision)
    for note in notes or []:
        logger.info(note)
    return accelerator


def make_accelerator(config):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    mixed_precision = config.mixed_precision
    if mixed_precision == 'fp16' and not torch.cuda.is_available():
        logger.warning('mixed_precision=fp16 needs a CUDA GPU; training in fp32 on this machine.')
        mixed_precision = 'no'
    handlers = []
    if config.gradient_checkpointing:
        from accelerate.utils import AutocastKwargs
        # autocast keeps the bf16 copy of every fp32 weight it casts until the forward ends (1.6 GiB for SD1.5's
        # UNet), also those of checkpointed blocks, which save nothing for backward: uncached, they go with their block
        handlers.append(AutocastKwargs(cache_enabled=False))
    if pipeline_clip_skip(config.clip_skip) and config.train_text_encoder:
        # the skipped last layers get no gradient, which DDP (several processes) must be told
        from accelerate.utils import DistributedDataParallelKwargs
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps, mixed_precision=mixed_precision,
        log_with=config.report_to, kwargs_handlers=handlers,
        project_config=ProjectConfiguration(project_dir=config.output_dir,
                                            logging_dir=os.path.join(config.output_dir, 'logs')))
    if not accelerator.is_local_main_process:  # one log per machine, not one per process
        logging.getLogger('finetune').setLevel(logging.WARNING)
    return accelerator


def weight_dtype(accelerator) -> torch.dtype:
    """Frozen weights are stored in the compute precision; trained ones stay fp32 (bf16 with --full_bf16)."""
    return {'fp16': torch.float16, 'bf16': torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_optimizer(config, params, device: torch.device, lr: float):
    if getattr(config, 'full_bf16', False):
        return StochasticAdamW(params, lr=lr, betas=(config.adam_beta1, config.adam_beta2),
                               weight_decay=config.adam_weight_decay, eps=config.adam_epsilon, seed=config.seed)
    if config.optimizer == 'adafactor':
        from transformers.optimization import Adafactor
        # a fixed learning rate (the lr schedule still applies), as kohya's sd-scripts run it for SD fine-tunes
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=config.adam_weight_decay)
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ValueError('use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA only), or drop '
                             'the flag.') from err
        optimizer_cls, extra = bnb.optim.AdamW8bit, {}
    else:
        # the fused kernel is one launch for all parameters instead of several per tensor
        optimizer_cls, extra = torch.optim.AdamW, ({'fused': True} if device.type == 'cuda' else {})
    return optimizer_cls(params, lr=lr, betas=(config.adam_beta1, config.adam_beta2),
                         weight_decay=config.adam_weight_decay, eps=config.adam_epsilon, **extra)


def prepare_models(accelerator, config, parts: dict, lora: bool, dataset: Optional[dict] = None
                   ) -> List[torch.nn.Module]:
    """Freeze, place and cast the parts; attach adapters (``lora``) or unfreeze the UNet for a full
    fine-tune. Frozen weights live in the compute precision, trained ones in fp32 (in bf16 with --full_bf16)
    (``dataset``: what the adapter files record of the data, `finetune.data.dataset_summary`). Returns what trains."""
    from accelerate.utils import set_seed

    from .models import TEXT_ENCODER_TARGETS, add_lora, register_lora_checkpoint_hooks, training_metadata

    unet, text_encoder, vae = parts['unet'], parts['text_encoder'], parts['vae']
    dtype = weight_dtype(accelerator)
    low = None if dtype == torch.float32 else dtype
    trained = [unet] + ([text_encoder] if config.train_text_encoder else [])
    for module in (unet, text_encoder, vae):
        module.requires_grad_(False)
        module.to(accelerator.device)
        if low is not None and (lora or module not in trained):
            # torch's to(), not diffusers' override, which warns of float32-kept modules on every cast even when a
            # model has none (SD's UNet and VAE have none)
            torch.nn.Module.to(module, dtype=low)
    set_seed(config.seed)  # adapter initialisation
    if lora:
        targets = target_module_list(config.target_modules)
        add_lora(unet, config.rank, config.lora_alpha, config.lora_dropout, targets, use_dora=config.use_dora)
        if config.train_text_encoder:
            add_lora(text_encoder, config.rank, config.lora_alpha, config.lora_dropout, TEXT_ENCODER_TARGETS,
                     use_dora=config.use_dora)
        register_lora_checkpoint_hooks(accelerator, {'unet': unet, 'text_encoder': text_encoder},
                                       training_metadata(config, parts.get('model_dir'), dataset))
    else:
        for module in trained:
            module.requires_grad_(True)
    trained_dtype = torch.bfloat16 if getattr(config, 'full_bf16', False) else torch.float32
    for module in trained:
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.to(trained_dtype)
    if lora and config.network_weights:  # a resume's checkpoint still replaces these
        load_network_weights(config, unet, text_encoder)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    if config.torch_compile:
        # in place: the module, its hooks and its state-dict keys stay as they are
        unet.compile(mode=mode_for_device(config.torch_compile_mode, accelerator.device, '--torch_compile'))
    return trained


def load_network_weights(config, unet, text_encoder) -> None:
    """--network_weights into the new adapters, at this run's alpha/rank scale (the file's scale is folded into
    it first), so the run starts from the adapter's exact effect."""
    from .models import adapter_part, adapter_state, set_adapter_state
    state = adapter_state(config.network_weights)
    scale = (config.lora_alpha or config.rank) / config.rank
    for role, model in (('unet', unet), ('text_encoder', text_encoder)):
        part = {k: v / scale if '.lora_B.' in k else v for k, v in adapter_part(state, role).items()}
        if part:
            set_adapter_state(model, part, config.network_weights)
    logger.info('Adapters start from %s.', config.network_weights)


def render_result(prompt: str, seed: int, filename: str, model: str, revision: Optional[str] = None,
                  lora_dir: Optional[str] = None, vae: Optional[str] = None, clip_skip: Optional[int] = None) -> str:
    """As ModelScope's examples do after training: one image for ``--prompt``, in the working folder
    (``clip_skip``: the trainers' --clip_skip, A1111's count)."""
    import cv2

    from modelscope_sd import StableDiffusionText2ImagePipeline
    pipe = StableDiffusionText2ImagePipeline(model, model_revision=revision, lora_dir=lora_dir, vae=vae,
                                             progress_bar=False)
    path = os.path.abspath(filename)
    output = pipe({'text': prompt, 'seed': seed, 'clip_skip': pipeline_clip_skip(clip_skip)})
    cv2.imwrite(path, output['output_imgs'][0])
    logger.info('Rendered %r to %s', prompt, path)
    return path


def make_loader(dataset, batch_size: int, seed: int, shuffle: bool = True, num_workers: int = 0):
    """(loader, sampler): batches of one aspect bucket when the dataset has bucket ``targets``
    (--enable_bucket), else a seeded shuffle; either sampler's ``start_epoch`` sets the epoch and the skip.
    Unshuffled (validation) bucket batches are not topped up: each image counts once."""
    if getattr(dataset, 'targets', None) is not None:
        sampler = BucketBatchSampler(dataset.targets, batch_size, seed, shuffle, full=shuffle)
        batching = {'batch_sampler': sampler}
    else:
        sampler = EpochSampler(len(dataset), seed, shuffle)
        batching = {'batch_size': batch_size, 'sampler': sampler}
    loader = torch.utils.data.DataLoader(dataset, collate_fn=getattr(dataset, 'collate', collate),
                                         num_workers=num_workers, worker_init_fn=ignore_stop_signals, **batching)
    return loader, sampler


def log_how_to_load(config, lora: bool) -> None:
    """The lines that use what was just saved, for copying from the log."""
    out, skip = config.output_dir, pipeline_clip_skip(config.clip_skip)
    call = '' if skip is None else f", then pipe({{'text': ..., 'clip_skip': {skip}}})"
    flags = '' if skip is None else f' --clip_skip {skip}'
    if lora:
        vae = '' if config.vae is None else f', vae={config.vae!r}'
        flags += '' if config.vae is None else f' --vae {config.vae}'
        logger.info("Load it: pipeline(Tasks.text_to_image_synthesis, model=%r, lora_dir=%r%s)%s, or "
                    "modelscope-sd generate --model %s --lora %s%s --prompt '...'",
                    config.pretrained_model_name_or_path, out, vae, call, config.pretrained_model_name_or_path, out,
                    flags)
    else:
        logger.info("Load it: pipeline(Tasks.text_to_image_synthesis, model=%r)%s, or "
                    "modelscope-sd generate --model %s%s --prompt '...'", out, call, out, flags)
    if skip is not None:
        logger.info('Trained with --clip_skip %d: generate with A1111\'s Clip skip %d, which is the pipeline\'s '
                    'clip_skip=%d.', config.clip_skip, config.clip_skip, skip)


def step_seed(seed: int, micro_step: int, process: int) -> int:
    return (seed * 1_000_003 + micro_step) * 64 + process


def train_loop(accelerator, config, parts: dict, trained: List[torch.nn.Module], dataset,
               validation_dataset=None, pipeline_for_validation=None) -> int:
    """Run to ``max_train_steps``; returns the final step. ``parts`` holds unet, text_encoder, vae,
    noise_scheduler; ``trained`` the modules whose parameters require grad."""
    from diffusers.optimization import get_scheduler

    from .models import lora_inputs_uncast
    unet, text_encoder, vae, scheduler = parts['unet'], parts['text_encoder'], parts['vae'], parts['noise_scheduler']
    if config.prediction_type:
        scheduler.register_to_config(prediction_type=config.prediction_type)
    # 1. data: order and augmentation are functions of (seed, epoch, index)
    if config.cache_latents:
        dataset = cache_dataset(dataset, vae, None if any(m is text_encoder for m in trained) else text_encoder,
                                on_device=config.dataloader_num_workers == 0, clip_skip=config.clip_skip)
    loader, sampler = make_loader(dataset, config.train_batch_size, config.seed,
                                  num_workers=config.dataloader_num_workers)
    if getattr(dataset, 'targets', None) is None and len(dataset) < config.train_batch_size:
        logger.warning('train_batch_size=%d but the dataset holds %d example(s): every batch holds %d, and '
                       '--scale_lr would scale as if it held %d. Lower --train_batch_size to %d, or add images.',
                       config.train_batch_size, len(dataset), len(dataset), config.train_batch_size, len(dataset))
    # accelerate shards the loader over the processes (padding the last round): each epoch is this many
    # batches per process, and that, not len(loader), sets the optimizer steps per epoch
    batches = len(loader)
    batches_per_process = math.ceil(batches / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_process / config.gradient_accumulation_steps)
    max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    epochs = math.ceil(max_steps / steps_per_epoch)
    checkpoint_every_epochs = config.checkpointing_epochs and config.checkpointing_epochs * steps_per_epoch
    validate_every_epochs = config.validation_epochs and config.validation_epochs * steps_per_epoch
    # 2. optimizer and lr schedule over the trained parameters; with --text_encoder_lr the text encoder's are a
    # parameter group of their own
    params = [p for module in trained for p in module.parameters() if p.requires_grad]
    scale = (config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
             if config.scale_lr else 1)
    lr, groups = config.learning_rate * scale, params
    if config.text_encoder_lr is not None:
        own = {id(p) for p in text_encoder.parameters()}
        groups = [{'params': [p for p in params if id(p) not in own]},
                  {'params': [p for p in params if id(p) in own], 'lr': config.text_encoder_lr * scale}]
    optimizer = make_optimizer(config, groups, accelerator.device, lr)
    if accelerator.is_main_process:
        warn_if_checkpoints_outgrow_the_disk(config, params, max_steps, checkpoint_every_epochs)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes,
                                 num_cycles=config.lr_num_cycles, power=config.lr_power)
    prepared = accelerator.prepare(*trained, optimizer, loader, lr_scheduler)
    trained_wrapped, (optimizer, loader, lr_scheduler) = prepared[:len(trained)], prepared[len(trained):]
    if len(loader) != batches_per_process:
        raise RuntimeError(f'accelerate gave each of {accelerator.num_processes} processes {len(loader)} of the '
                           f'{batches} batches, not {batches_per_process}: the step count would be wrong.')
    wrapped = {id(m): w for m, w in zip(trained, trained_wrapped)}
    unet_run, text_encoder_run = wrapped.get(id(unet), unet), wrapped.get(id(text_encoder), text_encoder)
    # 3. resume: weights, optimizer, lr schedule from the checkpoint; step and data position from its state
    global_step, first_epoch, skip_batches = 0, 0, 0
    checkpoint = find_checkpoint(config.output_dir, config.resume_from_checkpoint)
    if checkpoint:
        if not config.max_train_steps:  # start_run checked a given count; one of epochs is known only now
            check_not_past(checkpoint, max_steps, trains_lora(config),
                           f'--num_train_epochs {config.num_train_epochs} ({max_steps} steps)')
        accelerator.load_state(checkpoint)
        state = read_state(checkpoint)
        _warn_of_another_batch_shape(accelerator, config, checkpoint, state)
        global_step = state['global_step']
        first_epoch = global_step // steps_per_epoch
        skip_batches = (global_step % steps_per_epoch) * config.gradient_accumulation_steps
        logger.info('Resumed from %s at step %d (epoch %d).', checkpoint, global_step, first_epoch)
    if accelerator.is_main_process and config.report_to:
        accelerator.init_trackers('modelscope-sd', config={k: v for k, v in vars(config).items()
                                                           if isinstance(v, (int, float, str, bool))})
    logger.info('%d examples, %d epochs, %d optimizer steps of %d x %d x %d images.', len(dataset), epochs,
                max_steps, config.train_batch_size, config.gradient_accumulation_steps, accelerator.num_processes)
    progress = tqdm(range(max_steps), initial=global_step, desc='steps', disable=not accelerator.is_local_main_process)
    samples = validation_images.validation_samples(config)

    def validation_due(step: int) -> bool:
        return _due(step, config.validation_steps) or _due(step, validate_every_epochs)

    if config.sample_at_first and global_step == 0 and accelerator.is_main_process:  # the base model's, to compare
        _validate(accelerator, config, parts, pipeline_for_validation, validation_dataset, samples, 0)
    # 4. the loop
    last_saved, updating = global_step, False
    fused = getattr(config, 'fused_backward_pass', False)
    in_backward = OptimizerInBackward(optimizer, params, config.max_grad_norm) if fused else contextlib.nullcontext()
    # Ctrl-C or SIGTERM: finish the step, save a checkpoint, exit; out of memory: save the last step, say what helps
    with StopRequests() as stop, saved_on_out_of_memory(accelerator, config, params, lambda: (
            global_step, last_saved, updating)), lora_inputs_uncast(trained, accelerator.native_amp), in_backward, \
            _closing_on(TrainingDiverged, accelerator, progress):
        for epoch in range(first_epoch, epochs):
            if global_step >= max_steps:
                break
            for module in trained_wrapped:
                module.train()
            skip = skip_batches * config.train_batch_size * accelerator.num_processes if epoch == first_epoch else 0
            sampler.start_epoch(epoch, skip)
            micro_step = global_step * config.gradient_accumulation_steps
            for batch in loader:
                torch.manual_seed(step_seed(config.seed, micro_step, accelerator.process_index))
                micro_step += 1
                with accelerator.accumulate(*trained_wrapped):
                    losses = denoising_loss(unet_run, text_encoder_run, vae, scheduler, batch,
                                            config.noise_offset, config.snr_gamma, config.clip_skip)
                    weights = batch.get('loss_weight')
                    loss = losses.mean() if weights is None else (losses * weights).sum() / batch['is_instance'].sum()
                    updating = fused  # --fused_backward_pass steps during backward
                    accelerator.backward(loss)
                    if fused:
                        in_backward.flush()  # the last group
                    else:
                        if accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(params, config.max_grad_norm)
                        updating = True  # weights change from here: a failure now leaves a step half done
                        optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    updating = False
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                progress.update(1)
                logging_due = global_step % config.logging_steps == 0 or global_step == max_steps
                if logging_due:
                    # .item() waits for the GPU: only here, so between logs the CPU queues steps ahead
                    logs = {'loss': loss.detach().item(), 'lr': lr_scheduler.get_last_lr()[0]}
                    if config.text_encoder_lr is not None:
                        logs['lr_text_encoder'] = lr_scheduler.get_last_lr()[1]
                    progress.set_postfix(**logs)
                    accelerator.log(logs, step=global_step)
                if logging_due or validation_due(global_step):  # (checkpoints check their own weights)
                    check_finite(params, config, global_step, logs['loss'] if logging_due else None)
                saved = None
                if _due(global_step, config.checkpointing_steps) or _due(global_step, checkpoint_every_epochs):
                    saved, last_saved = _checkpoint(accelerator, config, global_step, params), global_step
                if validation_due(global_step) and accelerator.is_main_process:
                    _validate(accelerator, config, parts, pipeline_for_validation, validation_dataset, samples,
                              global_step)
                if global_step >= max_steps:
                    break
                if stop.agreed(accelerator):
                    progress.close()
                    _stop(accelerator, config, global_step, stop.signum, saved, params)
    progress.close()
    accelerator.wait_for_everyone()
    final_validation_due = (samples or validation_dataset is not None) and not validation_due(global_step)
    if accelerator.is_main_process and final_validation_due:
        _validate(accelerator, config, parts, pipeline_for_validation, validation_dataset, samples, global_step)
    accelerator.end_training()
    return global_step


def _checkpoint(accelerator, config, step: int, params) -> str:
    """Save ``checkpoint-step``, unless the trained weights (``params``) went NaN or inf: a checkpoint is
    always one to resume from, and the rotation never removes a good one for it."""
    check_finite(params, config, step)
    return save_checkpoint(accelerator, config.output_dir, step,
                           {'global_step': step, 'settings': resume_settings(config),
                            'batch': _batch_shape(accelerator, config)}, config.checkpoints_total_limit)


def _batch_shape(accelerator, config) -> List[int]:
    """Images per step, as train_batch_size, gradient_accumulation_steps and processes: what a data position counts."""
    return [config.train_batch_size, config.gradient_accumulation_steps, accelerator.num_processes]


def _warn_of_another_batch_shape(accelerator, config, checkpoint: str, state: dict) -> None:
    """A resume goes on in this run's batches, and its place in the epoch is counted in them: with another shape
    than the checkpoint's it reads some of the epoch's images again, or skips them, where the same shape resumes
    exactly. Said, not refused: a larger batch or another GPU count is a fair way to go on."""
    saved, now = state.get('batch'), _batch_shape(accelerator, config)
    if saved is not None and saved != now:
        logger.warning('%s was saved by a run of %s images per step (train_batch_size x gradient_accumulation_steps x '
                       'processes); this run takes %s. It goes on from step %d, but counts its place in the epoch in '
                       'the new batches, so it reads some of this epoch\'s images again or skips them. The same sizes '
                       'resume exactly.', checkpoint, ' x '.join(map(str, saved)), ' x '.join(map(str, now)),
                       state['global_step'])


@contextlib.contextmanager
def saved_on_out_of_memory(accelerator, config, params, where):
    """GPU out of memory in the loop: save the last finished step (``where()`` gives it, the step last saved and
    whether the weights were being updated), then say which flags use less memory, before the error goes on.
    One process only: with several, the others wait in collectives and the save would hang."""
    try:
        yield
    except torch.OutOfMemoryError:
        step, saved, updating = where()
        if accelerator.num_processes == 1 and step > saved and not updating:
            torch.cuda.empty_cache()
            path = _checkpoint(accelerator, config, step, params)
            logger.error('Out of memory after step %d; saved %s: --resume_from_checkpoint latest continues from '
                         'there.', step, path)
        logger.error('Out of GPU memory. Flags that use less: %s.',
                     ', '.join(memory_advice(config, accelerator.mixed_precision, accelerator.num_processes)))
        raise


def memory_advice(config, mixed_precision: str, processes: int = 1) -> List[str]:
    """The memory-saving flags this run (on ``processes`` processes) does not use yet, biggest saving first."""
    full = not trains_lora(config)  # DreamBooth's full fine-tune: optimizer state is GiBs
    full_bf16 = getattr(config, 'full_bf16', False)
    advice = [
        ('--mixed_precision bf16', mixed_precision == 'no'),
        ('--use_8bit_adam or --optimizer adafactor', full and config.optimizer == 'adamw' and not config.use_8bit_adam
         and not full_bf16),
        ('--full_bf16', full and not full_bf16 and full_bf16_conflict(config, mixed_precision) is None),
        ('--use_lora', full),
        ('--fused_backward_pass', full and not config.fused_backward_pass
         and fused_backward_pass_conflict(config, mixed_precision, processes) is None),
        (f'--train_batch_size {max(1, config.train_batch_size // 2)} with --gradient_accumulation_steps '
         f'{config.gradient_accumulation_steps * 2} (the same images per step)', config.train_batch_size > 1),
        ('--gradient_checkpointing', not config.gradient_checkpointing),
        ('--cache_latents', not config.cache_latents),
        (f'a lower --resolution (e.g. {config.resolution * 3 // 4 // 8 * 8})', True),
    ]
    return [flag for flag, applies in advice if applies]


def _stop(accelerator, config, step: int, signum: Optional[int], saved: Optional[str], params):
    """Save where the run stands (unless this step just did) and exit; resuming continues from here."""
    path = saved or _checkpoint(accelerator, config, step, params)
    logger.warning('Stopped at step %d; saved %s. Run the same command with --resume_from_checkpoint latest to '
                   'continue.', step, path)
    accelerator.end_training()
    raise TrainingInterrupted(signum or signal.SIGTERM, step, path)  # processes that got no signal of their own


@contextlib.contextmanager
def _closing_on(error, accelerator, progress):
    """On ``error``, end the progress bar's line and close the trackers (tensorboard writes its last events then)
    before the error goes on."""
    try:
        yield
    except error:
        progress.close()
        accelerator.end_training()
        raise


def _due(step: int, every: Optional[int]) -> bool:
    return bool(every) and step % every == 0


@torch.no_grad()
def _validate(accelerator, config, parts, make_pipeline, validation_dataset, samples, step: int) -> None:
    """The loss on the validation split, and the validation images (``samples``), with fixed seeds."""
    unet, text_encoder = accelerator.unwrap_model(parts['unet']), accelerator.unwrap_model(parts['text_encoder'])
    modes = (unet.training, text_encoder.training)
    unet.eval()
    text_encoder.eval()
    rng_state = torch.get_rng_state()
    try:
        # eager even under --torch_compile: the no-grad eval passes and the pipeline's CFG batch would each
        # compile anew (minutes on SD1.5) for a few images
        with torch.compiler.set_stance('force_eager'):
            if validation_dataset is not None:
                loss = validation_loss(accelerator, config, parts, validation_dataset)
                accelerator.log({'validation_loss': loss}, step=step)
                logger.info('step %d: validation loss %.5f', step, loss)
            if samples and make_pipeline is not None:
                pipe = make_pipeline()
                for sample in samples:
                    with accelerator.autocast():
                        images = validation_images.render(pipe, sample, pipeline_clip_skip(config.clip_skip))
                    validation_images.save_and_log(accelerator, os.path.join(config.output_dir, 'validation'),
                                                   sample, images, step)
    finally:
        torch.set_rng_state(rng_state)
        unet.train(modes[0])
        text_encoder.train(modes[1])


def validation_loss(accelerator, config, parts, dataset) -> float:
    loader, _ = make_loader(dataset, config.train_batch_size, config.seed, shuffle=False)
    torch.manual_seed(config.seed)
    total, count = 0.0, 0
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            losses = denoising_loss(parts['unet'], parts['text_encoder'], parts['vae'], parts['noise_scheduler'],
                                    batch, clip_skip=config.clip_skip)
        total += losses.sum().item()
        count += losses.numel()
    return total / max(count, 1)
