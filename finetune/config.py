"""Training configuration: dataclasses validated in ``__post_init__``, one field per flag (``flags.py`` builds
the command line), with diffusers' example names."""

import argparse
import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional

from modelscope_sd.constants import DEFAULT_MODEL_ID, DEFAULT_MODEL_REVISION
from modelscope_sd.fast import COMPILE_MODES, CUDA_GRAPH_MODES
from modelscope_sd.loading import hub_id_hint, is_hub_id
from modelscope_sd.prompts import CHUNK, check_syntax
from modelscope_sd.schedulers import check_scheduler_name

from .buckets import side_bounds
from .validation_images import load_sample_prompts

logger = logging.getLogger(__name__)

LR_SCHEDULERS = ('linear', 'cosine', 'cosine_with_restarts', 'polynomial', 'constant', 'constant_with_warmup')
MIXED_PRECISION = ('no', 'fp16', 'bf16')
OPTIMIZERS = ('adamw', 'adafactor')


def _help(text: str, parse=None, **kwargs):
    """A flag's field; ``parse``: how its command-line value is read, where not by its type."""
    return field(metadata={'help': text, 'parse': parse}, **kwargs)


def _square_size(value: str) -> int:
    """512, or kohya's '512,512'."""
    try:
        sizes = [int(v) for v in value.split(',')]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2):
        raise argparse.ArgumentTypeError(f'{value!r}: a size in pixels, e.g. 512')
    if sizes[0] != sizes[-1]:
        raise argparse.ArgumentTypeError(f'{value!r}: training is square here; --enable_bucket trains each image '
                                         'at the size nearest its shape')
    return sizes[0]


