"""A run whose trained weights turn NaN or inf (a learning rate far too high, an fp16 overflow) has lost every
step since: it stops with an error that names the last checkpoint with finite weights, and never writes the
broken weights as a checkpoint (which would rotate good ones away), a validation image or the final adapter or
model. diffusers' and kohya's trainers go on to the end and save them."""

import logging
import math
from typing import List, Optional

import torch

from .checkpoint import list_checkpoints
from .config import trains_lora

logger = logging.getLogger(__name__)


class TrainingDiverged(SystemExit):
    """The trained weights hold NaN or inf; exits the program with the message (status 1)."""


def weights_finite(params: List[torch.Tensor]) -> bool:
    """Whether every trained weight is finite: the largest magnitude of all, from a few fused kernels (no
    overflow as a sum of squares could give, and NaN carries through the max). One host sync."""
    if not params:
        return True
    largest = torch.nn.utils.get_total_norm([p.detach() for p in params], norm_type=math.inf)
    return bool(torch.isfinite(largest))


def check_finite(params: List[torch.Tensor], config, step: int, loss: Optional[float] = None) -> None:
    """Raise ``TrainingDiverged`` when the weights are no longer finite at ``step``. A non-finite ``loss`` over
    finite weights is a step fp16's loss scaler skipped (or one input's overflow): said, and training goes on."""
    if weights_finite(params):
        if loss is not None and not math.isfinite(loss):
            logger.warning('step %d: the loss is %s, but the trained weights are finite (under fp16 the loss '
                           'scaler skips such a step). If it stays so, lower --learning_rate or train with '
                           '--mixed_precision bf16.', step, loss)
        return
    raise TrainingDiverged(diverged_message(config, step))


def diverged_message(config, step: int) -> str:
    checkpoints = list_checkpoints(config.output_dir)
    lora = trains_lora(config)
    if checkpoints:
        kept = f'The last checkpoint, {checkpoints[-1]}, holds finite weights; nothing after it was saved.'
        again = (f' To keep its steps, start the new run from its adapter with --network_weights {checkpoints[-1]} '
                 '(in another --output_dir: a resume would restore the learning rate with the optimizer).' if lora
                 else '')
    else:
        kept, again = 'No checkpoint was saved before, and nothing was saved now.', ''
    rates = f'--learning_rate {config.learning_rate:g}' + (
        f' and --text_encoder_lr {config.text_encoder_lr:g}' if config.text_encoder_lr is not None else '')
    scaled = ' (multiplied by --scale_lr)' if config.scale_lr else ''
    return (f'Training diverged: the trained weights hold NaN or inf at step {step}. {kept} Usual causes: a '
            f'learning rate too high for this run ({rates}{scaled}), fp16 overflow (--mixed_precision bf16 has '
            "fp32's range), or an image the VAE encodes to NaN (--cache_latents names such images before the first "
            f'step). Run again with a lower learning rate or bf16.{again}')
