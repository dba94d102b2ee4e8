"""A1111's ``AND`` (composable prompts) in diffusers' own denoising loop, for the calls the table loop does not run:
inpainting, a step-end callback, a scheduler object that is not linear.

diffusers hands the UNet its classifier-free-guidance batch, [negative rows; one row per image]. While open,
`ComposedCalls` runs the UNet on [negative rows; one row per subprompt] instead and hands back [negative rows;
negative + Σ weight · (subprompt − negative)] per image, so diffusers' guidance ``uncond + g · (text − uncond)``
is A1111's ``combine_denoised``: the same sum the table loop's step computes.
"""

from typing import Any, Dict, Optional, Tuple

import torch

from .prompts import Composition, unet_embeds


class ComposedCalls:
    """Forward hooks on ``unet``. ``embeds``: the rows of call 0 as `prompts.unet_embeds` lays them out
    (negatives, then each subprompt's copies); ``changes``: {call: embeddings} where an edited subprompt changes;
    ``mixing``: `prompts.Composition.tensors` (the image of each subprompt row, its weight)."""

    def __init__(self, unet, embeds: torch.Tensor, mixing, changes: Optional[Dict[int, torch.Tensor]] = None):
        self.unet, self.embeds, self.changes = unet, embeds, changes or {}
        self.index, self.weights = mixing
        self.calls, self.handles = 0, []

    def __enter__(self):
        self.handles = [self.unet.register_forward_pre_hook(self._inputs, with_kwargs=True),
                        self.unet.register_forward_hook(self._outputs, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _inputs(self, module, args, kwargs):
        """[negatives; per image] → [negatives; per subprompt], with this call's embeddings."""
        args, kwargs = list(args), dict(kwargs)
        sample = args[0] if args else kwargs['sample']
        half = sample.shape[0] // 2  # diffusers' CFG batch repeats each image's input: the first half is all
        rows = torch.cat([sample[:half], sample[:half][self.index]])
        if args:
            args[0] = rows
        else:
            kwargs['sample'] = rows
        timestep = args[1] if len(args) > 1 else kwargs.get('timestep')
        if isinstance(timestep, torch.Tensor) and timestep.ndim and timestep.shape[0] == sample.shape[0]:
            timestep = torch.cat([timestep[:half], timestep[:half][self.index]])
            if len(args) > 1:
                args[1] = timestep
            else:
                kwargs['timestep'] = timestep
        self.embeds = self.changes.get(self.calls, self.embeds)
        embeds = self.embeds.to(sample.device)
        if len(args) > 2:
            args[2] = embeds
        else:
            kwargs['encoder_hidden_states'] = embeds
        return tuple(args), kwargs

    def _outputs(self, module, args, kwargs, output):
        """[negatives; per subprompt] → [negatives; negative + Σ weight · (subprompt − negative)]."""
        self.calls += 1
        prediction = output[0] if isinstance(output, tuple) else output.sample
        images = prediction.shape[0] - self.index.shape[0]
        uncond, parts = prediction[:images], prediction[images:]
        weighted = (parts - uncond[self.index]) * self.weights.to(parts.dtype)[:, None, None, None]
        combined = torch.cat([uncond, uncond.index_add(0, self.index, weighted)])
        if isinstance(output, tuple):
            return (combined, *output[1:])
        output.sample = combined
        return output


def composed_call(pipe, text_inputs: Dict[str, torch.Tensor], changes: Dict[int, Dict[str, torch.Tensor]],
                  composition: Composition, num_images_per_prompt: int) -> Tuple[Dict[str, Any], ComposedCalls]:
    """diffusers' text arguments for an ``AND`` call (one row per image: the negative embeddings stand in) and the
    `ComposedCalls` to open around it, from `prompts.EditedPrompts.text_inputs`' embeddings and changes."""
    def rows(inputs):
        return unet_embeds(pipe, inputs, num_images_per_prompt, cfg=True)

    mixing = composition.tensors(num_images_per_prompt, pipe._execution_device)
    later = {call: rows(inputs) for call, inputs in changes.items()}
    calls = ComposedCalls(pipe.unet, rows(text_inputs), mixing, later)
    negative = text_inputs['negative_prompt_embeds']
    return {'prompt_embeds': negative, 'negative_prompt_embeds': negative}, calls