@dataclass
class TrainConfig:
    """What both trainers share. Defaults follow diffusers' example scripts unless noted."""
    # model
    pretrained_model_name_or_path: str = _help('ModelScope id or diffusers folder of the base model',
                                               default=DEFAULT_MODEL_ID)
    revision: Optional[str] = _help(f'hub revision of the base model (default: {DEFAULT_MODEL_REVISION} for '
                                    f"{DEFAULT_MODEL_ID}, else the hub's default)", default=None)
    vae: Optional[str] = _help("kohya's flag: a VAE in place of the base model's, e.g. vae-ft-mse-840000-ema-"
                               'pruned.safetensors (a file, a diffusers folder or a hub id): images are encoded, '
                               'and validation images decoded, with it; a DreamBooth model is saved with it',
                               default=None)
    # data
    resolution: int = _help("training size in pixels (multiple of 8; kohya's '512,512' too)", parse=_square_size,
                            default=512)
    center_crop: Optional[bool] = _help('center crop instead of a random crop (default: random, or center with '
                                        '--cache_latents, whose latents are encoded once, as kohya crops)',
                                        default=None)
    random_flip: bool = _help('flip images horizontally at random', default=False)
    enable_bucket: bool = _help('aspect-ratio buckets (kohya\'s flag): each image trains at the size of about '
                                'resolution² pixels nearest its shape, not as a cropped square', default=False)
    min_bucket_reso: Optional[int] = _help("kohya's flag, with --enable_bucket: the shortest bucket side in pixels "
                                           '(default: resolution/2)', default=None)
    max_bucket_reso: Optional[int] = _help("kohya's flag, with --enable_bucket: the longest bucket side in pixels "
                                           '(default: 2 x resolution)', default=None)
    skip_bad_images: bool = _help('skip unreadable images (counted in the log) instead of failing', default=False)
    dataloader_num_workers: int = _help('data loading processes (0: in the main process)', default=0)
    # output
    output_dir: str = _help('where adapters/models, checkpoints and validation images go', default='sd-output')
    overwrite_output_dir: bool = _help('allow an output_dir that already holds a run', default=False)
    output_name: Optional[str] = _help("kohya's flag: also write the file for A1111/ComfyUI as OUTPUT_DIR/NAME."
                                       'safetensors: an adapter\'s kohya export (as --export_kohya), or a full '
                                       'DreamBooth model as one checkpoint (as --export_checkpoint)', default=None)
    # optimisation
    train_batch_size: int = _help('images per device per step', default=1)
    num_train_epochs: int = _help('epochs, when max_train_steps is not set', default=1)
    max_train_steps: Optional[int] = _help('total optimizer steps (overrides num_train_epochs)', default=None)
    gradient_accumulation_steps: int = _help('micro-batches per optimizer step', default=1)
    gradient_checkpointing: bool = _help('recompute activations in backward: less memory, ~20% slower (autocast then '
                                         'keeps no copies of cast weights)', default=False)
    torch_compile: bool = _help('compile the UNet with torch.compile: the first steps compile (minutes on '
                                'SD1.5), later ones run faster; an epoch\'s last, smaller batch compiles once more; '
                                'validation runs eager; inductor caches make the next run start sooner',
                                default=False)
    torch_compile_mode: str = _help("with --torch_compile, torch.compile's mode: 'default'; 'reduce-overhead' also "
                                    "replays each step's forward and backward as CUDA graphs, for runs whose GPU "
                                    "waits on the host's kernel launches (LoRA at small batches on a fast GPU); it "
                                    'needs --gradient_accumulation_steps 1, and its graphs keep memory of their own '
                                    "(with --enable_bucket, graphs for each bucket's shape); "
                                    "'max-autotune' (minutes of kernel tuning, and CUDA graphs) or "
                                    "'max-autotune-no-cudagraphs'. Off CUDA, a mode compiles without CUDA graphs",
                                    default='default')
    learning_rate: float = _help('peak learning rate', default=1e-4)
    text_encoder_lr: Optional[float] = _help("with --train_text_encoder, the text encoder's own peak learning rate "
                                             "(diffusers' and kohya's flag; usually a few times lower than the "
                                             "UNet's); default: --learning_rate", default=None)
    scale_lr: bool = _help('multiply lr by batch size x accumulation x processes', default=False)
    lr_scheduler: str = _help(f'one of {LR_SCHEDULERS}', default='constant')
    lr_warmup_steps: int = _help('linear warmup steps', default=0)
    lr_num_cycles: int = _help("cosine_with_restarts: the number of cosine cycles (diffusers' flag, kohya's "
                               '--lr_scheduler_num_cycles)', default=1)
    lr_power: float = _help("polynomial: the decay's power (diffusers' flag, kohya's --lr_scheduler_power)",
                            default=1.0)
    optimizer: str = _help("'adamw', or 'adafactor': factored second moments and no momentum, so a full "
                           'SD1.5 UNet fine-tune keeps 2.0 GiB of optimizer state instead of 6.4', default='adamw')
    use_8bit_adam: bool = _help('bitsandbytes 8-bit AdamW (must be installed)', default=False)
    adam_beta1: float = _help('AdamW beta1', default=0.9)
    adam_beta2: float = _help('AdamW beta2', default=0.999)
    adam_weight_decay: float = _help('AdamW weight decay', default=1e-2)
    adam_epsilon: float = _help('AdamW epsilon', default=1e-8)
    max_grad_norm: float = _help('gradient clipping norm', default=1.0)
    mixed_precision: Optional[str] = _help(f'one of {MIXED_PRECISION}; default: accelerate config', default=None)
    seed: int = _help('seed for data order, augmentation, noise and timesteps (resume-exact)', default=0)
    snr_gamma: Optional[float] = _help('min-SNR-gamma loss weighting (5.0 is the paper value)', default=None)
    noise_offset: float = _help('noise offset (0.05-0.1 helps very dark/bright images)', default=0.0)
    proportion_empty_prompts: float = _help("share of captions replaced by the empty prompt, drawn anew each epoch "
                                            "(caption dropout, kohya's --caption_dropout_rate; 0.05-0.1 is usual): "
                                            'keeps the unconditional prediction that guidance uses', default=0.0)
    shuffle_caption: bool = _help("kohya's flag: shuffle each caption's comma-separated tags, drawn anew each epoch "
                                  "(for tag captions such as '1girl, red hair, smile'; prompts are then encoded "
                                  'every step, even with --cache_latents)', default=False)
    keep_tokens: int = _help("kohya's flag: the first N tags are never shuffled or dropped (1 keeps a trigger word "
                             'in front)', default=0)
    caption_tag_dropout_rate: float = _help("kohya's flag: leave each tag after the first --keep_tokens out of a "
                                            'caption with this probability, drawn anew each epoch', default=0.0)
    prediction_type: Optional[str] = _help("'epsilon' or 'v_prediction'; default: the scheduler's", default=None)
    train_text_encoder: bool = _help('also train the text encoder', default=False)
    clip_skip: Optional[int] = _help("kohya's flag, counted as A1111's Clip skip: 2 trains on the text encoder's "
                                     'second-to-last layer, as anime models (NAI and its descendants) are used; 1 or '
                                     'unset: the last layer. Generate with the same Clip skip (the pipeline\'s '
                                     'clip_skip is one less)', default=None)
    max_token_length: int = _help('caption tokens the text encoder reads: 75 (one CLIP window), or 150 or 225 '
                                  '(kohya\'s values): a longer caption is encoded in 75-token windows side by side, '
                                  'as the pipeline encodes long prompts', default=75)
    cache_latents: bool = _help('encode images (and prompts, unless the text encoder trains) once before '
                                'training; crops are then centered (with --random_flip both orientations are '
                                'cached)',
                                default=False)
    # checkpoints
    checkpointing_steps: Optional[int] = _help('save a resumable checkpoint every N steps', default=500)
    checkpointing_epochs: Optional[int] = _help('save a resumable checkpoint every N epochs', default=None)
    checkpoints_total_limit: Optional[int] = _help('keep only the newest N checkpoints', default=None)
    resume_from_checkpoint: Optional[str] = _help("'latest' or a checkpoint folder", default=None)
    # validation and logging
    validation_prompt: Optional[str] = _help('prompt rendered to PNGs during training', default=None)
    validation_steps: Optional[int] = _help('render validation images (and validation loss) every N steps '
                                            '(default: 100, unless --validation_epochs is given)', default=None)
    validation_epochs: Optional[int] = _help('render validation images (and validation loss) every N epochs',
                                             default=None)
    num_validation_images: int = _help('validation images per render (image i at --seed + i)', default=1)
    sample_prompts: Optional[str] = _help("kohya's flag: more validation images, one per prompt of a .txt file "
                                          "('a dog --n blurry --w 512 --h 768 --d SEED --l CFG --s STEPS --ss "
                                          "SAMPLER', # comments), or kohya's .json/.toml", default=None)
    validation_scheduler: Optional[str] = _help("sampler of validation images, a name the pipeline takes "
                                                "(euler_a, dpm++_2m_karras, ...); default: the model's own",
                                                default=None)
    sample_at_first: bool = _help("kohya's flag: also render validation before the first step (the base model's "
                                  'images, to compare)', default=False)
    logging_steps: int = _help('log loss and lr every N steps', default=10)
    report_to: Optional[str] = _help("'tensorboard' (pip install tensorboard) or another accelerate tracker to log "
                                     'loss and lr there (validation images too: tensorboard, wandb, swanlab)',
                                     default=None)
    prompt: Optional[str] = _help('after training, render this prompt with the result (ModelScope example)',
                                  default=None)

    def __post_init__(self):
        _expand_home(self)
        _check_sources(self)
        _positive(self, 'resolution', 'train_batch_size', 'num_train_epochs', 'gradient_accumulation_steps',
                  'num_validation_images', 'logging_steps')
        _positive(self, 'max_train_steps', 'checkpointing_steps', 'checkpointing_epochs', 'checkpoints_total_limit',
                  'validation_steps', 'validation_epochs', optional=True)
        if self.validation_steps is None and self.validation_epochs is None:
            self.validation_steps = 100
        _finite(self)
        _check_schedule(self)
        _check_buckets(self)
        if self.output_name is not None:
            _check_output_name(self.output_name)
        _check_optimizer(self)
        if self.seed < 0:
            raise ValueError(f'seed={self.seed} must be >= 0: the seed decides the data order, augmentation and noise, '
                             'so a resumed run repeats the uninterrupted one (A1111\'s -1 for a random seed is not '
                             'taken here; any number will do).')
        _check_captions(self)
        if self.resolution % 8:
            raise ValueError(f'resolution={self.resolution} must be a multiple of 8 (e.g. 512 or 768).')
        _check_validation(self)
        _check_compile_mode(self)
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f'mixed_precision={self.mixed_precision!r} is not one of {MIXED_PRECISION}.')
        if self.prediction_type not in (None, 'epsilon', 'v_prediction'):
            raise ValueError(f"prediction_type={self.prediction_type!r} must be 'epsilon' or 'v_prediction'.")
        if self.noise_offset < 0:
            raise ValueError(f'noise_offset={self.noise_offset} must be >= 0.')
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f'snr_gamma={self.snr_gamma} must be > 0 (5.0 is usual), or unset.')
        if self.center_crop is None:
            self.center_crop = self.cache_latents
        if self.cache_latents and not self.center_crop:
            raise ValueError('cache_latents needs center crops, and --center_crop false asks for random ones, which '
                             'change the latents every epoch: drop --center_crop false, or --cache_latents '
                             '(--random_flip is fine: both orientations are cached).')
        if self.dataloader_num_workers < 0:
            raise ValueError(f'dataloader_num_workers={self.dataloader_num_workers} must be >= 0.')
        if self.report_to is not None:
            _check_tracker(self.report_to)


