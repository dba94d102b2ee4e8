"""Model side of training: load the base model's parts, attach LoRA adapters, save adapters in diffusers'
format (plus kohya/A1111's), and let accelerate checkpoint only what is trained."""

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import asdict
from typing import Dict, List, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modelscope_sd.constants import LORA_WEIGHT_NAME
from modelscope_sd.files import save_safetensors
from modelscope_sd.loading import check_model_dir, check_not_a_part, lone_checkpoint, resolve_model_dir
from modelscope_sd.vae import load_vae

from .checkpoint import TEMP_PREFIX
from .config import single_file_message, trains_lora

logger = logging.getLogger(__name__)

KOHYA_WEIGHT_NAME = 'pytorch_lora_weights_kohya.safetensors'
TEXT_ENCODER_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'out_proj']


def load_components(model: str, revision: Optional[str], vae: Optional[str] = None,
                    clip_skip: Optional[int] = None) -> Dict[str, object]:
    """The five trainable/frozen parts of an SD model, from a hub id (ModelScope cache) or a folder; ``vae``: a VAE
    in place of the model's own (`modelscope_sd.vae.load_vae`); ``clip_skip`` (A1111's count) is checked against
    the text encoder's layers before any weights load."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    check_not_a_part(model, 'pretrained_model_name_or_path')
    path = resolve_model_dir(model, revision, argument='pretrained_model_name_or_path')
    checkpoint = lone_checkpoint(path)
    if checkpoint is not None:
        raise ValueError(single_file_message(model, checkpoint))
    check_model_dir(path)
    unet_channels = UNet2DConditionModel.load_config(path, subfolder='unet')['in_channels']
    latent_channels = AutoencoderKL.load_config(path, subfolder='vae')['latent_channels']
    if unet_channels != latent_channels:  # 9 for inpainting models: latents + mask + masked image
        raise ValueError(f'pretrained_model_name_or_path={model!r} has a {unet_channels}-channel UNet (an inpainting '
                         f'model); the trainers fine-tune text-to-image models with {latent_channels}-channel '
                         'latents. Start from a text-to-image base such as AI-ModelScope/stable-diffusion-v1-5.')
    layers = CLIPTextConfig.from_pretrained(path, subfolder='text_encoder').num_hidden_layers
    if clip_skip is not None and clip_skip > layers:
        raise ValueError(f'clip_skip={clip_skip}: the text encoder of {model!r} has {layers} layers, so clip_skip '
                         f'goes up to {layers} (2, the second-to-last layer, is the usual value).')
    own_vae = AutoencoderKL.from_pretrained(path, subfolder='vae')
    return {
        'model_dir': path,
        'tokenizer': CLIPTokenizer.from_pretrained(path, subfolder='tokenizer'),
        'text_encoder': CLIPTextModel.from_pretrained(path, subfolder='text_encoder'),
        'vae': own_vae if vae is None else load_vae(vae, own_vae),
        'unet': UNet2DConditionModel.from_pretrained(path, subfolder='unet'),
        'noise_scheduler': DDPMScheduler.from_pretrained(path, subfolder='scheduler'),
    }


def add_lora(model, rank: int, alpha: Optional[int], dropout: float, target_modules, init='gaussian',
             use_dora: bool = False) -> None:
    """A peft LoRA (or DoRA) adapter named 'default'. Through peft itself rather than transformers'
    ``add_adapter``, which can demand a newer peft than the newest release (transformers 5.24 asks for peft 0.22)."""
    from peft import LoraConfig, inject_adapter_in_model
    check_target_modules(model, target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, init_lora_weights=init,
                        target_modules=list(target_modules), use_dora=use_dora)
    inject_adapter_in_model(config, model, adapter_name='default')
    model.peft_config = {'default': config}


ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)


def check_target_modules(model, target_modules) -> None:
    """Each name picks layers peft can adapt, as peft matches it (the module's name, or its end after a dot):
    a typo is named with the names there are, before peft's error for the first layer it cannot adapt, or none."""
    modules = dict(model.named_modules())
    picked = [(target, [module for name, module in modules.items() if name == target or name.endswith('.' + target)])
              for target in target_modules]
    problems = []
    missing = [target for target, found in picked if not found]
    if missing:
        problems.append(f'{", ".join(missing)} name{"s" if len(missing) == 1 else ""} no layer of the '
                        f'{type(model).__name__}')
    for target, found in picked:
        others = [type(module).__name__ for module in found if not isinstance(module, ADAPTABLE)]
        if others:  # peft refuses the whole adapter for it
            problems.append(f'{target} is a {others[0]}, not a Linear or Conv2d layer')
    if problems:
        raise ValueError(f'--target_modules {",".join(target_modules)}: {"; ".join(problems)}. Layers that take '
                         f'adapters here: {", ".join(_short_names(modules))}.')


def _short_names(modules) -> List[str]:
    """The shortest name that picks each adaptable layer kind: to_q, to_out.0, conv1, proj_in ..."""
    names = set()
    for name, module in modules.items():
        if isinstance(module, ADAPTABLE):
            parts = name.split('.')
            start = next(i for i in range(len(parts) - 1, -1, -1) if not parts[i].isdigit())
            names.add('.'.join(parts[start:]))
    return sorted(names)


@contextlib.contextmanager
def lora_inputs_uncast(models: List[torch.nn.Module], autocast: bool):
    """Under ``autocast``, peft's LoRA layers keep their input's dtype rather than casting it to the adapter's fp32:
    autocast casts it straight back to bf16/fp16 for the adapter's matmul, so the round trip changes no number, but
    it costs two copies forward and two backward per bf16 input (to_out's, after attention, among them) in loops that
    the host's kernel launches bound. DoRA keeps the cast: its weight norm is computed in the input's dtype, so the
    cast makes it fp32. peft releases before 0.15 always cast."""
    try:
        from peft.helpers import disable_input_dtype_casting
    except ImportError:
        disable_input_dtype_casting = None
    dora = any(getattr(config, 'use_dora', False) for model in models
               for config in getattr(model, 'peft_config', {}).values())
    with contextlib.ExitStack() as stack:
        if autocast and not dora and disable_input_dtype_casting is not None:
            for model in models:
                stack.enter_context(disable_input_dtype_casting(model))
        yield


def has_lora(model) -> bool:
    return bool(getattr(model, 'peft_config', None))


def lora_state_dict(model) -> Dict[str, torch.Tensor]:
    """Adapter weights with peft's key names (``…to_q.lora_A.weight``), which diffusers loads as they are.
    (diffusers' ``convert_state_dict_to_diffusers`` renames linear layers but not convolutions, and a file
    mixing both styles loads only one of them.) CLIP keys keep the ``text_model.`` level that
    transformers >= 5.6 flattened away: the layout every diffusers version, kohya and A1111 read."""
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel
    state = get_peft_model_state_dict(model)
    if isinstance(model, CLIPTextModel):
        state = {k if k.startswith('text_model.') else 'text_model.' + k: v for k, v in state.items()}
    return state


def register_lora_checkpoint_hooks(accelerator, models: Dict[str, torch.nn.Module],
                                   metadata: Optional[Dict[str, str]] = None) -> None:
    """Checkpoints of LoRA runs hold the adapters (MBs), not the frozen base weights (GBs), in the file the run
    ends with: every ``checkpoint-N`` loads with ``lora_dir=``, to compare steps."""
    def role_of(model):
        unwrapped = accelerator.unwrap_model(model)
        return next((role for role, m in models.items() if m is unwrapped and has_lora(m)), None)

    def save_hook(hook_models, weights, output_dir):
        trained = {}
        for i in reversed(range(len(hook_models))):
            role = role_of(hook_models[i])
            if role is not None:
                trained[role] = accelerator.unwrap_model(hook_models[i])
                weights.pop(i)
        if trained and accelerator.is_main_process:
            save_lora(output_dir, trained['unet'], trained.get('text_encoder'), metadata=metadata)

    def load_hook(hook_models, input_dir):
        adapter = os.path.join(input_dir, LORA_WEIGHT_NAME)
        saved = load_file(adapter) if os.path.isfile(adapter) else None
        for i in reversed(range(len(hook_models))):
            model = accelerator.unwrap_model(hook_models[i])
            role = role_of(model)
            if role is None:
                continue
            if saved is None:  # written before checkpoints held the adapter file: one file per model
                state = load_file(os.path.join(input_dir, f'{role}_lora.safetensors'))
            else:
                state = adapter_part(saved, role)
            set_adapter_state(model, state, input_dir)
            hook_models.pop(i)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def set_adapter_state(model, state: Dict[str, torch.Tensor], source: str) -> None:
    """Adapter weights with peft's key names (as ``lora_state_dict`` writes them) into ``model``'s adapter."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    if not any(k.startswith('text_model.') for k in get_peft_model_state_dict(model)):
        state = {k.removeprefix('text_model.'): v for k, v in state.items()}  # see lora_state_dict
    result = set_peft_model_state_dict(model, state)
    if getattr(result, 'unexpected_keys', None):
        raise ValueError(f'{source}: adapter keys do not match this model: {result.unexpected_keys[:5]}')


def adapter_state(path: str, allow_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """A LoRA file or folder (diffusers/peft or kohya/A1111 keys; with ``allow_pickle`` also the ``.bin`` of
    ModelScope's old trainer, attention-processor keys of the UNet) as peft-named tensors under ``unet.`` and
    ``text_encoder.``, each module's alpha/rank scale folded into its up-projection: the same adapter at scale 1."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_peft
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    from modelscope_sd.lora import locate_adapter
    folder, name = locate_adapter(path, allow_pickle)  # refuses pickles, models, embeddings and LyCORIS by name
    state, alphas, adapter_config = StableDiffusionPipeline.lora_state_dict(folder, weight_name=name,
                                                                           return_lora_metadata=True)
    state, adapter_config = dict(state), adapter_config or {}
    if state and all('.processor.' in k for k in state):  # unet.save_attn_procs: the UNet's, without a prefix
        state = {'unet.' + k: v for k, v in state.items()}
    for key, alpha in (alphas or {}).items():  # kohya: an alpha per module
        down = key[:-len('.alpha')]
        if down in state:
            up = down.replace('.down.', '.up.')
            state[up] = state[up] * (float(alpha) / state[down].shape[0])
    out = {}
    for role, to_peft in (('unet', convert_unet_state_dict_to_peft), ('text_encoder', convert_state_dict_to_peft)):
        part = adapter_part(state, role)
        if not part:
            continue
        rank, alpha = adapter_config.get(f'{role}.r'), adapter_config.get(f'{role}.lora_alpha')
        scale = alpha / rank if rank and alpha and not alphas else 1.0  # diffusers' files record their alpha
        peft = part if any('.lora_A.' in k for k in part) else to_peft(part)  # ours and diffusers' are already
        out.update({f'{role}.{k}': v * scale if '.lora_B.' in k else v for k, v in peft.items()})
    return out


def adapter_part(state: Dict[str, torch.Tensor], role: str) -> Dict[str, torch.Tensor]:
    """The tensors of one model (``role``: 'unet' or 'text_encoder') in a whole-adapter state, without the prefix."""
    return {k[len(role) + 1:]: v for k, v in state.items() if k.startswith(role + '.')}


def adapter_modules(state: Dict[str, torch.Tensor], role: str) -> List[str]:
    """The module paths an adapter state holds weights for, e.g. 'down_blocks.0.attentions.0.….attn1.to_q'."""
    return sorted({k.split('.lora_')[0] for k in adapter_part(state, role)})


def training_metadata(config, base_model_dir: str, dataset: Optional[Dict[str, dict]] = None) -> Dict[str, str]:
    """What an output file records about how it was made (safetensors metadata is str → str); rank and alpha
    only for adapters, not for a full fine-tune's model; ``dataset``: `finetune.data.dataset_summary`."""
    settings = {k: v for k, v in asdict(config).items() if isinstance(v, (int, float, str, bool, type(None)))}
    metadata = {
        'modelscope_sd.base_model': str(config.pretrained_model_name_or_path),
        'modelscope_sd.base_model_revision': str(config.revision),
        'modelscope_sd.training': json.dumps(settings, sort_keys=True),
        'modelscope_sd.base_model_dir': str(base_model_dir),
    }
    if dataset is not None:
        metadata['modelscope_sd.dataset'] = json.dumps(dataset, ensure_ascii=False, sort_keys=True)
    if trains_lora(config):
        metadata['modelscope_sd.rank'] = str(getattr(config, 'rank', ''))
        metadata['modelscope_sd.alpha'] = str(getattr(config, 'lora_alpha', None) or getattr(config, 'rank', ''))
    return metadata


def kohya_file_name(config) -> Optional[str]:
    """The kohya/A1111 export's file name in output_dir (kohya's --output_name, else ours), or None without
    --export_kohya."""
    if not config.export_kohya:
        return None
    return config.output_name + '.safetensors' if config.output_name else KOHYA_WEIGHT_NAME


def save_lora(output_dir: str, unet, text_encoder=None, metadata: Optional[Dict[str, str]] = None,
              kohya_file: Optional[str] = None) -> str:
    """``pytorch_lora_weights.safetensors`` in diffusers' format (diffusers' own writer, so its adapter
    config travels in the metadata), plus our training metadata; written to a temporary name first.
    ``kohya_file``: also export it under this name, for A1111/ComfyUI."""
    from diffusers import StableDiffusionPipeline

    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=TEMP_PREFIX) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=lora_state_dict(unet),
            text_encoder_lora_layers=lora_state_dict(text_encoder) if text_encoder is not None and has_lora(
                text_encoder) else None,
            unet_lora_adapter_metadata=portable_config(unet.peft_config['default']),
            text_encoder_lora_adapter_metadata=(portable_config(text_encoder.peft_config['default'])
                                                if text_encoder is not None and has_lora(text_encoder) else None))
        path = os.path.join(output_dir, LORA_WEIGHT_NAME)
        _write_with_metadata(os.path.join(tmp, LORA_WEIGHT_NAME), path, metadata or {})
    if kohya_file:
        logger.info('kohya/A1111 file: %s', export_kohya_lora(path, os.path.join(output_dir, kohya_file)))
    return path


