"""The ModelScope text-to-image pipeline: ModelScope inputs → one diffusers call → ``output_imgs``."""

import secrets
import threading
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
from modelscope.outputs import OutputKeys
from modelscope.pipelines.base import Pipeline

from PIL import Image

from . import checks
from . import fast as fast_lib
from . import hires
from . import images as images_lib
from . import lora as lora_utils
from . import lora_tags
from . import prompts as prompts_lib
from . import variation
from .callbacks import step_end_arguments
from .cfg_cutoff import is_cfg_cutoff
from .composable import composed_call
from .embeddings import load_embeddings
from .loading import load_pipeline, resolve_device
from .nan_images import check_decodes
from .schedulers import make_scheduler, seeded
from .vae import load_vae

# Every per-call option, with diffusers' names, and its default. 'text' (ModelScope) and 'prompt'
# (diffusers) are the same thing and are mapped in `_gather_options`.
CALL_DEFAULTS: Dict[str, Any] = {
    'prompt': None,
    'negative_prompt': None,
    'num_inference_steps': 50,
    'guidance_scale': 7.5,
    'guidance_rescale': 0.0,  # text-to-image: rescale the guided prediction's std (0.7 suits v-prediction models)
    'height': None,  # None: the model's own size (512 for SD1.5)
    'width': None,
    'num_images_per_prompt': 1,
    'eta': 0.0,
    'seed': None,
    'generator': None,
    'subseed': None,  # A1111's variation seed: image i's start noise turns towards subseed + i's (None: random)
    'subseed_strength': 0.0,  # how far it turns: 0 (off) to 1 (the subseed's noise)
    'latents': None,
    'scheduler': None,  # None: the model's own scheduler (PNDM for SD1.5)
    'clip_skip': None,
    'emphasis': None,  # A1111's Emphasis setting for (word:1.2): None is its default, 'Original'
    'lora_scale': None,  # None: the scales given when the adapters were loaded
    'progress_bar': None,  # None: the pipeline's setting
    'image': None,  # image-to-image / inpainting: a path, a BGR array or a PIL image
    'mask_image': None,  # inpainting: white repaints
    'strength': None,  # None: 0.8 for image-to-image, 1.0 for inpainting, 0.7 for the hires fix's second pass
    'hr_scale': None,  # A1111's hires fix: text-to-image, upscaled by this factor, then image-to-image (None: off)
    'hr_upscaler': None,  # 'latent' (None) or 'lanczos'
    'hr_second_pass_steps': None,  # None: num_inference_steps
    'hr_prompt': None,  # the second pass's prompt (A1111's Hires prompt; None: the prompt)
    'hr_negative_prompt': None,  # the second pass's negative prompt (None: the negative prompt)
    'hr_scheduler': None,  # the second pass's scheduler (A1111's Hires sampler; None: the first pass's)
    'batch_size': None,  # at most this many images per denoising batch (ModelScope's name); None: all at once
    'callback_on_step_end': None,  # diffusers' step-end callback (progress, previews, stopping early)
    'callback_on_step_end_tensor_inputs': None,  # None: ['latents'], or a diffusers PipelineCallback's own
}


def to_bgr_uint8(images: torch.Tensor) -> List[np.ndarray]:
    """diffusers' RGB in [0, 1] (N×3×H×W, any device and float dtype) → OpenCV's uint8 BGR, rounded as diffusers'
    ``numpy_to_pil`` does (its fp32 ``* 255`` and round). Converted where the images are, one at a time: from a GPU
    comes half the bytes of its fp16 images, and the host makes no float passes over them. On a 2-core CPU, fp16
    512² images from diffusers' post-processing take 2.6 instead of 5.8 ms for one, 30 instead of 66 ms for 16."""
    return [image.to(torch.float32, copy=True).mul_(255).round_().to(torch.uint8).flip(0).permute(1, 2, 0)
            .contiguous().cpu().numpy() for image in images]