# the flags that name files and folders
PATH_FLAGS = ('pretrained_model_name_or_path', 'vae', 'output_dir', 'resume_from_checkpoint', 'sample_prompts',
              'network_weights', 'dataset_name', 'train_data_dir', 'instance_data_dir', 'class_data_dir')


def _expand_home(config) -> None:
    """A leading ``~`` as the shell expands it. A quoted one reaches the trainer as it is (``OUTPUT_DIR="~/my-lora"``
    in front of the shell script): the run would write into a folder named ``~`` under the working directory."""
    for name in PATH_FLAGS:
        value = getattr(config, name, None)
        if isinstance(value, str) and value.startswith('~'):
            setattr(config, name, os.path.expanduser(value))


def _check_sources(config) -> None:
    """The base model and VAE: a folder, a file or a hub id each, said before anything loads."""
    model = config.pretrained_model_name_or_path
    if isinstance(model, str) and os.path.isfile(model):
        raise ValueError(single_file_message(model, model))
    if isinstance(model, str) and not (os.path.isdir(model) or is_hub_id(model)):
        raise FileNotFoundError(f'pretrained_model_name_or_path={model!r}: no such folder, and not a ModelScope '
                                f'model id (owner/name){hub_id_hint(model)}.')
    if config.vae is not None and not (os.path.exists(config.vae) or is_hub_id(config.vae)):
        raise ValueError(f'vae={config.vae!r}: no such file or folder, and not a hub id (owner/name)'
                         f'{hub_id_hint(config.vae)}.')
    if config.revision is None and config.pretrained_model_name_or_path == DEFAULT_MODEL_ID:
        config.revision = DEFAULT_MODEL_REVISION  # the model card's revision; another repo may not have it


