"""Opt-in fast inference on CUDA: fused QKV projections, channels_last, SDPA attention, and torch.compile
with CUDA graphs (the text encoder, the denoising step, the VAE decoder); inductor's caches kept on disk so a
second start reuses the compiled kernels, and with ``precompile`` each compiled function whole (`precompile`), so a
second start does not trace the model either.

Text-to-image and image-to-image run our own loop (`WholeStepDenoiser`): the scheduler becomes a table of
coefficients (`linear_steps`), so one denoising step (latents from the table, CFG batch, UNet, guidance) is
one compiled function, captured as one CUDA graph, with no host sync between steps and one graph for every
scheduler. Inpainting and schedulers without a table keep diffusers' loop over the compiled UNet. The same loop,
eager, runs A1111's AND for the plain path: a step then sums the guidance of several subprompts per image.
"""

import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor

from .cfg_cutoff import guided_calls, prompt_rows
from .images import model_size
from .linear_steps import plan_scheduler
from .precompile import PrecompiledFunction
from .prompts import unet_embeds

logger = logging.getLogger(__name__)

COMPILE_MODES = ('reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs', 'default')
# History slots (model outputs + noise draws) are padded to this many, or the next power of two above: every
# scheduler up to 64 steps (128 model calls or draws) then shares one compiled graph
MIN_HISTORY = 128
_WITHOUT_CUDA_GRAPHS = {'reduce-overhead': 'default', 'max-autotune': 'max-autotune-no-cudagraphs'}
CUDA_GRAPH_MODES = tuple(_WITHOUT_CUDA_GRAPHS)


def mode_for_device(mode: str, device: torch.device, what: str) -> str:
    """torch.compile's ``mode`` for ``device``: off CUDA a mode with CUDA graphs becomes the same mode without them
    (said once in the log, as ``what`` on ``device``)."""
    if torch.device(device).type != 'cuda' and mode in _WITHOUT_CUDA_GRAPHS:
        logger.info('%s on %s: compiling with mode=%r (CUDA graphs need a CUDA device).', what, device,
                    _WITHOUT_CUDA_GRAPHS[mode])
        return _WITHOUT_CUDA_GRAPHS[mode]
    return mode


def _configure_inductor(cache_dir: str) -> str:
    """Inductor's settings and on-disk caches for the fast path; returns the cache folder (``TORCHINDUCTOR_CACHE_DIR``
    where it is set, else ``cache_dir``)."""
    # 1x1 convolutions as matmuls (diffusers' torch.compile guide). Its coordinate-descent kernel tuning is
    # left off: on an H200 it kept the first SD1.5 compile running past 5 minutes.
    import torch._inductor.config as inductor
    inductor.conv_1x1_as_mm = True
    inductor.fx_graph_cache = True
    os.environ.setdefault('TORCHINDUCTOR_CACHE_DIR', cache_dir)
    os.environ.setdefault('TORCHINDUCTOR_FX_GRAPH_CACHE', '1')
    os.environ.setdefault('TORCHINDUCTOR_AUTOGRAD_CACHE', '1')
    return os.environ['TORCHINDUCTOR_CACHE_DIR']


def _owned(value):
    """``value`` with each tensor in it copied: with CUDA graphs a compiled call's outputs live in memory that the
    next replay overwrites. Tuples, lists and the model-output dicts of diffusers and transformers (their fields,
    hidden_states' tuple included) are walked."""
    if torch.is_tensor(value):
        return value.clone()
    if type(value) in (tuple, list):
        return type(value)(_owned(v) for v in value)
    if isinstance(value, dict):  # diffusers' BaseOutput and transformers' ModelOutput set the attribute too
        for key in list(value.keys()):
            value[key] = _owned(value[key])
    return value


def compiler(mode: str, precompile_dir: Optional[str] = None) -> Callable[..., Callable]:
    """``compile(fn, fullgraph=True)``: `torch.compile` with ``mode``, or with ``precompile_dir`` a
    `PrecompiledFunction` kept there whole for later processes."""
    def compile(fn, fullgraph=True):
        if precompile_dir is None:
            return torch.compile(fn, mode=mode, fullgraph=fullgraph)
        return PrecompiledFunction(fn, mode, precompile_dir, fullgraph=fullgraph)
    return compile


