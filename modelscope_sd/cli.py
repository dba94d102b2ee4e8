"""``modelscope-sd``: generate images, train, convert adapters.

    modelscope-sd generate --prompt '飞流直下三千尺,油画' --num_images 2 --seed 42 --output_dir outputs
    modelscope-sd generate --from_png outputs/42.png            # re-create an image from its metadata
    modelscope-sd generate --prompt_file prompts.txt --batch_size 4   # one prompt per line (kohya's options too)
    modelscope-sd train-lora --dataset_name ./my-images --output_dir my-lora --max_train_steps 1000
    modelscope-sd train-dreambooth --instance_data_dir ./dog --instance_prompt 'a photo of sks dog'
    modelscope-sd convert-lora my-lora/pytorch_lora_weights.safetensors my-lora-kohya.safetensors
    modelscope-sd convert-model sd-dreambooth sd-dreambooth.safetensors   # one file for A1111/ComfyUI
    modelscope-sd convert-model civitai-model.safetensors civitai-model    # a folder the trainers start from
"""

import argparse
import logging
import os
import secrets
import shutil
import sys
from typing import List, Optional

from .constants import DEFAULT_MODEL_ID, DEFAULT_MODEL_REVISION

logger = logging.getLogger(__name__)


def _lora(value: str):
    """PATH or PATH=SCALE."""
    path, _, scale = value.rpartition('=') if '=' in value else (value, '', '1.0')
    try:
        return path, float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f'--lora {value!r}: expected PATH or PATH=SCALE, e.g. my-lora=0.8')