def _check_schedule(config) -> None:
    """The learning rates and the shape of their schedule."""
    if config.learning_rate <= 0:
        raise ValueError(f'learning_rate={config.learning_rate} must be > 0.')
    if config.text_encoder_lr is not None:
        if config.text_encoder_lr <= 0:
            raise ValueError(f'text_encoder_lr={config.text_encoder_lr} must be > 0, or unset to use '
                             '--learning_rate.')
        if not config.train_text_encoder:
            raise ValueError('text_encoder_lr is the text encoder\'s learning rate, and the text encoder trains '
                             'only with --train_text_encoder: pass it too, or drop --text_encoder_lr.')
    if config.lr_warmup_steps < 0:
        raise ValueError(f'lr_warmup_steps={config.lr_warmup_steps} must be >= 0.')
    _positive(config, 'lr_num_cycles')
    if config.lr_power <= 0:
        raise ValueError(f'lr_power={config.lr_power} must be > 0 (1.0 decays linearly).')
    for name, default, schedule in (('lr_num_cycles', 1, 'cosine_with_restarts'), ('lr_power', 1.0, 'polynomial')):
        if getattr(config, name) != default and config.lr_scheduler != schedule:
            raise ValueError(f'{name}={getattr(config, name)} shapes the {schedule} schedule, and lr_scheduler is '
                             f'{config.lr_scheduler!r}: pass --lr_scheduler {schedule}, or drop {name}.')
    if config.lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f'lr_scheduler={config.lr_scheduler!r} is not one of {LR_SCHEDULERS}.')


def _check_optimizer(config) -> None:
    """The optimizer and its settings."""
    for name in ('adam_beta1', 'adam_beta2'):
        if not 0 <= getattr(config, name) < 1:
            raise ValueError(f'{name}={getattr(config, name)} must be in [0, 1) (0.9 and 0.999 are usual).')
    if config.adam_weight_decay < 0:
        raise ValueError(f'adam_weight_decay={config.adam_weight_decay} must be >= 0.')
    if config.adam_epsilon <= 0:  # AdamW divides by sqrt(v) + eps: 0/0 for a weight with no gradient yet
        raise ValueError(f'adam_epsilon={config.adam_epsilon} must be > 0 (1e-8 is usual): with 0, a weight whose '
                         "gradient is still zero (LoRA's A at the first step) gets 0/0, NaN.")
    if config.max_grad_norm <= 0:  # 0 would zero every gradient, a negative norm would flip them
        raise ValueError(f'max_grad_norm={config.max_grad_norm} must be > 0 (1.0 is usual).')
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f'optimizer={config.optimizer!r} is not one of {OPTIMIZERS}.')
    if config.use_8bit_adam and config.optimizer != 'adamw':
        raise ValueError(f'use_8bit_adam applies to optimizer=adamw, not {config.optimizer!r}: drop one of the two.')


def _check_captions(config) -> None:
    """How captions are read: empty-prompt dropout, tags, token windows, clip skip."""
    if not 0 <= config.proportion_empty_prompts < 1:
        raise ValueError(f'proportion_empty_prompts={config.proportion_empty_prompts} must be in [0, 1) '
                         '(0.05-0.1 is usual; 0 keeps every caption).')
    if config.keep_tokens < 0:
        raise ValueError(f'keep_tokens={config.keep_tokens} must be >= 0 (the tags that stay first).')
    if not 0 <= config.caption_tag_dropout_rate < 1:
        raise ValueError(f'caption_tag_dropout_rate={config.caption_tag_dropout_rate} must be in [0, 1) (0.1 is '
                         'usual; 0 keeps every tag).')
    if config.keep_tokens and not (config.shuffle_caption or config.caption_tag_dropout_rate):
        raise ValueError(f'keep_tokens={config.keep_tokens} keeps tags in place while --shuffle_caption (or '
                         '--caption_tag_dropout_rate) changes the rest: pass one of those too, or drop '
                         '--keep_tokens.')
    if config.clip_skip is not None and config.clip_skip < 1:
        raise ValueError(f'clip_skip={config.clip_skip} must be >= 1 (A1111\'s count: 1 is the last layer, 2 the '
                         'second-to-last), or unset.')
    if config.max_token_length < CHUNK or config.max_token_length % CHUNK:
        raise ValueError(f'max_token_length={config.max_token_length} must be a multiple of {CHUNK} (75, 150, 225).')


def _check_validation(config) -> None:
    """The validation prompt, sampler and kohya's sample file: a bad one fails now, not at the first validation."""
    if config.validation_prompt:  # a <lora:…> tag would be read as words
        check_syntax('validation_prompt', config.validation_prompt)
    if config.validation_scheduler is not None:
        check_scheduler_name(config.validation_scheduler, 'validation_scheduler: ')
    if config.sample_prompts is not None:
        load_sample_prompts(config.sample_prompts)  # a bad line fails now, not at the first validation


def _check_compile_mode(config) -> None:
    mode = config.torch_compile_mode
    if mode not in COMPILE_MODES:
        raise ValueError(f'torch_compile_mode={mode!r} is not one of {", ".join(COMPILE_MODES)}.')
    if mode != 'default' and not config.torch_compile:
        raise ValueError(f'torch_compile_mode={mode!r} is how --torch_compile compiles: pass --torch_compile too, or '
                         'drop --torch_compile_mode.')
    if config.torch_compile and mode in CUDA_GRAPH_MODES and config.gradient_accumulation_steps > 1:
        # torch's CUDA-graph trees: a replayed backward writes its gradients where the last replay left them
        raise ValueError(f"torch_compile_mode={mode!r} replays the backward as a CUDA graph, and each replay "
                         'writes its gradients over the last one, so they cannot add up over '
                         f'--gradient_accumulation_steps {config.gradient_accumulation_steps}: pass 1 (a larger '
                         "--train_batch_size gives the same images per step), or --torch_compile_mode default.")


