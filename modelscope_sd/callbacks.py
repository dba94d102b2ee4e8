"""diffusers' step-end callback for a pass of the pipeline: the caller's (diffusers' CFG cutoff made to work for a
batch) and prompt editing's switch of embeddings, chained into the one callback diffusers takes."""

from typing import Any, Dict

from . import prompts as prompts_lib
from .cfg_cutoff import BatchCFGCutoff, is_cfg_cutoff


def step_end_arguments(callback, tensor_inputs, changes, num_images_per_prompt) -> Dict[str, Any]:
    """diffusers' step-end callback arguments for the caller's callback and prompt editing's switch of embeddings,
    chained: the caller's runs first and sees what it asked for; at a switch, the next call's embeddings win."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
    callbacks, wanted = [], []
    if is_cfg_cutoff(callback):  # diffusers' own keeps one prompt row, which fails for a batch
        callback = BatchCFGCutoff(callback)
    elif isinstance(callback, MultiPipelineCallbacks) and any(is_cfg_cutoff(c) for c in callback.callbacks):
        callback = MultiPipelineCallbacks([BatchCFGCutoff(c) if is_cfg_cutoff(c) else c for c in callback.callbacks])
    if callback is not None:
        # diffusers reads a PipelineCallback's own list; a plain function gets diffusers' default
        own = isinstance(callback, (PipelineCallback, MultiPipelineCallbacks, BatchCFGCutoff))
        wanted += callback.tensor_inputs if own else list(tensor_inputs or ['latents'])
        callbacks.append(callback)
    if changes:
        switch = prompts_lib.SwitchEmbeddings(changes, num_images_per_prompt)
        wanted += switch.tensor_inputs
        callbacks.append(switch)
    if not callbacks:
        return {}

    def step_end(pipe, step, timestep, callback_kwargs):
        outputs = {}
        for each in callbacks:
            outputs.update(each(pipe, step, timestep, dict(callback_kwargs, **outputs)) or {})
        return outputs

    return {'callback_on_step_end': step_end, 'callback_on_step_end_tensor_inputs': list(dict.fromkeys(wanted))}