def _generate_parser(sub):
    parser = sub.add_parser('generate', help='text-to-image, image-to-image or inpainting; PNGs with metadata',
                            description='Writes one PNG per image, named by its seed, with the settings that '
                                        're-create it in a "parameters" text chunk (A1111 format).')
    parser.add_argument('--prompt', help='the prompt (required unless --prompt_file or --from_png)')
    parser.add_argument('--prompt_file', help="a text file with one prompt per line (blank and '#' lines "
                                              'skipped); each gets --num_images images, seeds counting on from '
                                              "--seed. A line may carry kohya's sample options (--n NEGATIVE --w "
                                              'WIDTH --h HEIGHT --d SEED --l CFG --s STEPS --ss SAMPLER), which '
                                              "override the flags for it; kohya's .json/.toml sample files work too")
    parser.add_argument('--negative_prompt')
    parser.add_argument('--model', default=None, help=f'hub id, diffusers folder or .safetensors file '
                                                      f'(default {DEFAULT_MODEL_ID})')
    parser.add_argument('--model_revision', default=None, help=f'hub revision (default {DEFAULT_MODEL_REVISION})')
    parser.add_argument('--num_inference_steps', type=int, default=None, help='default 50')
    parser.add_argument('--guidance_scale', type=float, default=None, help='default 7.5')
    parser.add_argument('--guidance_rescale', type=float, default=None,
                        help='text-to-image: 0 (off, default) to 1; 0.7 suits v-prediction models')
    parser.add_argument('--height', type=int)
    parser.add_argument('--width', type=int)
    parser.add_argument('--seed', type=int, help='image i gets seed + i (default, or -1 as in A1111: random)')
    parser.add_argument('--subseed', type=int, help="A1111's variation seed: image i's start noise turns towards "
                                                    'subseed + i\'s (default: random, with --subseed_strength)')
    parser.add_argument('--subseed_strength', type=float, help='how far: 0 (off, default) to 1')
    parser.add_argument('--scheduler', help="e.g. ddim, euler_a, 'dpm++_2m_karras' (default: the model's)")
    parser.add_argument('--num_images', type=int, default=None, help='images per prompt (default 1)')
    parser.add_argument('--batch_size', type=int, help='images per denoising batch, each written as soon as it is '
                                                       'made (default: all at once)')
    parser.add_argument('--clip_skip', type=int)
    parser.add_argument('--emphasis', help="A1111's Emphasis setting for (word:1.2): 'Original' (default), 'No norm', "
                                           "'Ignore' or 'None'")
    parser.add_argument('--vae', help="a VAE in place of the model's: a file such as "
                                      'vae-ft-mse-840000-ema-pruned.safetensors, a diffusers folder or a hub id')
    parser.add_argument('--lora', type=_lora, action='append', default=[], metavar='PATH[=SCALE]',
                        help='LoRA adapter (diffusers or kohya), repeatable')
    parser.add_argument('--textual_inversion', action='append', default=[], metavar='PATH',
                        help='embedding file (A1111 or diffusers), used by writing its file name in the prompt or '
                             "negative prompt; or diffusers' textual-inversion output folder, used by its trained "
                             'word; repeatable')
    parser.add_argument('--image', help='start image (image-to-image)')
    parser.add_argument('--mask_image', help='mask (inpainting; white repaints)')
    parser.add_argument('--strength', type=float, help='image-to-image (default 0.8), inpainting (1.0), or the hires '
                                                       "fix's second pass (0.7)")
    parser.add_argument('--hr_scale', type=float, help="A1111's hires fix: upscale by this (e.g. 2), then "
                                                       'image-to-image at the larger size')
    parser.add_argument('--hr_upscaler', help="hires fix: 'latent' (default), A1111's other latent upscalers "
                                              "('latent (nearest-exact)', ...), 'lanczos' or 'nearest'")
    parser.add_argument('--hr_second_pass_steps', type=int, help='hires fix: steps of the second pass '
                                                                 '(default --num_inference_steps)')
    parser.add_argument('--hr_prompt', help="hires fix: the second pass's prompt (A1111's Hires prompt; default "
                                            '--prompt)')
    parser.add_argument('--hr_negative_prompt', help="hires fix: the second pass's negative prompt (default "
                                                     '--negative_prompt)')
    parser.add_argument('--hr_scheduler', help="hires fix: the second pass's scheduler (A1111's Hires sampler; "
                                               'default --scheduler)')
    parser.add_argument('--from_png', help='take every setting from a PNG written here, or from an A1111 PNG, JPEG '
                                           'or WEBP')
    parser.add_argument('--device', default='gpu')
    parser.add_argument('--fast', action='store_true', help='compiled fast path (CUDA graphs on CUDA); the first image compiles')
    parser.add_argument('--precompile', action='store_true',
                        help='with --fast: keep the compiled functions whole on disk, so the next run loads them '
                             'instead of tracing the model again')
    parser.add_argument('--local_files_only', action='store_true', help='never ask the hub; use the cache')
    parser.add_argument('--output_dir', default='outputs')