def single_file_message(model: str, checkpoint: str) -> str:
    """The trainers' answer to a single-file base model: how to convert it once; or, for an adapter or an
    embedding given as the base model, that it is not one."""
    from modelscope_sd.loading import check_safetensors, checkpoint_kind
    name = os.path.basename(checkpoint)
    kind = checkpoint_kind(check_safetensors(checkpoint)) if checkpoint.endswith('.safetensors') else 'model'
    if kind == 'lora':
        from safetensors import safe_open
        with safe_open(checkpoint, framework='pt') as f:
            base = (f.metadata() or {}).get('modelscope_sd.base_model')
        return (f'pretrained_model_name_or_path={model!r} is a LoRA adapter ({name}), not a base model: pass the model '
                f'it was trained on' + (f' ({base})' if base else '') + ' as --pretrained_model_name_or_path.')
    if kind == 'embedding':
        return (f'pretrained_model_name_or_path={model!r} is a textual-inversion embedding ({name}), not a base '
                'model: pass the model to fine-tune as --pretrained_model_name_or_path.')
    if kind == 'unknown':
        return (f'pretrained_model_name_or_path={model!r}: {name} holds no Stable Diffusion UNet weights '
                '(model.diffusion_model.*), so it is neither a diffusers folder nor an original-layout SD checkpoint.')
    folder = os.path.splitext(name)[0]
    return (f'pretrained_model_name_or_path={model!r} is a single-file checkpoint ({name}); '
            f'the trainers read a diffusers folder. Convert it once: modelscope-sd convert-model {checkpoint} '
            f'{folder} (add --config for a non-SD1.5 architecture), then pass --pretrained_model_name_or_path {folder}.')


@dataclass
class LoraOptions:
    """Adapter shape, shared by the LoRA trainer and DreamBooth's --use_lora mode."""
    rank: int = _help('LoRA rank', default=4)
    lora_alpha: Optional[int] = _help('LoRA alpha (default: rank, i.e. scale 1)', default=None)
    lora_dropout: float = _help('LoRA dropout', default=0.0)
    use_dora: bool = _help("DoRA (peft's use_dora, diffusers' flag): each adapted weight also learns its column "
                           'norms; the file loads in this pipeline and in diffusers, not as a kohya file',
                           default=False)
    target_modules: str = _help('comma-separated UNet modules that get adapters, matched as peft matches them (a '
                                "layer's name or its end: attn2.to_k, ff.net.0.proj, conv1)",
                                default='to_k,to_q,to_v,to_out.0')
    export_kohya: bool = _help('also write a kohya/A1111 .safetensors next to the diffusers file', default=False)
    training_comment: Optional[str] = _help("kohya's flag: a comment for the kohya file's ss_training_comment "
                                            '(A1111 and civitai show it)', default=None)
    network_weights: Optional[str] = _help("start from this LoRA (file or folder, diffusers or kohya format; kohya's "
                                           'flag): same --rank, modules within --target_modules', default=None)


@dataclass
class LoraTrainConfig(LoraOptions, TrainConfig):
    """LoRA fine-tuning on image-caption data."""
    dataset_name: Optional[str] = _help('ModelScope dataset id or local folder (csv with Text, Target:FILE)',
                                        default='buptwq/lora-stable-diffusion-finetune')
    train_data_dir: Optional[str] = _help('image folder with a .txt (or .caption) caption per image, or a '
                                          'metadata.jsonl or metadata.csv (file_name, and text, caption or prompt) as '
                                          "in Hugging Face's imagefolder (used instead of dataset_name)", default=None)
    output_dir: str = _help('where the adapter, checkpoints and validation images go', default='sd-lora')

    def __post_init__(self):
        super().__post_init__()
        self.export_kohya = self.export_kohya or self.output_name is not None
        check_lora_fields(self)
        if not self.dataset_name and not self.train_data_dir:
            raise ValueError('No training data: pass --dataset_name (ModelScope id or folder) or --train_data_dir.')
        if self.train_data_dir and not os.path.isdir(self.train_data_dir):
            raise FileNotFoundError(f'train_data_dir={self.train_data_dir!r}: no such folder.')
        check_writes_outside('train_data_dir', self.train_data_dir, output_dir=self.output_dir)
        check_dataset_name(self.dataset_name)


