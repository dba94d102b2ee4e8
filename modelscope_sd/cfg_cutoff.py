"""diffusers' ``SDCFGCutoffCallback`` (classifier-free guidance off after a step: the UNet then runs the prompt rows
alone, a lossy trade the caller asks for), done by the pipeline itself: in the table loop of ``fast=True``
(`fast.WholeStepDenoiser`), and in diffusers' loop for any batch. diffusers' callback keeps only the last row of the
prompt embeddings, which fails for two or more images; here each image keeps its own prompt."""

from typing import Dict

import torch


def is_cfg_cutoff(callback) -> bool:
    """Whether ``callback`` is diffusers' ``SDCFGCutoffCallback`` itself (a subclass may do more)."""
    from diffusers.callbacks import SDCFGCutoffCallback
    return type(callback) is SDCFGCutoffCallback


def last_guided_call(cutoff, num_model_calls: int) -> int:
    """The index of the last guided UNet call of a pass, as diffusers' callback counts it: its
    ``cutoff_step_index``, or ``cutoff_step_ratio`` of the pass's timesteps (one per UNet call: PNDM's 50 steps are
    51, Heun's twice the steps less one). The callback runs after that call, so guidance is off from the next."""
    index, ratio = cutoff.config.cutoff_step_index, cutoff.config.cutoff_step_ratio
    return index if index is not None else int(num_model_calls * ratio)


def prompt_rows(embeds: torch.Tensor) -> torch.Tensor:
    """The prompt half of guided embeddings (diffusers' layout: the negative rows first): what the unguided calls
    after the cutoff run on."""
    return embeds[embeds.shape[0] // 2:]


def guided_calls(cutoff, num_model_calls: int) -> int:
    """How many of a pass's first UNet calls keep guidance."""
    return min(num_model_calls, last_guided_call(cutoff, num_model_calls) + 1)


class BatchCFGCutoff:
    """``cutoff`` as diffusers' ``callback_on_step_end``: at the last guided call, guidance off and the positive half
    of the embeddings (each image's own prompt) from the next call on. Prompt editing's later switches then encode
    without guidance, as they read the pipeline's ``do_classifier_free_guidance``."""
    tensor_inputs = ['prompt_embeds']

    def __init__(self, cutoff):
        self.cutoff = cutoff

    def __call__(self, pipe, i: int, t, callback_kwargs) -> Dict[str, torch.Tensor]:
        """``callback_kwargs`` back, as diffusers' callbacks return them (``MultiPipelineCallbacks`` hands each
        one's to the next)."""
        if i != last_guided_call(self.cutoff, pipe.num_timesteps) or not pipe.do_classifier_free_guidance:
            return callback_kwargs
        pipe._guidance_scale = 0.0  # diffusers' own switch, read by its loop from the next call on
        embeds = callback_kwargs['prompt_embeds']
        return {**callback_kwargs, 'prompt_embeds': prompt_rows(embeds)}