def portable_config(config) -> Dict[str, object]:
    """The adapter config for the file's metadata: the fields that differ from peft's defaults, and the rank, alpha
    and modules always. diffusers' loader hands every field to the reader's ``LoraConfig``, and an older peft has no
    field a newer one added (peft 0.21 fails on the astra_config that 0.22 writes), so a full dict would not load
    there; a left-out field takes the reader's default, which is the value it had."""
    from peft import LoraConfig
    default = LoraConfig().to_dict()
    return {key: value for key, value in config.to_dict().items()
            if key in ('r', 'lora_alpha', 'target_modules') or default.get(key) != value}


def _write_with_metadata(source: str, target: str, extra: Dict[str, str]) -> None:
    with safe_open(source, framework='pt') as f:
        metadata = dict(f.metadata() or {})
    save_safetensors(load_file(source), target, {**metadata, **extra})


def export_kohya_lora(diffusers_file: str, kohya_file: str) -> str:
    """diffusers-format adapter → kohya/A1111 keys (``lora_unet_…``/``lora_te_…`` with ``.alpha``)."""
    from diffusers.utils import convert_state_dict_to_kohya

    with safe_open(diffusers_file, framework='pt') as f:
        metadata = dict(f.metadata() or {})
    state = convert_state_dict_to_kohya(load_file(diffusers_file))  # our files hold peft key names
    # diffusers names the SD1.x text encoder like SDXL's first one; kohya and A1111 call it lora_te_
    state = {('lora_te_' + k[len('lora_te1_'):]) if k.startswith('lora_te1_') else k: v for k, v in state.items()}
    alpha = _adapter_alpha(metadata)
    if alpha is not None:  # convert_state_dict_to_kohya writes alpha = rank; keep the trained alpha
        for key in [k for k in state if k.endswith('.alpha')]:
            state[key] = torch.tensor(float(alpha))
    kept = {k: v for k, v in metadata.items() if k.startswith('modelscope_sd.')}
    return save_safetensors(state, kohya_file, {**kept, **kohya_metadata(metadata)})