@dataclass
class DreamBoothConfig(LoraOptions, TrainConfig):
    """DreamBooth: teach the model one subject from a few photos, with prior preservation."""
    instance_data_dir: Optional[str] = _help('folder of 3-20 photos of the subject', default=None)
    dataset_name: Optional[str] = _help('instance photos from a ModelScope dataset id or local csv folder '
                                        '(instead of instance_data_dir)', default=None)
    instance_prompt: Optional[str] = _help("prompt naming the subject, e.g. 'a photo of sks dog'", default=None)
    identifier: Optional[str] = _help("the rare token naming the subject (e.g. 'sks'): checked to be in "
                                      'instance_prompt and not in class_prompt', default=None)
    with_prior_preservation: bool = _help('also train on generated class images to keep the class', default=False)
    class_prompt: Optional[str] = _help("prompt for the class, e.g. 'a photo of dog'", default=None)
    class_data_dir: Optional[str] = _help('class images; missing ones are generated (default: '
                                          'output_dir/class_images)', default=None)
    num_class_images: int = _help('class images to train with (generated if fewer exist)', default=100)
    prior_loss_weight: float = _help('weight of the class loss', default=1.0)
    sample_batch_size: int = _help('batch size when generating class images', default=4)
    class_inference_steps: int = _help('denoising steps per generated class image', default=50)
    use_lora: bool = _help('train LoRA adapters instead of the whole UNet', default=False)
    export_checkpoint: bool = _help('full fine-tune: also write OUTPUT_DIR/<its name>.safetensors, the model as '
                                    'one original-layout fp16 file for A1111/ComfyUI', default=False)
    fused_backward_pass: bool = _help("kohya's flag, full fine-tune: the optimizer steps the weights during "
                                      'backward, about 256 MiB of gradients at a time, and frees them, so SD1.5\'s '
                                      '3.2 GiB of gradients are never held at once; gradients are clipped to '
                                      '--max_grad_norm per group (never more than together). One process, '
                                      '--gradient_accumulation_steps 1, bf16 or fp32', default=False)
    full_bf16: bool = _help("kohya's flag, full fine-tune: the trained weights and their gradients in bf16 (half "
                            'the memory of fp32, no weight casts in the forward), stepped by an AdamW that keeps fp32 '
                            'moments and rounds each new weight stochastically, so that updates far below bf16\'s '
                            'precision survive on average. Needs --mixed_precision bf16 and AdamW (not 8-bit)',
                            default=False)
    output_dir: str = _help('where the model (or adapter), checkpoints and validation images go',
                            default='sd-dreambooth')
    learning_rate: Optional[float] = _help('peak learning rate (default 5e-6, or 1e-4 with --use_lora)',
                                           default=None)

    def __post_init__(self):
        if self.learning_rate is None:
            self.learning_rate = 1e-4 if self.use_lora else 5e-6
        super().__post_init__()
        if self.output_name is not None and self.use_lora:
            self.export_kohya = True
        elif self.output_name is not None:
            self.export_checkpoint = True
        if self.use_lora:
            check_lora_fields(self)
        elif self.network_weights:
            raise ValueError('network_weights starts the LoRA adapters from a file: pass --use_lora as well (a full '
                             'fine-tune starts from --pretrained_model_name_or_path).')
        if self.export_checkpoint and self.use_lora:
            raise ValueError('export_checkpoint writes a full model; with --use_lora the adapter is the result: '
                             'pass --export_kohya for an A1111/ComfyUI file instead.')
        if self.fused_backward_pass:
            check_fused_backward_pass(self, self.mixed_precision)
        if self.full_bf16:
            check_full_bf16(self, self.mixed_precision)
        source = self.instance_data_dir or self.dataset_name
        if not source:
            raise ValueError('No instance images: pass --instance_data_dir (a folder of subject photos) or '
                             '--dataset_name.')
        if self.instance_data_dir and not os.path.isdir(self.instance_data_dir):
            raise FileNotFoundError(f'instance_data_dir={self.instance_data_dir!r}: no such folder.')
        check_dataset_name(self.dataset_name)
        if not self.instance_prompt:
            raise ValueError("instance_prompt is required, e.g. --instance_prompt 'a photo of sks dog'.")
        if self.identifier and self.identifier not in self.instance_prompt.split():
            raise ValueError(f'instance_prompt={self.instance_prompt!r} does not contain the identifier '
                             f'{self.identifier!r}: the prompt must name the subject by it, e.g. '
                             f"'a photo of {self.identifier} dog'.")
        if not self.with_prior_preservation and (self.class_prompt or self.class_data_dir):
            logger.warning('class_prompt/class_data_dir are set but with_prior_preservation is off: no class images '
                           'are used. Pass --with_prior_preservation to use them.')
        if self.with_prior_preservation:
            if not self.class_prompt:
                raise ValueError("with_prior_preservation needs --class_prompt (e.g. 'a photo of dog'): class "
                                 'images must be generated from the class, not from the instance prompt.')
            if self.identifier and self.identifier in self.class_prompt.split():
                raise ValueError(f'class_prompt={self.class_prompt!r} contains the identifier {self.identifier!r}: '
                                 'it must describe the class in general.')
            if self.class_prompt.strip() == self.instance_prompt.strip():
                raise ValueError('class_prompt equals instance_prompt: the class prompt must not name the subject.')
            if self.enable_bucket:
                raise ValueError('enable_bucket does not combine with with_prior_preservation: each batch pairs '
                                 'an instance image with a class image of the same size. Drop one of the two.')
        _positive(self, 'num_class_images', 'sample_batch_size', 'class_inference_steps')
        if self.prior_loss_weight < 0:
            raise ValueError(f'prior_loss_weight={self.prior_loss_weight} must be >= 0.')
        if self.class_data_dir is None:
            self.class_data_dir = os.path.join(self.output_dir, 'class_images')
        check_writes_outside('instance_data_dir', self.instance_data_dir, output_dir=self.output_dir,
                             class_data_dir=self.class_data_dir if self.with_prior_preservation else None)
        if self.with_prior_preservation and os.path.isfile(self.class_data_dir):
            raise ValueError(f'class_data_dir={self.class_data_dir!r} is a file: pass a folder (it is made if missing, '
                             'and missing class images are generated into it).')