def unet_forward(unet, sample, timestep, *args, **kwargs):
    # the class's forward: the instance's is the compiled one
    return type(unet).forward(unet, sample, timestep, *args, **kwargs)


def _compile_keeping_outputs(module: torch.nn.Module, compile: Callable) -> None:
    """Compile the UNet's ``forward`` in place, for diffusers' loop; multistep schedulers (PNDM, DPM++, UniPC) keep
    earlier outputs, so each one is copied out of the CUDA graph's memory (a few hundred KB per step)."""
    compiled = compile(unet_forward)

    def forward(sample, timestep, *args, **kwargs):
        # schedulers hand over int64 (PNDM, DDIM, DPM++) or float32 (Euler, LMS) timesteps; the UNet turns
        # them into float32 anyway, so one dtype means one compiled graph for every scheduler
        if torch.is_tensor(timestep):
            timestep = timestep.to(torch.float32)
        return _owned(compiled(module, sample, timestep, *args, **kwargs))

    module.forward = forward


def text_encoder_forward(text_encoder, *args, **kwargs):
    """CLIP's fields as a plain dict: a compiled function that builds transformers' output class refers to objects
    that torch's precompile cannot save."""
    return dict(type(text_encoder).forward(text_encoder, *args, **kwargs))


def sort_output_capture_registry() -> None:
    """Put transformers' registry of each model class's output-capture settings in key order. CLIP's ``forward``
    reads it, and dynamo guards that dict by key position. Its order is the order in which the classes were first
    built, which diffusers' loading makes depend on Python's hash seed (the safety checker before or after the text
    encoder): a text encoder saved by ``precompile=True`` under one seed then failed to load under another (4 of 13
    pairs of random seeds on our CPU, "Expected dict, got NoneType", torch 2.13 and transformers 5.25). Sorted, the
    order is the same in every process that built the same models. Only reordered when out of order, so a
    steady state changes nothing that a guard reads."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY as registry
    except ImportError:  # transformers without output capturing: nothing to sort
        return
    keys = list(dict.keys(registry))
    if keys != sorted(keys):
        items = sorted(dict.items(registry))
        dict.clear(registry)
        for key, value in items:  # dict's own method: the registry's __setitem__ takes a model, not its key
            dict.__setitem__(registry, key, value)


def compile_text_encoder(text_encoder: torch.nn.Module, compile: Callable) -> None:
    """Compile CLIP's ``forward`` in place. It runs once per prompt and once per negative prompt before the first
    step; eager, each pass is some 200 small kernel launches, and in a profiled 10-step SD1.5 call on an H200
    (2026-11-27) the GPU sat idle for 31 ms of them before its first step. Each set of call arguments
    (``output_hidden_states`` for clip_skip, another batch) compiles once; graph breaks in transformers' code split the
    graph rather than fail the call. The outputs are copied out: the negative prompt's replay reuses the memory."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    compiled = compile(text_encoder_forward, fullgraph=False)

    def forward(*args, **kwargs):
        sort_output_capture_registry()
        # CLIP's optional arguments all default to None: diffusers passes attention_mask=None, weighted prompts pass
        # nothing, and without the Nones both are one call signature, so one graph rather than a compile per caller
        fields = compiled(text_encoder, *args, **{key: value for key, value in kwargs.items() if value is not None})
        return _owned(BaseModelOutputWithPooling(**fields))

    text_encoder.forward = forward


def decoder_forward(decoder, sample, latent_embeds=None):
    return type(decoder).forward(decoder, sample, latent_embeds)


