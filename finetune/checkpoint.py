"""Resumable checkpoints that are never half-written: each is saved under a temporary name and renamed
into place (an atomic step) only once complete; the newest K are kept. Before a run, what its checkpoints will
take of the disk."""

import json
import logging
import os
import re
import shutil
from typing import Optional

from modelscope_sd.files import PARTIAL_SUFFIX  # a checkpoint folder or output file until complete and renamed

logger = logging.getLogger(__name__)

STATE_FILE = 'training_state.json'
TEMP_PREFIX = '.partial-'  # temporary folders the final adapter or model is written in first
_CHECKPOINT = re.compile(r'^checkpoint-(\d+)$')


def list_checkpoints(output_dir: str):
    """Complete checkpoints, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def remove_partial_writes(output_dir: str) -> None:
    """Leftovers of a run killed while saving: checkpoints, files and temporary folders that were never
    renamed into place (a full model's can hold gigabytes). Never complete, never resumed from."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.endswith(PARTIAL_SUFFIX) or name.startswith(TEMP_PREFIX):
            logger.warning('Removing %s, left incomplete by an interrupted run.', name)
            path = os.path.join(output_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


def find_checkpoint(output_dir: str, resume_from_checkpoint: Optional[str]) -> Optional[str]:
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == 'latest':
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = resume_from_checkpoint
    if not os.path.isdir(path) and os.path.isdir(os.path.join(output_dir, path)):
        path = os.path.join(output_dir, path)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise FileNotFoundError(f'resume_from_checkpoint={resume_from_checkpoint!r} is not a complete checkpoint '
                                f"(no {STATE_FILE}); use 'latest' or one of {list_checkpoints(output_dir)}.")
    return path


def read_state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, STATE_FILE), encoding='utf-8') as f:
        return json.load(f)


def check_not_past(checkpoint: str, max_steps: int, lora: bool, limit: Optional[str] = None) -> None:
    """A checkpoint past ``max_steps`` would be saved as the result at its own step, the smaller count silently
    dropped: refused, with where the earlier steps' weights are. ``limit``: the flags that set ``max_steps``."""
    step = read_state(checkpoint)['global_step']
    if step > max_steps:
        earlier = [path for path in list_checkpoints(os.path.dirname(checkpoint))
                   if read_state(path)['global_step'] <= max_steps]
        where = ''
        if earlier:
            where = f' The weights of an earlier step are in {earlier[-1]}' + (
                f" (lora_dir='{earlier[-1]}')." if lora else '.')
        raise ValueError(f'resume_from_checkpoint: {checkpoint} is at step {step}, past '
                         f'{limit or f"--max_train_steps {max_steps}"}, '
                         f'so the run has nothing left to do. To go on training, pass a --max_train_steps above '
                         f'{step}.{where}')


def check_resume_settings(checkpoint: str, settings: dict) -> None:
    """Refuse, by flag name, to resume a checkpoint saved with settings that decide what it holds (adapter
    shape, which models train, optimizer state); loading it would fail deep in accelerate or torch."""
    saved = read_state(checkpoint).get('settings')
    if saved is None:  # written before settings were recorded
        return
    held, wanted = saved.get('use_lora', 'rank' in saved), settings['use_lora']  # the LoRA trainer's once lacked it
    if held != wanted:
        what = {True: 'LoRA adapters', False: 'a whole UNet (a DreamBooth full fine-tune)'}
        raise ValueError(f'resume_from_checkpoint: {checkpoint} holds {what[held]}, and this run trains '
                         f'{what[wanted]}: resume it with the trainer and flags that saved it, or start a new run in '
                         'another --output_dir.')
    changed = [f'--{name} {saved[name]!r} there, {value!r} now' for name, value in settings.items()
               if name in saved and saved[name] != value]
    if changed:
        lora = ' (from its adapter: --network_weights ' + checkpoint + ')' if 'rank' in settings else ''
        raise ValueError(f'resume_from_checkpoint: {checkpoint} was saved with other settings: {"; ".join(changed)}. '
                         'These decide what a checkpoint holds: resume with the values it was saved with, or '
                         f'start a new run in another --output_dir{lora}.')


def save_checkpoint(accelerator, output_dir: str, step: int, state: dict, total_limit: Optional[int]) -> str:
    """accelerate's save_state into ``checkpoint-N.partial``, then the state file, then the rename."""
    final = os.path.join(output_dir, f'checkpoint-{step}')
    partial = final + PARTIAL_SUFFIX
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(partial, STATE_FILE), 'w', encoding='utf-8') as f:
            json.dump(state, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def checkpoint_bytes(config, params) -> int:
    """About what a checkpoint holds: the fp32 trained weights and the optimizer's state for them (AdamW two fp32
    moments, 8-bit AdamW two bytes, Adafactor one fp32 row and column of second moments per matrix: for a 3×3
    convolution that is 2/3 of its size)."""
    total = 0
    for p in params:
        if config.optimizer == 'adafactor':
            state = 4 * (p.numel() // p.shape[-1] + p.numel() // p.shape[-2]) if p.dim() >= 2 else 4 * p.numel()
        else:
            state = p.numel() * (2 if config.use_8bit_adam else 8)
        total += p.numel() * p.element_size() + state
    return total


def warn_if_checkpoints_outgrow_the_disk(config, params, max_steps: int, every_epochs: Optional[int]) -> None:
    """A full fine-tune's checkpoint holds the fp32 UNet and its optimizer state (~10 GiB for SD1.5 with AdamW),
    one every --checkpointing_steps: say so before the run fills the disk hours in, not when a save fails."""
    size = checkpoint_bytes(config, params)
    due = [every for every in (config.checkpointing_steps, every_epochs) if every]
    count = sum(max_steps // every for every in due)  # an upper bound: both kinds may fall on one step
    if config.checkpoints_total_limit:
        count = min(count, config.checkpoints_total_limit + 1)  # the newest is written before the oldest goes
    free = shutil.disk_usage(config.output_dir).free
    if count and count * size > free:
        fit = int(free // size) - 1
        advice = (f'pass --checkpoints_total_limit {fit}, a larger --checkpointing_steps, or free space'
                  if fit >= 1 else 'free space, or pass a --checkpointing_steps past --max_train_steps')
        logger.warning('Checkpoints hold about %.1f GiB each (trained weights and optimizer state); the %d this run '
                       'may write need %.1f GiB, but %s has %.1f GiB free: %s.', size / 2**30, count,
                       count * size / 2**30, config.output_dir, free / 2**30, advice)