def check_writes_outside(data_flag: str, data_dir: Optional[str], **written: Optional[str]) -> None:
    """The folders a run writes images to (validation images, class images) must not lie in the image folder it
    trains on: that folder is read with its subfolders, so a resume or the next run would train on them."""
    if not data_dir or not os.path.isdir(data_dir):
        return
    data = os.path.realpath(data_dir)
    for flag, path in written.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if os.path.commonpath([data, real]) == data:
            where = 'is' if real == data else 'is inside'
            raise ValueError(f'{flag}={path!r} {where} {data_flag}={data_dir!r}: the images this run writes there '
                             f'would be read as training images (subfolders are read too) on a resume or the next '
                             f'run. Pass a --{flag} outside {data_dir!r}.')


def check_fused_backward_pass(config, mixed_precision: Optional[str], processes: int = 1) -> None:
    """What --fused_backward_pass cannot combine with: the flags here; ``mixed_precision`` and ``processes`` once the
    accelerator has them (from accelerate's config)."""
    reason = fused_backward_pass_conflict(config, mixed_precision, processes)
    if reason:
        raise ValueError(f'fused_backward_pass: {reason}, or drop --fused_backward_pass.')


def fused_backward_pass_conflict(config, mixed_precision: Optional[str], processes: int = 1) -> Optional[str]:
    """Why --fused_backward_pass cannot go with this run, with the fix; None where it can."""
    if config.use_lora:
        return ("it saves a full fine-tune's gradients (GiBs), and an adapter's are a few MB: train the whole UNet "
                '(no --use_lora)')
    if config.gradient_accumulation_steps > 1:
        return (f'the weights change during each backward, so gradients cannot add up over '
                f'--gradient_accumulation_steps {config.gradient_accumulation_steps}: pass 1 (a larger '
                '--train_batch_size gives the same images per step)')
    if mixed_precision == 'fp16':
        return ('fp16 training checks the whole gradient for overflow before any weight changes: pass '
                '--mixed_precision bf16 (or no)')
    if config.torch_compile:
        return ("a compiled UNet's backward hands over all its gradients at once, so nothing is saved: drop one of "
                'the two')
    if processes > 1:
        return (f'with {processes} processes each would step on its own gradients before they are averaged: train on '
                'one process')
    return None


def check_full_bf16(config, mixed_precision: Optional[str]) -> None:
    """What --full_bf16 cannot combine with; ``mixed_precision`` None: not known yet (accelerate's config decides,
    checked again once the accelerator has it)."""
    reason = full_bf16_conflict(config, mixed_precision)
    if reason:
        raise ValueError(f'full_bf16: {reason}, or drop --full_bf16.')


def full_bf16_conflict(config, mixed_precision: Optional[str]) -> Optional[str]:
    """Why --full_bf16 cannot go with this run, with the fix; None where it can."""
    if config.use_lora:
        return "an adapter's weights are a few MB and train in fp32: train the whole UNet (no --use_lora)"
    if config.use_8bit_adam or config.optimizer != 'adamw':
        flag = '--use_8bit_adam' if config.use_8bit_adam else f'--optimizer {config.optimizer}'
        return (f'the bf16 weights step with an AdamW of their own (fp32 moments, stochastic rounding), not {flag}: '
                f'drop {flag}')
    if mixed_precision is not None and mixed_precision != 'bf16':
        return (f'the weights compute in bf16, not under mixed precision {mixed_precision!r}: pass '
                '--mixed_precision bf16')
    return None


def trains_lora(config) -> bool:
    """Whether the run trains LoRA adapters: the LoRA trainer always, DreamBooth with --use_lora."""
    return getattr(config, 'use_lora', True)


def target_module_list(target_modules: str) -> List[str]:
    """``--target_modules to_q, to_k`` → ['to_q', 'to_k']."""
    return [m.strip() for m in target_modules.split(',') if m.strip()]


def check_lora_fields(config) -> None:
    if config.rank < 1:
        raise ValueError(f'rank={config.rank} must be >= 1 (4-64 is usual).')
    if config.lora_alpha is not None and config.lora_alpha <= 0:
        raise ValueError(f'lora_alpha={config.lora_alpha} must be > 0, or unset to use rank.')
    if not 0 <= config.lora_dropout < 1:
        raise ValueError(f'lora_dropout={config.lora_dropout} must be in [0, 1).')
    if not target_module_list(config.target_modules):
        raise ValueError('target_modules is empty: name at least one module, e.g. to_q,to_k,to_v,to_out.0.')
    if config.use_dora and config.export_kohya:
        raise ValueError('use_dora with export_kohya' + (' (output_name names that file)' if config.output_name else '')
                         + ': the kohya export writes LoRA keys only, without DoRA\'s magnitudes. Load the DoRA file '
                         'with lora_dir (or diffusers), or drop one of the two flags.')
    if config.use_dora and config.network_weights is not None:
        raise ValueError('use_dora with network_weights: a DoRA adapter starts from the base weights\' norms, so a '
                         'LoRA to start from would not keep its effect. Drop one of the two flags.')
    if config.network_weights is not None:
        check_network_weights(config)