def generate(args) -> List[str]:
    from . import metadata
    from .loading import is_hub_id
    from .pipeline import StableDiffusionText2ImagePipeline
    from .prompt_file import read_prompt_file

    call, model, loras, embeddings = {}, args.model, list(args.lora), list(args.textual_inversion)
    vae = args.vae
    if args.from_png:
        saved = metadata.read_png(args.from_png)
        call, model = saved['call'], model or saved['model']
        loras = loras or list(zip(saved['lora_dir'], saved['lora_scale']))
        embeddings = embeddings or saved['textual_inversion']
        not_applied = list(saved['not_applied'])
        if vae is None and saved['vae'] is not None:
            if os.path.exists(saved['vae']) or is_hub_id(saved['vae']):
                vae = saved['vae']
            else:  # A1111 names the file only
                not_applied.append(f"VAE {saved['vae']} (not found here: pass --vae PATH)")
        if not_applied:
            logger.warning('%s: these settings are not applied, so the image will differ: %s.', args.from_png,
                           ', '.join(not_applied))
    elif not (args.prompt or args.prompt_file):
        raise SystemExit('modelscope-sd generate: --prompt is required (or --prompt_file FILE, or --from_png FILE).')
    if args.prompt and args.prompt_file:
        raise ValueError('Pass --prompt or --prompt_file, not both.')
    lines = read_prompt_file(args.prompt_file, '--prompt_file') if args.prompt_file else None
    overrides = {'text': [line['prompt'] for line in lines] if lines else args.prompt,
                 'negative_prompt': args.negative_prompt,
                 'num_inference_steps': args.num_inference_steps, 'guidance_scale': args.guidance_scale,
                 'guidance_rescale': args.guidance_rescale,
                 'height': args.height, 'width': args.width, 'seed': _seed(args.seed), 'scheduler': args.scheduler,
                 'subseed': _seed(args.subseed), 'subseed_strength': args.subseed_strength,
                 'num_images_per_prompt': args.num_images, 'clip_skip': args.clip_skip, 'emphasis': args.emphasis,
                 'image': args.image,
                 'mask_image': args.mask_image, 'strength': args.strength, 'hr_scale': args.hr_scale,
                 'hr_upscaler': args.hr_upscaler, 'hr_second_pass_steps': args.hr_second_pass_steps,
                 'hr_prompt': args.hr_prompt, 'hr_negative_prompt': args.hr_negative_prompt,
                 'hr_scheduler': args.hr_scheduler}
    call.update({k: v for k, v in overrides.items() if v is not None})
    if args.precompile and not args.fast:
        raise ValueError("--precompile keeps --fast's compiled functions on disk: add --fast.")
    if args.batch_size is not None and args.batch_size < 1:  # before minutes of loading
        raise ValueError(f'--batch_size {args.batch_size}: must be >= 1 (or left out: all images at once).')
    if args.num_images is not None and args.num_images < 1:  # the pipeline would name num_images_per_prompt
        raise ValueError(f'--num_images {args.num_images}: must be >= 1.')
    calls = _line_calls(call, lines) if lines and any(len(line) > 1 for line in lines) else [call]
    _check_before_loading(calls)
    try:  # before minutes of loading too
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as err:
        raise ValueError(f'--output_dir {args.output_dir!r} cannot be made: {err.strerror}.') from err
    model = model or DEFAULT_MODEL_ID
    revision = args.model_revision or (DEFAULT_MODEL_REVISION if model == DEFAULT_MODEL_ID else None)
    pipe = StableDiffusionText2ImagePipeline(
        model, model_revision=revision, device=args.device, local_files_only=args.local_files_only,
        lora_dir=[path for path, _ in loras] or None, lora_scale=[scale for _, scale in loras] or 1.0,
        textual_inversion=embeddings or None, fast=args.fast, precompile=args.precompile, vae=vae)
    paths = []
    for one_call in calls:
        for part in _batches(one_call, args.batch_size):
            output = pipe(part)
            texts = metadata.describe_outputs(pipe, part, output, model, loras, embeddings, vae)
            for i, (image, text) in enumerate(zip(output['output_imgs'], texts)):
                name = f"{output['seeds'][i]}.png" if output.get('seeds') else f'{len(paths)}.png'
                paths.append(metadata.save_png(os.path.join(args.output_dir, name), image, text))
                print(paths[-1])
    return paths


def _check_before_loading(calls: List[dict]) -> None:
    """The pipeline's own checks of each call, all those that need no model, before the minutes of loading (or
    downloading) one that the call would otherwise wait for. Image files are read here once: each call takes
    them read."""
    from . import images as images_lib
    from .checks import check_call
    from .pipeline import CALL_DEFAULTS
    for one_call in calls:
        for name, load in (('image', images_lib.load_image), ('mask_image', images_lib.load_mask)):
            if isinstance(one_call.get(name), str):
                one_call[name] = load(one_call[name], name)
        options = {**CALL_DEFAULTS, **one_call}
        if 'text' in options:  # ModelScope's name for the prompt
            options['prompt'] = options.pop('text')
        check_call(None, **options)


def _line_calls(call: dict, lines: List[dict]) -> List[dict]:
    """A prompt file whose lines carry options: one call per line, its options over the flags', its seed its own
    --d or the one it has in the file's order (--seed + line × --num_images, as a file without options gives)."""
    per_prompt = call.get('num_images_per_prompt', 1)
    base = call['seed'] if call.get('seed') is not None else secrets.randbelow(2**32)
    calls = []
    for index, line in enumerate(lines):
        options = {k: v for k, v in line.items() if k != 'prompt'}
        calls.append({**call, 'text': line['prompt'], 'seed': base + index * per_prompt, **options})
    return calls