def kohya_metadata(metadata: Dict[str, str]) -> Dict[str, str]:
    """kohya's ``ss_`` keys for what our metadata records: A1111's LoRA tab shows them, and tells SD2 adapters
    from SD1 ones by ``ss_v2`` (without it, any metadata reads as SD1). Empty when the base model's UNet config
    cannot be read (an adapter from elsewhere): A1111 then lists it as of unknown version, not as SD1."""
    unet_config = os.path.join(metadata.get('modelscope_sd.base_model_dir', ''), 'unet', 'config.json')
    if not os.path.isfile(unet_config):
        return {}
    with open(unet_config, encoding='utf-8') as f:  # SD2's UNet projects attention linearly, SD1's by 1x1 convs
        v2 = bool(json.load(f).get('use_linear_projection'))
    try:
        settings = json.loads(metadata.get('modelscope_sd.training', '{}'))
    except ValueError:
        settings = {}
    out = {'ss_network_module': 'networks.lora', 'ss_v2': str(v2),
           'ss_training_comment': settings.get('training_comment') or 'modelscope-sd',
           'ss_base_model_version': 'sd_v2' if v2 else 'sd_v1'}
    if metadata.get('modelscope_sd.rank'):
        out['ss_network_dim'] = metadata['modelscope_sd.rank']
    alpha = _adapter_alpha(metadata)
    if alpha is not None:
        out['ss_network_alpha'] = f'{alpha:g}'
    if metadata.get('modelscope_sd.base_model'):
        out['ss_sd_model_name'] = metadata['modelscope_sd.base_model']
    for ours, theirs in (('learning_rate', 'ss_learning_rate'), ('max_train_steps', 'ss_max_train_steps'),
                         ('seed', 'ss_seed'), ('clip_skip', 'ss_clip_skip')):
        if settings.get(ours) is not None:
            out[theirs] = str(settings[ours])
    if settings.get('resolution'):
        out['ss_resolution'] = f"({settings['resolution']}, {settings['resolution']})"
    try:  # kohya's dataset keys: civitai reads its trigger words from ss_tag_frequency
        dataset = json.loads(metadata.get('modelscope_sd.dataset', '{}'))
    except ValueError:
        dataset = {}
    if dataset.get('tag_frequency') is not None:
        out['ss_tag_frequency'] = json.dumps(dataset['tag_frequency'], ensure_ascii=False)
        out['ss_dataset_dirs'] = json.dumps(dataset['dataset_dirs'], ensure_ascii=False)
        out['ss_num_train_images'] = str(sum(d['n_repeats'] * d['img_count'] for d in dataset['dataset_dirs'].values()))
    if settings.get('output_name') or settings.get('output_dir'):  # the folder's name, also for --output_dir .
        out['ss_output_name'] = settings.get('output_name') or os.path.basename(os.path.abspath(settings['output_dir']))
    return out


def _adapter_alpha(metadata: Dict[str, str]) -> Optional[float]:
    value = metadata.get('modelscope_sd.alpha')
    try:
        return float(value) if value not in (None, '') else None
    except ValueError:
        return None


def import_kohya_lora(kohya_file: str, diffusers_file: str, allow_pickle: bool = False) -> str:
    """kohya/A1111 adapter (or, with ``allow_pickle``, ModelScope's old ``.bin``) → our diffusers/peft-key file.
    diffusers reads the kohya keys; each module's alpha/rank scale is folded into its up-projection, so the file
    needs no alpha to mean the same."""
    return save_safetensors(adapter_state(kohya_file, allow_pickle), diffusers_file)