class StableDiffusionText2ImagePipeline(Pipeline):
    """Stable Diffusion v1.x text-to-image for ModelScope, on current diffusers.

    Args:
        model: ModelScope hub id, diffusers model folder, single-file ``.safetensors`` checkpoint,
            or a diffusers ``DiffusionPipeline``.
        device: 'gpu' (default; without CUDA Apple's GPU where there is one, else the CPU), 'gpu:N', 'cuda:N', 'mps'
            or 'cpu'.
        torch_dtype: default fp16 on CUDA, fp32 on the CPU. ``torch_type`` (ModelScope's name) is an alias.
        model_revision: hub revision when ``model`` is a hub id and this class is built directly.
        config: for single files, the diffusers folder or hub id holding the component configs.
        allow_pickle: allow pickle files (they can run code when loaded): ``.ckpt``/``.bin`` single files,
            LoRA ``.bin`` files of ModelScope's old trainer, ``.pt`` embeddings.
        load_safety_checker: load the model's safety checker when it has one.
        local_files_only: resolve hub ids from the ModelScope cache only, never asking the hub.
        progress_bar: show a tqdm bar over the denoising steps (each call can override it).
        lora_dir: a LoRA adapter (folder or file, diffusers/peft or kohya/A1111 format), or a list of them.
        lora_scale: the adapter weight, or one weight per adapter.
        textual_inversion: embedding file(s) (A1111 or diffusers), each used by writing its file name in a prompt
            (e.g. ``negative_prompt='EasyNegative'``), or {word: path}. diffusers' textual-inversion output (its
            folder or ``learned_embeds`` file) is used by the word stored in it.
        fuse_lora: merge the adapters into the weights once, for speed (scales are then fixed).
        fast: fused QKV, channels_last, and torch.compile of the whole denoising step, captured as CUDA
            graphs on CUDA (adapters are fused). The first call per size and batch compiles; later calls, other
            schedulers and later starts reuse the kernels.
        compile_mode: torch.compile mode for ``fast`` ('reduce-overhead' or 'max-autotune').
        precompile: with ``fast``, keep each compiled function whole on disk (torch's AOT precompile, experimental):
            a later process loads it instead of tracing the model again. Kept in inductor's cache folder
            (``TORCHINDUCTOR_CACHE_DIR``, by default ``~/.cache/modelscope_sd/inductor``).
        vae: a VAE in place of the model's own, as A1111's VAE setting: a single file in the original layout
            (``vae-ft-mse-840000-ema-pruned.safetensors``), a diffusers VAE or model folder, a hub id, or an
            ``AutoencoderKL``.
        use_safetensors: True (as diffusers' and ModelScope's examples pass it) makes a model component without
            ``.safetensors`` weights an error instead of loading its ``.bin`` file; safetensors are used first anyway.
    """

    def __init__(self, model, device: str = 'gpu', torch_dtype=None, torch_type=None,
                 model_revision: Optional[str] = None, config: Optional[str] = None,
                 allow_pickle: bool = False, load_safety_checker: bool = True,
                 local_files_only: bool = False, progress_bar: bool = True,
                 lora_dir=None, lora_scale: Union[float, List[float]] = 1.0, fuse_lora: bool = False,
                 textual_inversion=None, fast: bool = False, compile_mode: str = 'reduce-overhead',
                 precompile: bool = False, trust_remote_code: bool = False, use_safetensors: Optional[bool] = None,
                 vae=None, **kwargs):
        if kwargs:
            raise ValueError(checks.unknown_message('pipeline argument', kwargs, [
                'device', 'torch_dtype', 'model_revision', 'config', 'allow_pickle', 'load_safety_checker',
                'local_files_only', 'progress_bar', 'lora_dir', 'lora_scale', 'fuse_lora', 'textual_inversion',
                'fast', 'compile_mode', 'precompile', 'use_safetensors', 'vae']))
        if torch_type is not None and torch_dtype is not None:
            raise ValueError('Pass torch_dtype or its alias torch_type, not both.')
        checks.check_switches(allow_pickle=allow_pickle, load_safety_checker=load_safety_checker,
                              local_files_only=local_files_only, progress_bar=progress_bar, fuse_lora=fuse_lora,
                              fast=fast, precompile=precompile, trust_remote_code=trust_remote_code)
        checks.check_sources(lora_dir, textual_inversion, vae)
        if lora_dir is None and lora_scale != 1.0:
            raise ValueError(f'lora_scale={lora_scale!r} was given without lora_dir, so no adapter would take it: '
                             'pass the adapter with lora_dir=..., or leave lora_scale out.')
        if fast and compile_mode not in fast_lib.COMPILE_MODES:  # before minutes of loading
            raise ValueError(f'compile_mode={compile_mode!r} is not one of {", ".join(fast_lib.COMPILE_MODES)}.')
        # ModelScope's Pipeline.__init__ would build a ModelScope Model from configuration.json (and import
        # torchvision); the diffusers pipeline is our model, so only the attributes callers read are set.
        self.device_name = device
        self.device = resolve_device(device)
        if precompile and not fast:
            raise ValueError("precompile=True keeps the fast path's compiled functions on disk: pass fast=True with "
                             'it, or leave precompile out.')
        if fast and self.device.type == 'mps':  # before minutes of loading
            raise ValueError("fast=True compiles for CUDA (and runs uncaptured on the CPU); it is not offered on "
                             "Apple's mps: leave fast out there.")
        self.trust_remote_code = trust_remote_code
        self.sd = load_pipeline(
            model, revision=model_revision, torch_dtype=torch_dtype if torch_type is None else torch_type,
            device=self.device, config=config, allow_pickle=allow_pickle,
            load_safety_checker=load_safety_checker, local_files_only=local_files_only, use_safetensors=use_safetensors)
        if vae is not None:  # before anything is built on the model's own (variants, the compiled decoder)
            self.sd.vae = load_vae(vae, self.sd.vae, allow_pickle=allow_pickle, local_files_only=local_files_only)
        check_decodes(self.sd.vae)  # NaN (black) images: an fp16 VAE that overflows decodes in fp32, as in A1111
        self.model = self.sd
        self.models = [self.sd]
        self.has_multiple_models = False
        self.preprocessor = None
        self.framework = 'pytorch'
        self._model_prepare = True
        self.progress_bar = progress_bar
        self.sd.scheduler = self.base_scheduler = make_scheduler(self.sd.scheduler, None)  # DPM++ SDE: seeded
        self._schedulers: Dict[str, Any] = {}
        self._variants: Dict[str, Any] = {}
        fuse_lora = fuse_lora or fast  # compiled kernels take plain weights
        self.adapters = lora_utils.load_adapters(self.sd, lora_dir, lora_scale, fuse=fuse_lora,
                                                 allow_pickle=allow_pickle)
        self.lora_names = lora_utils.a1111_names(lora_dir)  # what <lora:name:weight> tags in prompts call them
        self.lora_scales = lora_utils.check_scales(lora_scale, self.lora_names) if self.lora_names else []
        self.lora_fused = fuse_lora and lora_dir is not None
        self.embeddings = load_embeddings(self.sd, textual_inversion, allow_pickle)  # words to use in prompts
        # prompts of any length are read here in 75-token windows, so transformers' warning that a long one "will
        # result in indexing errors" (diffusers tokenizes the whole prompt to look for textual-inversion words)
        # is wrong for this pipeline: mark it as said
        self.sd.tokenizer.deprecation_warnings['sequence-length-is-longer-than-the-specified-maximum'] = True
        self.denoiser = None  # fast=True: the whole-step compiled text-to-image loop
        self._eager_denoiser = None  # the same loop uncompiled, for A1111's AND without fast=True
        # one call at a time: a call sets the shared scheduler's timesteps and state, the adapter scales, and
        # (fast=True) replays CUDA graphs over static buffers, so calls from a web server's threads would
        # corrupt each other. Throughput comes from batching prompts in one call, not from threads.
        self._call_lock = threading.Lock()
        if fast:
            self.denoiser = fast_lib.enable_fast_inference(self.sd, compile_mode, precompile=precompile)

    # ModelScope callers
    def __call__(self, input: Union[str, List[str], Dict[str, Any], List[Dict[str, Any]]] = None,
                 **kwargs) -> Union[Dict[str, Any], List[Dict[str, Any]]]:
        """``pipe('a cat')``, ``pipe(['a cat', 'a dog'])``, ``pipe({'text': 'a cat', 'seed': 1})`` or
        ``pipe({'text': ...}, num_inference_steps=20)``. A list of dicts gives a list of outputs."""
        if isinstance(input, list) and input and all(isinstance(item, dict) for item in input):
            return [self(item, **kwargs) for item in input]
        options, prompt_scales = lora_tags.call_weights(self._gather_options(input, kwargs), self.lora_names,
                                                        self.lora_scales, self.lora_fused)
        if options['image'] is not None:
            options['image'] = images_lib.load_image(options['image'], 'image')
        if options['mask_image'] is not None:
            options['mask_image'] = images_lib.load_mask(options['mask_image'], 'mask_image')
        self.check_inputs(**options)
        if options['subseed_strength'] and options['subseed'] is None:  # drawn once for the call, as seeds are
            options['subseed'] = secrets.randbelow(2**32)
        with self._call_lock:
            try:
                return self._generate_in_batches(**options, prompt_scales=prompt_scales)
            except torch.OutOfMemoryError as err:
                raise torch.OutOfMemoryError(f'{err}\n\n{self._memory_advice(**options)}') from err

    def _memory_advice(self, prompt, num_images_per_prompt, height, width, batch_size, image, hr_scale, **_) -> str:
        """What to change when a call runs out of GPU memory, in the order that costs least."""
        n_images = (len(prompt) if isinstance(prompt, list) else 1) * num_images_per_prompt
        native = images_lib.model_size(self.sd)
        if image is not None:
            height, width = images_lib.target_size(image, height, width)
        height, width = height or native, width or native
        advice = [f'Out of GPU memory making {n_images} image(s) at {width}x{height}'
                  + (f', then {hr_scale}x that (hires fix).' if hr_scale else '.')]
        if height * width > images_lib.LARGE_AREA * native * native:
            advice.append(f'That is {height * width / native ** 2:.0f} times the {native}x{native} the model was '
                          'trained at: pass a smaller height and width' + (' (the input image is resized to them).'
                                                                           if image is not None else '.'))
        if n_images > 1 and (batch_size or n_images) > 1:
            advice.append(f'Make them a few at a time with batch_size={max(1, (batch_size or n_images) // 2)}: '
                          'the same images, less memory.')
        advice.append('Decode one image at a time with pipe.sd.vae.enable_slicing(), or in tiles with '
                      'pipe.sd.vae.enable_tiling() (large sizes).')
        if self.denoiser is None:
            advice.append('Keep only the running model on the GPU with pipe.sd.enable_model_cpu_offload() '
                          '(slower).')
        return ' '.join(advice)

    @staticmethod
    def _gather_options(input, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """The one place where ModelScope's input (a prompt, a list of prompts or ``{'text': ...}``)
        and keyword arguments become diffusers' argument names."""
        options = dict(input) if isinstance(input, dict) else {} if input is None else {'prompt': input}
        if isinstance(input, dict) and 'text' in options:
            if 'prompt' in options:
                raise ValueError("Give the prompt once: as 'text' (ModelScope) or 'prompt' (diffusers), not both.")
            options['prompt'] = options.pop('text')
        for key, value in kwargs.items():
            key = 'prompt' if key == 'text' else key
            if key in options and key != 'prompt':
                raise ValueError(f'{key!r} is given both in the input dict and as a keyword argument.')
            if key == 'prompt' and options.get('prompt') is not None:
                raise ValueError('The prompt is given both as input and as a keyword argument.')
            options[key] = value
        unknown = {k: v for k, v in options.items() if k not in CALL_DEFAULTS}
        if unknown:
            raise ValueError(checks.unknown_message('option', unknown, ['text'] + list(CALL_DEFAULTS)))
        for key in ('seed', 'subseed'):  # A1111's -1: a random one, drawn as for None (the output names it)
            if checks.is_minus_one(options.get(key)):
                options[key] = None
        return {**CALL_DEFAULTS, **options}

    def check_inputs(self, **options) -> None:
        """Every user-facing option, checked once, with what was given and what is allowed (`checks.check_call`)."""
        checks.check_call(self, **options)

    def _scheduler(self, name, argument: str = 'scheduler'):
        """The call's scheduler option (``argument``: its name, for errors) as a scheduler, built once per name."""
        if name is None:
            return self.base_scheduler
        if not isinstance(name, str):
            return make_scheduler(name, self.base_scheduler.config, argument)
        if name not in self._schedulers:
            self._schedulers[name] = make_scheduler(name, self.base_scheduler.config, argument)
        return self._schedulers[name]

    def _generators(self, seed: Optional[int], count: int):
        """Image i of a call gets seed + i on a CPU generator, so any image can be re-made alone and the
        same seed gives the same picture on every device."""
        if seed is None:
            seed = secrets.randbelow(2**32)
        seeds = [int(seed) + i for i in range(count)]  # int(): numpy integers are valid seeds too
        return [torch.Generator('cpu').manual_seed(s) for s in seeds], seeds

    def _variant(self, kind: str):
        """The image-to-image or inpainting pipeline over the same components (built once)."""
        if kind not in self._variants:
            from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
            cls = StableDiffusionImg2ImgPipeline if kind == 'img2img' else StableDiffusionInpaintPipeline
            # built on our modules as they are: diffusers' from_pipe casts them (0.40+: to fp32 unless told a dtype)
            self._variants[kind] = cls(**self.sd.components,
                                       requires_safety_checker=self.sd.config.requires_safety_checker)
        return self._variants[kind]

    def _pipeline_for(self, image, mask_image, strength, height, width, latents, guidance_rescale, n_images):
        if image is None:  # only text-to-image takes guidance_rescale (checked)
            return self.sd, {'height': height, 'width': width, 'latents': latents, 'guidance_rescale': guidance_rescale}
        if mask_image is None:
            return self._variant('img2img'), {'image': image, 'strength': strength}
        # a copy per image: diffusers' inpainting encodes one image once per batch, drawing from the first image's
        # generator only, so the others would not give what their seeds give alone
        return self._variant('inpaint'), {'image': [image] * n_images, 'mask_image': [mask_image] * n_images,
                                          'strength': strength, 'height': height, 'width': width, 'latents': latents}

    def _generate_in_batches(self, batch_size, prompt_scales=None, **options) -> Dict[str, Any]:
        """At most ``batch_size`` images per denoising batch, in the call's order and with its seeds: each image
        is the one the whole batch would give (within numerical noise; a list mixing prompts of different
        75-token window counts is padded per batch). With ``prompt_scales`` (adapter weights per prompt) a batch
        also holds prompts of one set of weights."""
        prompt, per_prompt = options['prompt'], options['num_images_per_prompt']
        prompts = prompt if isinstance(prompt, list) else [prompt]
        n_images = len(prompts) * per_prompt
        if prompt_scales is None and (batch_size is None or n_images <= batch_size):
            return self._generate(**options)
        generator, latents, seeds = options['generator'], options['latents'], None

        def per_image(name: str, index: range):  # a per-prompt text option's values for these images
            value = options[name]
            return value if not isinstance(value, list) else [value[i // per_prompt] for i in index]

        if generator is None:
            generator, seeds = self._generators(options['seed'], n_images)
        outputs = []
        for index in _image_batches(n_images, batch_size, per_prompt, prompt_scales):
            weights = {} if prompt_scales is None else {'lora_scale': prompt_scales[index.start // per_prompt]}
            subseed = None if options['subseed'] is None else options['subseed'] + index.start
            outputs.append(self._generate(**dict(
                options, prompt=[prompts[i // per_prompt] for i in index], num_images_per_prompt=1, seed=None,
                subseed=subseed,
                negative_prompt=per_image('negative_prompt', index), hr_prompt=per_image('hr_prompt', index),
                hr_negative_prompt=per_image('hr_negative_prompt', index),
                generator=[generator[i] for i in index] if isinstance(generator, list) else generator,
                latents=None if latents is None else latents[index.start:index.stop], **weights)))
        merged = {key: [item for out in outputs for item in out[key]] for key in outputs[0] if key != 'seeds'}
        return {**merged, 'seeds': seeds} if seeds is not None else merged

    @torch.inference_mode()
    def _generate(self, prompt, negative_prompt, num_inference_steps, guidance_scale, guidance_rescale, height,
                  width, num_images_per_prompt, eta, seed, generator, latents, scheduler, clip_skip, emphasis,
                  lora_scale, progress_bar, image, mask_image, strength, hr_scale, hr_upscaler, hr_second_pass_steps,
                  hr_prompt, hr_negative_prompt, hr_scheduler, callback_on_step_end, callback_on_step_end_tensor_inputs,
                  subseed, subseed_strength) -> Dict[str, Any]:
        # 1. batch and randomness; the hires fix's second pass draws from the generators as they are now
        n_images = (len(prompt) if isinstance(prompt, list) else 1) * num_images_per_prompt
        seeds = None
        if generator is None:
            generator, seeds = self._generators(seed, n_images)
        restart = _copies(generator) if hr_scale is not None else None
        # A1111's variation seeds: text-to-image's start latents, drawn here from the generators; image-to-image
        # (and the hires fix's second pass) turns the noise diffusers adds to the image
        subseeds = [int(subseed) + i for i in range(n_images)] if subseed_strength else None
        if subseeds and image is None:
            latents = variation.start_latents(self.sd, height, width, generator, subseeds, subseed_strength)
        # 2. input image at the output size; strength 0 means no denoising at all: the image as it is
        if image is not None:
            height, width = images_lib.target_size(image, height, width)
            image = image.resize((width, height), Image.LANCZOS) if image.size != (width, height) else image
            if mask_image is not None and mask_image.size != (width, height):
                mask_image = mask_image.resize((width, height), Image.BILINEAR)
            strength = strength if strength is not None else (0.8 if mask_image is None else 1.0)
            if strength == 0:
                unchanged = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
                return self._output(unchanged.expand(n_images, -1, -1, -1), seeds, None, subseeds)
        if latents is not None:  # diffusers moves latents to the device but keeps their dtype: fp32 into fp16 fails
            latents = latents.to(self.sd.device, self.sd.unet.dtype)
        pipe, extra = self._pipeline_for(image, mask_image, strength, height, width, latents, guidance_rescale,
                                         n_images)
        # 3. scheduler, progress bar and adapter weights for this call; the pipeline's own are back afterwards, so
        # pipe.sd stays as it was built
        pipe.scheduler = seeded(self._scheduler(scheduler), generator, n_images)
        quiet = not (self.progress_bar if progress_bar is None else progress_bar)
        pipe.set_progress_bar_config(disable=quiet)
        if lora_scale is not None:
            lora_utils.set_scales(self.sd, self.adapters, lora_scale)
        try:
            if image is not None:
                checks.check_runs_a_step(pipe, num_inference_steps, strength, 'num_inference_steps')
            # 4. long or weighted prompts become embeddings here (edited ones per pass, once its steps are known);
            # the fast path or diffusers does the denoising
            emphasis = prompts_lib.emphasis_name(emphasis or 'Original')
            def encoded(prompt, negative_prompt):
                return (prompts_lib.edited_prompts(prompt, negative_prompt, clip_skip, emphasis)
                        or prompts_lib.text_inputs(self.sd, prompt, negative_prompt, clip_skip, emphasis))

            text_inputs = encoded(prompt, negative_prompt)
            # the fast loop has no step-end callback but diffusers' CFG cutoff, which it does itself: with another,
            # diffusers' loop runs (over the compiled UNet)
            passes = dict(text_inputs=text_inputs, guidance_scale=guidance_scale, eta=eta, generator=generator,
                          num_images_per_prompt=num_images_per_prompt,
                          fast=mask_image is None and (callback_on_step_end is None
                                                       or is_cfg_cutoff(callback_on_step_end)),
                          step_end=(callback_on_step_end, callback_on_step_end_tensor_inputs))
            turn = (subseeds, subseed_strength) if subseeds else None
            if hr_scale is not None:
                second_text = (text_inputs if hr_prompt is None and hr_negative_prompt is None else encoded(
                    _second_pass(hr_prompt, prompt), _second_pass(hr_negative_prompt, negative_prompt)))
                second = self._variant('img2img')
                second.scheduler = (pipe.scheduler if hr_scheduler is None
                                    else seeded(self._scheduler(hr_scheduler), generator, n_images))
                images, nsfw = self._hires_fix(pipe, second, extra, num_inference_steps, passes, strength, hr_scale,
                                               hr_upscaler, hr_second_pass_steps, quiet, restart, turn, second_text)
            else:
                with _turning(pipe.scheduler, turn if image is not None else None):
                    images, nsfw = self._denoise(pipe, extra, num_inference_steps, **passes)
        finally:
            for used in (self.sd, *self._variants.values()):
                used.scheduler = self.base_scheduler
            if lora_scale is not None:
                lora_utils.set_scales(self.sd, self.adapters, self.lora_scales)
        if mask_image is not None:
            images = images_lib.overlay(images, image, mask_image)
        return self._output(images, seeds, nsfw, subseeds)

    def _hires_fix(self, pipe, second, extra, num_inference_steps, passes, strength, hr_scale, hr_upscaler,
                   hr_second_pass_steps, quiet, restart, turn, second_text):
        """A1111's hires fix: a first pass at the base size, its latents upscaled, then image-to-image (``second``,
        with the second pass's scheduler) at the larger size with ``second_text`` (the hires prompts' text inputs),
        drawing its noise from the seeds again as A1111's second pass does (``restart``: the generators as they were
        before the first pass drew from them), turned towards the subseeds' noise by a variation (``turn``: subseeds
        and strength, or None) as in the first pass."""
        second_steps = hr_second_pass_steps or num_inference_steps
        strength = hires.DEFAULT_STRENGTH if strength is None else strength
        checks.check_runs_a_step(second, second_steps, strength,
                                 'num_inference_steps' if hr_second_pass_steps is None else 'hr_second_pass_steps')
        # an edited prompt's steps in the second pass count on from the first pass's
        edited = isinstance(second_text, prompts_lib.EditedPrompts)
        first_pass_calls = prompts_lib.model_calls(pipe, num_inference_steps) if edited else None
        latents, _ = self._denoise(pipe, extra, num_inference_steps, **passes, output_type='latent')
        factor = self.sd.vae_scale_factor  # the first pass's size, however it was set (height/width or latents)
        target = hires.target_size(latents.shape[-2] * factor, latents.shape[-1] * factor, hr_scale)
        second.set_progress_bar_config(disable=quiet)
        extra = {'image': hires.upscale(self.sd, latents, target, hires.normalize_upscaler(hr_upscaler)),
                 'strength': strength}
        with _turning(second.scheduler, turn):
            return self._denoise(second, extra, second_steps, **dict(passes, generator=restart, text_inputs=second_text),
                                 first_pass_calls=first_pass_calls)

    def _denoise(self, pipe, extra, num_inference_steps, text_inputs, guidance_scale, num_images_per_prompt, eta,
                 generator, fast, step_end, output_type='pt', first_pass_calls=None):
        """One denoising pass: the fast whole-step loop where it applies, diffusers' loop otherwise. Returns the
        images (N, 3, H, W) in [0, 1] on the device, or latents with ``output_type='latent'``, and the safety
        checker's flags.
        Edited or AND-split prompts are encoded here, per UNet call of this pass (``first_pass_calls``: the hires
        fix's second)."""
        changes, composition = {}, None
        if isinstance(text_inputs, prompts_lib.EditedPrompts):
            composition = text_inputs.composition
            calls = prompts_lib.model_calls(pipe, num_inference_steps, extra.get('strength'))
            text_inputs, changes = text_inputs.text_inputs(self.sd, calls, first_pass_calls)
        # A1111's AND sums several predictions per image: in the table loop where it runs the call (eager without
        # fast=True), else in diffusers' loop with the UNet's calls composed
        denoiser = (self._table_loop() if composition is not None else self.denoiser) if fast else None
        if denoiser is not None:
            made = denoiser.generate(pipe, text_inputs, num_inference_steps, guidance_scale, num_images_per_prompt,
                                     eta, generator, output_type=output_type, prompt_changes=changes,
                                     composition=composition, cfg_cutoff=step_end[0], **extra)
            if made is not None:
                return made
        composed = nullcontext()
        if composition is not None:  # diffusers' batch: one row per image; the composed calls add the subprompts'
            text_inputs, composed = composed_call(pipe, text_inputs, changes, composition, num_images_per_prompt)
            changes = {}
        with composed:
            result = pipe(**text_inputs, **extra, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt, eta=eta,
                          generator=generator, output_type=output_type,
                          **step_end_arguments(*step_end, changes, num_images_per_prompt))
        return result.images, result.nsfw_content_detected

    def _table_loop(self):
        """The fast path's denoiser, or the same loop run eagerly (built once) for calls only it can run."""
        if self.denoiser is None and self._eager_denoiser is None:
            self._eager_denoiser = fast_lib.WholeStepDenoiser(self.sd)
        return self.denoiser or self._eager_denoiser

    @staticmethod
    def _output(images: torch.Tensor, seeds, nsfw, subseeds=None) -> Dict[str, Any]:
        """OpenCV-ready images plus what re-makes them."""
        output = {OutputKeys.OUTPUT_IMGS: to_bgr_uint8(images)}
        if seeds is not None:
            output['seeds'] = seeds
        if subseeds is not None:
            output['subseeds'] = subseeds
        if nsfw is not None:
            output['nsfw_content_detected'] = list(nsfw)
        return output


def _second_pass(value, first):
    """A hires-fix text option (hr_prompt, hr_negative_prompt) in the shape of the first pass's, one str per
    prompt of a list; None: the first pass's."""
    if value is None:
        return first
    return [value] * len(first) if isinstance(first, list) and isinstance(value, str) else value


def _image_batches(n_images: int, batch_size: Optional[int], per_prompt: int, prompt_scales):
    """Consecutive ranges of image indices (prompt-major, as diffusers orders images): at most ``batch_size``
    images each, and with ``prompt_scales`` only prompts of one set of adapter weights."""
    start = 0
    while start < n_images:
        end = min(start + (batch_size or n_images), n_images)
        if prompt_scales is not None:
            weights = prompt_scales[start // per_prompt]
            end = next((i for i in range(start, end) if prompt_scales[i // per_prompt] != weights), end)
        yield range(start, end)
        start = end


def _turning(scheduler, turn):
    """A variation's turn of the noise ``scheduler`` adds to image latents (``turn``: subseeds and strength), or
    nothing for None."""
    return nullcontext() if turn is None else variation.turning_added_noise(scheduler, *turn)


def _copies(generator):
    """New generators in the state ``generator`` (one or a list) is in now."""
    def copy(g):
        new = torch.Generator(g.device)
        new.set_state(g.get_state())
        return new
    return [copy(g) for g in generator] if isinstance(generator, list) else copy(generator)