def enable_fast_inference(pipe, compile_mode: str = 'reduce-overhead', cache_dir: str = None,
                          precompile: bool = False):
    """Apply the fast path to a diffusers ``StableDiffusionPipeline``, in place; returns the compiled
    denoiser for text-to-image and image-to-image. Off CUDA the modes that capture CUDA graphs compile without them.
    ``precompile``: keep each compiled function whole in inductor's cache folder (`precompile.PrecompiledFunction`)."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f'compile_mode={compile_mode!r} is not one of {", ".join(COMPILE_MODES)}.')
    compile_mode = mode_for_device(compile_mode, pipe.device, 'fast=True')
    cache_dir = _configure_inductor(cache_dir or os.path.join(os.path.expanduser('~'), '.cache', 'modelscope_sd',
                                                             'inductor'))
    compile = compiler(compile_mode, os.path.join(cache_dir, 'modelscope_sd_precompiled') if precompile else None)
    pipe.fuse_qkv_projections()
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    denoiser = WholeStepDenoiser(pipe, compile)
    _compile_keeping_outputs(pipe.unet, compile)
    compile_text_encoder(pipe.text_encoder, compile)
    decode = compile(decoder_forward)
    pipe.vae.decoder.forward = functools.partial(decode, pipe.vae.decoder)
    logger.info('Fast path on: fused QKV, channels_last, torch.compile(mode=%r) of the text encoder, the whole '
                'denoising step and the VAE decoder%s. The first call per image size and batch compiles (a minute or '
                'more).', compile_mode, ', each kept whole on disk' if precompile else '')
    return denoiser


def denoise_step(unet, x0, history, coefs, scale, timestep, embeds, guidance, rescale, mixing=None):
    """One denoising step: latents from the table, CFG batch, UNet, guidance (and its rescale, when given)
    → the guided model output. ``mixing`` (A1111's AND): (image of each positive row, its weight); the
    prompt's prediction is then the negative one plus the weighted sum of its subprompts' differences."""
    latents = coefs[0] * x0 + torch.tensordot(coefs[1:], history, dims=1)
    model_input = (latents * scale).to(embeds.dtype)
    if mixing is not None:
        model_input = torch.cat([model_input, model_input[mixing[0]]])
    elif guidance is not None:
        model_input = torch.cat([model_input] * 2)
    # the class's forward: with fast=True the instance's forward is a compiled one (for the fallback loop)
    noise_pred = type(unet).forward(unet, model_input, timestep, encoder_hidden_states=embeds, return_dict=False)[0]
    if guidance is not None:
        if mixing is None:
            uncond, text = noise_pred.chunk(2)
        else:
            index, weights = mixing
            uncond, parts = noise_pred[:latents.shape[0]], noise_pred[latents.shape[0]:]
            weighted = (parts - uncond[index]) * weights.to(parts.dtype)[:, None, None, None]
            text = uncond.index_add(0, index, weighted)
        noise_pred = uncond + guidance * (text - uncond)
        if rescale is not None:
            noise_pred = rescale_noise_cfg(noise_pred, text, guidance_rescale=rescale)
    return noise_pred


@dataclass
class DevicePlan:
    """A `LinearPlan` on the device, one ready tensor per step, so the loop does no host work but launches."""
    rows: List[torch.Tensor]  # n + 1 rows of [1 + capacity] float32
    scales: List[torch.Tensor]  # 0-dim float32
    timesteps: List[torch.Tensor]  # 0-dim float32
    noise_dtypes: List[Optional[torch.dtype]]
    capacity: int
    brownian: Optional[List[Tuple[float, float]]] = None  # see `LinearPlan`

    @property
    def num_model_calls(self) -> int:
        return len(self.timesteps)


class WholeStepDenoiser:
    """Text-to-image and image-to-image where each denoising step is one function of fixed-shape tensors.
    ``compile``: `compiler`'s; without it the step runs eagerly (the CPU tests compare it with diffusers' own loops)."""

    MAX_PLANS = 64  # tables are small, but every (scheduler, steps, eta, strength) makes one

    def __init__(self, sd, compile: Optional[Callable] = None):
        self.sd = sd
        self.step = compile(denoise_step) if compile else denoise_step
        self._plans: Dict[Any, Optional[DevicePlan]] = {}

    def plan(self, scheduler, num_inference_steps: int, eta: float, begin_index: int = 0,
             device: Optional[torch.device] = None) -> Optional[DevicePlan]:
        """The scheduler's table on ``device`` (the pipeline's when None; built once per scheduler config, steps,
        eta, start and device), or None."""
        device = self.sd.device if device is None else device
        key = (type(scheduler).__name__, json.dumps(dict(scheduler.config), sort_keys=True, default=str),
               num_inference_steps, eta, begin_index, str(device))
        if key not in self._plans:
            plan = plan_scheduler(scheduler, num_inference_steps, eta, begin_index)
            if plan is None:
                logger.info('%s has no coefficient table (it is not linear in the latents): diffusers\' loop '
                            'runs it over the compiled UNet.', type(scheduler).__name__)
            if len(self._plans) >= self.MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))  # the oldest
            self._plans[key] = None if plan is None else self._to_device(plan, device)
        return self._plans[key]

    def _to_device(self, plan, device) -> DevicePlan:
        used = plan.coefs.shape[1] - 1
        capacity = MIN_HISTORY if used <= MIN_HISTORY else 2 ** math.ceil(math.log2(used))
        coefs = torch.zeros((plan.coefs.shape[0], 1 + capacity), dtype=torch.float32)
        coefs[:, :1 + used] = plan.coefs
        return DevicePlan(rows=list(coefs.to(device).unbind()),
                          scales=list(plan.scales.to(device, torch.float32).unbind()),
                          timesteps=list(plan.timesteps.to(device, torch.float32).unbind()),
                          noise_dtypes=plan.noise_dtypes, capacity=capacity, brownian=plan.brownian)

    def denoise(self, plan: DevicePlan, latents, embeds, guidance_scale: Optional[float], generator, progress_bar,
                guidance_rescale: float = 0.0, changes: Optional[Dict[int, torch.Tensor]] = None, mixing=None,
                brownian_noise: Optional[Callable[[float, float], torch.Tensor]] = None,
                guided: Optional[int] = None):
        """``latents``: the start latents as ``prepare_latents`` gives them. Noise for stochastic schedulers is
        drawn up front, in the order the scheduler would draw it, so seeds give the pictures of the plain path:
        from ``generator``, or for DPM++ SDE from its tree (``brownian_noise``: (sigma, sigma_next) → noise).
        ``changes``: {call: embeddings} from that UNet call on (prompt editing); same shape, so the same graph.
        ``mixing``: A1111's AND (see `_step`). ``guided``: only the first that many UNet calls are guided, the rest
        run the positive half of the embeddings alone (diffusers' ``SDCFGCutoffCallback``; a second graph, once)."""
        n = plan.num_model_calls
        guided = n if guided is None or guidance_scale is None else guided
        # one layout for all callers (the channels_last VAE encoder hands image-to-image latents over in NHWC)
        x0 = latents.to(torch.float32, memory_format=torch.contiguous_format)
        history = torch.zeros((plan.capacity,) + tuple(latents.shape), dtype=torch.float32, device=latents.device)
        for j, dtype in enumerate(plan.noise_dtypes):
            history[n + j] = (brownian_noise(*plan.brownian[j]) if plan.brownian else
                              randn_tensor(latents.shape, generator=generator, device=latents.device,
                                           dtype=dtype or latents.dtype))
        # a fill kernel, not a copy from host memory: nothing in here waits for the GPU
        guidance = (None if guidance_scale is None
                    else torch.full((), guidance_scale, dtype=torch.float32, device=latents.device))
        # None when off: the default step's graph stays as it is, and a rescaled call compiles its own once
        rescale = (None if guidance is None or not guidance_rescale
                   else torch.full((), guidance_rescale, dtype=torch.float32, device=latents.device))
        for i in range(n):
            embeds = changes.get(i, embeds) if changes else embeds
            # after the cutoff the prompt rows alone, unguided
            guiding = (embeds, guidance, rescale, mixing) if i < guided else (prompt_rows(embeds), None, None, None)
            history[i] = self.step(self.sd.unet, x0, history, plan.rows[i], plan.scales[i], plan.timesteps[i], *guiding)
            progress_bar.update()
        final = plan.rows[n]
        return (final[0] * x0 + torch.tensordot(final[1:], history, dims=1)).to(latents.dtype)

    def generate(self, pipe, text_inputs: Dict[str, Any], num_inference_steps: int, guidance_scale: float,
                 num_images_per_prompt: int, eta: float, generator, height: Optional[int] = None,
                 width: Optional[int] = None, latents=None, image=None, strength: Optional[float] = None,
                 guidance_rescale: float = 0.0, output_type: str = 'np',
                 prompt_changes: Optional[Dict[int, Dict[str, Any]]] = None, composition=None, cfg_cutoff=None):
        """Text-to-image (``pipe``: the pipeline) or image-to-image (``pipe``: its img2img twin, ``image`` given)
        through the whole-step loop. Returns images in [0, 1] as diffusers' ``output_type`` gives them ('np':
        N×H×W×3 floats, 'pt': N×3×H×W on the device) and the safety checker's flags (``output_type='latent'``: the
        final latents and None), or None when the scheduler has no table (the
        caller then runs diffusers' loop). ``prompt_changes``: {UNet call: text inputs from that call on};
        ``composition``: A1111's AND (`prompts.Composition`; the prompt embeddings are then the subprompts');
        ``cfg_cutoff``: an ``SDCFGCutoffCallback`` (`cfg_cutoff.is_cfg_cutoff`)."""
        if cfg_cutoff is not None and composition is not None:  # diffusers' loop would fail on it with an IndexError
            raise ValueError("callback_on_step_end=SDCFGCutoffCallback turns classifier-free guidance off, and A1111's "
                             "AND has no prediction without it (it sums each subprompt's guidance): drop the callback "
                             "or the AND.")
        begin = 0
        # once per call: diffusers finds the device by walking every module (4.6 ms for SD1.5 on a 2-core CPU), time
        # in which the GPU has nothing queued
        device = pipe._execution_device
        # this call's timesteps, as diffusers sets them before the start latents: sigma schedulers (Euler, LMS,
        # DPM++ SDE, …) scale the start noise by the largest sigma of the timesteps set last
        pipe.scheduler.set_timesteps(num_inference_steps, device=device)
        if image is not None:  # diffusers' own img2img timesteps: strength skips the first ones
            remaining, _ = pipe.get_timesteps(num_inference_steps, strength, device)
            begin = len(pipe.scheduler.timesteps) - len(remaining)
        plan = self.plan(pipe.scheduler, num_inference_steps, eta, begin, device)
        if plan is None:
            return None
        with torch.inference_mode():
            return self._generate(pipe, device, plan, begin, text_inputs, guidance_scale, num_images_per_prompt,
                                  generator, height, width, latents, image, guidance_rescale, output_type,
                                  prompt_changes, composition, cfg_cutoff)

    def _generate(self, pipe, device, plan, begin, text_inputs, guidance_scale, num_images_per_prompt, generator,
                  height, width, latents, image, guidance_rescale, output_type, prompt_changes, composition,
                  cfg_cutoff):
        """diffusers' steps around `denoise`: encode → start latents → denoise → decode → safety check."""
        cfg = guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
        embeds = unet_embeds(pipe, text_inputs, num_images_per_prompt, cfg, device)
        changes = {call: unet_embeds(pipe, inputs, num_images_per_prompt, cfg, device)
                   for call, inputs in (prompt_changes or {}).items()}
        batch, dtype, mixing = embeds.shape[0] // (2 if cfg else 1), embeds.dtype, None
        if composition is not None:  # negative rows, one per image, then the subprompts'
            if not cfg:
                raise ValueError("A1111's AND sums guidance: it needs guidance_scale > 1.")
            batch = text_inputs['negative_prompt_embeds'].shape[0] * num_images_per_prompt
            mixing = composition.tensors(num_images_per_prompt, device)
        if image is None:
            size = model_size(pipe)
            start = pipe.prepare_latents(batch, pipe.unet.config.in_channels, height or size, width or size, dtype,
                                         device, generator, latents)
        else:  # the image's latents, noised to the first remaining timestep by the scheduler (set in generate)
            first = pipe.scheduler.timesteps[begin:begin + 1].repeat(batch)
            start = pipe.prepare_latents(pipe.image_processor.preprocess(image), first, batch, 1, dtype, device,
                                         generator)
        with pipe.progress_bar(total=plan.num_model_calls) as bar:
            brownian = pipe.scheduler.brownian_noise(start.float()) if plan.brownian else None
            guided = None if cfg_cutoff is None else guided_calls(cfg_cutoff, plan.num_model_calls)
            final = self.denoise(plan, start, embeds, guidance_scale if cfg else None, generator, bar, guidance_rescale,
                                 changes, mixing, brownian, guided)
        if output_type == 'latent':
            return final, None
        decoded = pipe.vae.decode(final / pipe.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        decoded, nsfw = pipe.run_safety_checker(decoded, device, dtype)
        denormalize = [True] * decoded.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        return pipe.image_processor.postprocess(decoded, output_type=output_type, do_denormalize=denormalize), nsfw