def _batches(call: dict, batch_size: Optional[int]):
    """The call as calls of at most ``batch_size`` images (image i: prompt i // num_images, seed + i, subseed + i):
    the images are those of one call, and a stop keeps the batches already written."""
    prompts = call['text'] if isinstance(call['text'], list) else [call['text']]
    per_prompt = call.get('num_images_per_prompt', 1)
    n_images = len(prompts) * per_prompt
    if batch_size is None or batch_size >= n_images:
        yield call
        return
    seed = call['seed'] if call.get('seed') is not None else secrets.randbelow(2**32)
    subseed = call.get('subseed')
    if call.get('subseed_strength') and subseed is None:
        subseed = secrets.randbelow(2**32)
    for start in range(0, n_images, batch_size):
        index = range(start, min(start + batch_size, n_images))
        part = dict(call, text=[prompts[i // per_prompt] for i in index], seed=seed + start, num_images_per_prompt=1)
        yield part if subseed is None else dict(part, subseed=subseed + start)


def _convert(args) -> str:
    """convert-lora: any adapter the pipeline loads as LoRA (a file, a training output_dir, a hub id) → a new
    .safetensors file in the other format."""
    from finetune.models import export_kohya_lora, import_kohya_lora

    from .constants import PICKLE_SUFFIXES
    from .loading import check_safetensors
    from .lora import locate_adapter
    if not args.output.endswith('.safetensors'):
        raise ValueError(f'{args.output!r}: adapters are written as .safetensors; name it *.safetensors.')
    if os.path.exists(args.output):
        raise ValueError(f'{args.output!r} exists: name a new file (convert-lora replaces nothing).')
    # refuses models, embeddings and pickles by name
    folder, name = locate_adapter(args.input, args.allow_pickle, argument='input')
    source = os.path.join(folder, name)
    if not name.endswith(PICKLE_SUFFIXES):
        _check_finite_file(source, args.input)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    if args.to == 'diffusers':
        return import_kohya_lora(source, args.output, args.allow_pickle)
    if not name.endswith(PICKLE_SUFFIXES) and any('.lora_A.' in k for k in check_safetensors(source)):
        return export_kohya_lora(source, args.output)  # our (peft-key) files: their keys and trained alpha as they are
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:  # kohya keys, diffusers' older ones, the old trainer's .bin
        ours = import_kohya_lora(source, os.path.join(tmp, 'adapter.safetensors'), allow_pickle=args.allow_pickle)
        return export_kohya_lora(ours, args.output)


def _check_finite_file(path: str, given: str) -> None:
    """A diverged training's adapter (NaN or inf) converted would be as broken in A1111 as it is here."""
    from safetensors import safe_open

    from .lora import nonfinite
    with safe_open(path, framework='pt') as f:
        broken = nonfinite((key, f.get_tensor(key)) for key in f.keys())
    if broken:
        raise ValueError(f'{given!r} holds NaN or inf in {len(broken)} weight(s) (e.g. {broken[0]}): the training '
                         'that wrote it diverged, and the converted file would make black images too. Convert an '
                         'earlier checkpoint of that training.')


def _convert_model(args) -> str:
    import torch

    from .loading import load_pipeline
    from .single_file import check_output_path, save_single_file
    dtype = torch.float32 if args.fp32 else torch.float16
    if os.path.isfile(args.model):
        return _single_file_to_folder(args, dtype)
    check_output_path(args.output)  # before minutes of loading
    if os.path.exists(args.output):
        raise ValueError(f'{args.output!r} exists: name a new file (convert-model replaces nothing).')
    pipe = load_pipeline(args.model, revision=args.model_revision, device='cpu', torch_dtype=torch.float32,
                         load_safety_checker=False)
    return save_single_file(pipe, args.output, dtype, metadata={'modelscope_sd.source': args.model})


def _single_file_to_folder(args, dtype) -> str:
    """A single-file checkpoint → a diffusers folder with configuration.json, written under the partial-write
    suffix the other writers use and renamed when complete."""
    from .files import PARTIAL_SUFFIX
    from .loading import load_pipeline, write_configuration
    if os.path.exists(args.output):
        raise ValueError(f'{args.output!r} exists: the diffusers folder is written to a new path.')
    pipe = load_pipeline(args.model, device='cpu', torch_dtype=dtype, config=args.config,
                         allow_pickle=args.allow_pickle, load_safety_checker=False)
    partial = args.output + PARTIAL_SUFFIX
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial)
    write_configuration(partial)
    os.replace(partial, args.output)
    return args.output


def console() -> int:
    """The ``modelscope-sd`` command. ``main`` returns what a command made (image paths, the adapter path) for
    Python callers; a console script's return value is its exit status, where anything but an int is an error."""
    main()
    return 0


def main(argv: Optional[List[str]] = None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog='modelscope-sd', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    _generate_parser(sub)
    sub.add_parser('train-lora', add_help=False, help='LoRA training (finetune/train_lora.py; --help lists flags)')
    sub.add_parser('train-dreambooth', add_help=False,
                   help='DreamBooth training (finetune/train_dreambooth.py; --help lists flags)')
    convert = sub.add_parser('convert-lora', help='adapter file: diffusers/peft ↔ kohya/A1111')
    convert.add_argument('input')
    convert.add_argument('output')
    convert.add_argument('--to', choices=('kohya', 'diffusers'), default='kohya')
    convert.add_argument('--allow_pickle', action='store_true',
                         help="read a .bin (pickle) adapter, such as ModelScope's old trainer's "
                              'pytorch_lora_weights.bin; only for a file you trust')
    model = sub.add_parser('convert-model', help='diffusers model (folder or hub id) → one original-layout '
                                                 '.safetensors checkpoint for A1111/ComfyUI, or such a checkpoint '
                                                 '→ a diffusers folder (what the trainers start from)')
    model.add_argument('model', help='diffusers folder (e.g. a DreamBooth output_dir), ModelScope id, or a '
                                     'single-file checkpoint')
    model.add_argument('output', help='the .safetensors file to write, or for a single-file model the folder')
    model.add_argument('--model_revision', default=None)
    model.add_argument('--fp32', action='store_true', help='keep fp32 weights (default fp16: half the size)')
    model.add_argument('--config', help="single-file model: diffusers folder or hub id with the component configs "
                                        "(default: AI-ModelScope/stable-diffusion-v1-5's)")
    model.add_argument('--allow_pickle', action='store_true', help='single-file model: read a .ckpt (pickle) file')
    if argv[:1] in (['train-lora'], ['train-dreambooth']):
        return _train(argv[0], argv[1:])  # the trainers own their flags (and --help)
    args = parser.parse_args(argv)
    try:
        if args.command == 'generate':
            return generate(args)
        print(_convert_model(args) if args.command == 'convert-model' else _convert(args))
    except (ValueError, TypeError, FileNotFoundError, ConnectionError) as err:  # bad option, file, network
        parser.exit(2, f'modelscope-sd {args.command}: error: {err}\n')


def _seed(value: Optional[int]) -> Optional[int]:
    """A1111's -1 is a random seed: None, drawn once, so that the lines of a prompt file count on from it."""
    return None if value == -1 else value


def _train(command: str, argv: List[str]):
    """In this process, on one device; for several GPUs use the shell launchers (accelerate launch)."""
    import logging

    from finetune.config import DreamBoothConfig, LoraTrainConfig
    from finetune.flags import run_trainer
    logging.basicConfig(format='%(asctime)s %(levelname)s %(name)s: %(message)s', level=logging.INFO)
    if command == 'train-lora':
        from finetune import train_lora as trainer
        config_cls = LoraTrainConfig
    else:
        from finetune import train_dreambooth as trainer
        config_cls = DreamBoothConfig
    return run_trainer(trainer.main, config_cls, argv, trainer.__doc__, f'modelscope-sd {command}')


if __name__ == '__main__':
    sys.exit(console())