def check_dataset_name(name: Optional[str]) -> None:
    """A folder, or what can be a ModelScope dataset id: a path that is not there fails now, not after a hub query."""
    if not name or os.path.isdir(name) or is_hub_id(name):
        return
    if os.path.exists(name):
        raise ValueError(f'dataset_name={name!r} is a file: pass a folder or a ModelScope dataset id.')
    raise FileNotFoundError(f'dataset_name={name!r}: no such folder, and not a ModelScope dataset id (owner/name)'
                            f'{hub_id_hint(name)}.')


def check_network_weights(config) -> None:
    """The adapter to start from must fit this run's adapters: its rank, modules within --target_modules, and
    text-encoder weights only with --train_text_encoder. Checked before any model loads."""
    from .models import adapter_modules, adapter_state
    path = config.network_weights
    if not os.path.exists(path):
        raise FileNotFoundError(f'network_weights={path!r}: no such file or folder.')
    from modelscope_sd.constants import PICKLE_SUFFIXES
    from modelscope_sd.lora import locate_adapter, nonfinite
    folder, name = locate_adapter(path, allow_pickle=True, argument='network_weights')
    if name.endswith(PICKLE_SUFFIXES):  # ModelScope's old trainer wrote pytorch_lora_weights.bin
        pickle_file = os.path.join(folder, name)
        raise ValueError(f'network_weights={path!r} is a pickle file ({name}), which can run code when loaded. If '
                         f'you trust it, convert it once: modelscope-sd convert-lora {pickle_file} '
                         'adapter.safetensors --to diffusers --allow_pickle, then pass --network_weights '
                         'adapter.safetensors.')
    state = adapter_state(path)
    ranks = {v.shape[0] for k, v in state.items() if '.lora_A.' in k}
    if not ranks:
        raise ValueError(f'network_weights={path!r} holds no LoRA weights for the UNet or the text encoder.')
    broken = nonfinite(state.items())
    if broken:
        raise ValueError(f'network_weights={path!r} holds NaN or inf in {len(broken)} of its {len(state)} weights '
                         f'(e.g. {broken[0]}): the training that wrote it diverged. Start from an earlier checkpoint '
                         'of it.')
    if ranks != {config.rank}:
        raise ValueError(f'network_weights={path!r} has rank {sorted(ranks)}, this run --rank {config.rank}: pass '
                         f'--rank {max(ranks)} to continue it.')
    targets = target_module_list(config.target_modules)
    outside = sorted({m for m in adapter_modules(state, 'unet')
                      if not any(m == t or m.endswith('.' + t) for t in targets)})
    if outside:
        names = sorted({'.'.join(m.split('.')[-2:]) if m.split('.')[-1].isdigit() else m.split('.')[-1]
                        for m in outside})
        raise ValueError(f'network_weights={path!r} adapts modules outside --target_modules {config.target_modules} '
                         f'({", ".join(names)}, e.g. {outside[0]}): add them to --target_modules.')
    if adapter_modules(state, 'text_encoder') and not config.train_text_encoder:
        raise ValueError(f'network_weights={path!r} holds text-encoder weights too: pass --train_text_encoder to go on '
                         'training them, or they would be dropped from the result.')


def _check_tracker(name: str) -> None:
    """accelerate drops a tracker whose package is missing with only a debug message: the run would log nowhere."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType
    if name not in LoggerType.list():
        raise ValueError(f'report_to={name!r} is not one of {LoggerType.list()}.')
    if name != 'all' and LoggerType(name) not in get_available_trackers():
        raise ValueError(f'report_to={name!r}: {name} is not installed here. pip install {name}, or drop --report_to.')


def _finite(config) -> None:
    """NaN passes every comparison check and would train to NaN weights: refuse it (and inf) by name."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f'{f.name}={value} must be a finite number.')


def _check_buckets(config) -> None:
    for name in ('min_bucket_reso', 'max_bucket_reso'):
        value = getattr(config, name)
        if value is None:
            continue
        if not config.enable_bucket:
            raise ValueError(f'{name}={value} sets the aspect-ratio buckets: pass --enable_bucket too, or drop it.')
        if value <= 0 or value % 8:
            raise ValueError(f'{name}={value} must be a positive multiple of 8 (64 for SD1.5, whose bucket sides '
                             'are multiples of 64).')
    low, high = side_bounds(config.resolution, config.min_bucket_reso, config.max_bucket_reso)
    if not low <= config.resolution <= high:
        raise ValueError(f'resolution={config.resolution} must lie between min_bucket_reso={low} and '
                         f'max_bucket_reso={high}: the buckets hold about resolution² pixels.')


def _check_output_name(name: str) -> None:
    if not name.strip() or os.sep in name or (os.altsep and os.altsep in name) or name in ('.', '..'):
        raise ValueError(f'output_name={name!r} must be a file name without a folder (the file goes in output_dir), '
                         "e.g. 'my_style'.")
    if name.lower().endswith(('.safetensors', '.ckpt', '.pt')):
        raise ValueError(f"output_name={name!r}: give the name without its extension ('.safetensors' is added).")
    if name in ('pytorch_lora_weights', 'pytorch_lora_weights_kohya'):
        raise ValueError(f'output_name={name!r} is a name the trainers write themselves: choose another.')


def _positive(config, *names, optional=False):
    for name in names:
        value = getattr(config, name)
        if optional and value is None:
            continue
        if value < 1:
            raise ValueError(f'{name}={value} must be >= 1.')
