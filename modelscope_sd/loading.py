"""Where a Stable Diffusion model comes from: a ModelScope hub id, a local diffusers folder or a
single-file checkpoint. Everything here ends in a diffusers ``StableDiffusionPipeline``."""

import glob
import json
import logging
import os
import posixpath
import re
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Union

import torch

from .constants import (CONFIGURATION, DEFAULT_MODEL_ID, DEFAULT_MODEL_REVISION, HUB_CONFIG_PATTERNS,
                        HUB_IGNORE_PATTERNS, MODEL_INDEX, MODELSCOPE_CONFIGURATION, PICKLE_SUFFIXES)

logger = logging.getLogger(__name__)


class _IrrelevantAdvice(logging.Filter):
    """Drops one library message that gives our users advice they must not or need not follow; the messages
    are about nothing else:
    - transformers 5 loads the safety checker's image processor with PIL when torchvision is absent (as
      transformers 4 always did), and says to install torchvision, which breaks beside the CPU build of torch
      that the README pins;
    - bitsandbytes (for --use_8bit_adam), which diffusers imports while loading a model, says on a CPU to install
      `kernels` for a 4-bit CPU kernel nothing here runs;
    - diffusers says of every LoRA without text-encoder weights (the trainers' default) that it found none, to
      ignore that, or to open an issue; an adapter that matches nothing at all is refused by name instead."""

    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


for _name, _fragment in (('transformers.utils.import_utils', 'requires torchvision (not installed); falling back'),
                         ('bitsandbytes.backends.cpu.ops', 'Failed to load CPU gemm_4bit_forward'),
                         ('diffusers.loaders.lora_base', 'No LoRA keys associated to CLIPTextModel')):
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _IrrelevantAdvice) for f in _logger.filters):
        _logger.addFilter(_IrrelevantAdvice(_fragment))

REQUIRED_COMPONENTS = ('unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler')
CONFIG_FILES = {'unet': 'config.json', 'vae': 'config.json', 'text_encoder': 'config.json',
                'scheduler': 'scheduler_config.json'}
_INCOMPLETE = ('The download or copy probably stopped part way: delete the folder and download or copy it '
               'again.')
WEIGHTED_COMPONENTS = ('unet', 'vae', 'text_encoder')
WEIGHT_PATTERNS = ('*.safetensors', '*.bin', '*.index.json')  # a single file, a variant, or a sharded one's index
_HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')
_HUB_PAGE = re.compile(r'^https?://(?:www\.)?modelscope\.(?:cn|ai)/(?:models|datasets)/([A-Za-z0-9][\w.-]*/[\w.-]+)')
_DTYPES = {
    'fp16': torch.float16, 'float16': torch.float16, 'half': torch.float16,
    'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16,
    'fp32': torch.float32, 'float32': torch.float32, 'float': torch.float32,
}


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """ModelScope's convention: 'gpu', 'gpu:1', 'cuda:1', 'cpu'; 'gpu' without CUDA is Apple's GPU ('mps') where
    there is one, else the CPU (ModelScope's fallback). 'mps' names Apple's GPU."""
    if isinstance(device, torch.device):
        return device
    if device is None:
        device = 'gpu'
    if not isinstance(device, str):
        raise TypeError(f"device must be a str like 'gpu', 'cpu' or 'cuda:1', got {type(device).__name__}")
    mps = torch.backends.mps.is_available()
    if device.strip().lower() == 'mps':
        if not mps:
            raise ValueError("device='mps' names Apple's GPU, which this machine or torch build does not have "
                             "(torch.backends.mps.is_available() is False): use 'gpu' or 'cpu'.")
        return torch.device('mps')
    if device.strip().lower() == 'gpu' and mps and not torch.cuda.is_available():
        logger.info("device='gpu' without CUDA: running on Apple's GPU (mps).")
        return torch.device('mps')
    from modelscope.utils.device import create_device
    try:
        resolved = create_device(device)
    except (AssertionError, ValueError) as err:  # modelscope asserts on the device string, int() reads its number
        raise ValueError(f"device={device!r} is not valid: use 'gpu', 'gpu:N', 'cuda:N', 'mps' or 'cpu'.") from err
    if resolved.type == 'cuda' and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f'device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), '
                         f"numbered from 0: use 'gpu:0' to 'gpu:{torch.cuda.device_count() - 1}'.")
    return resolved


def resolve_dtype(torch_dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere (Apple's mps too, as diffusers' guide runs it), unless the caller says
    otherwise."""
    if torch_dtype is None:
        return torch.float16 if device.type == 'cuda' else torch.float32
    if isinstance(torch_dtype, torch.dtype) and torch_dtype in _DTYPES.values():
        return torch_dtype
    if isinstance(torch_dtype, str) and torch_dtype.lower().replace('torch.', '') in _DTYPES:
        return _DTYPES[torch_dtype.lower().replace('torch.', '')]
    raise ValueError(f'torch_dtype={torch_dtype!r} is not supported: use torch.float16, torch.bfloat16, '
                     f"torch.float32 or one of {sorted(_DTYPES)}.")


def is_hub_id(model: str) -> bool:
    return bool(_HUB_ID.match(model)) and not os.path.exists(model)


def resolve_model_dir(model: str, revision: Optional[str] = None, local_files_only: bool = False,
                      allow_patterns: Optional[Sequence[str]] = None, cache_dir: Optional[str] = None,
                      argument: str = 'model') -> str:
    """A local folder as is; a ModelScope hub id through ModelScope's download cache
    (``cache_dir``, by default ``MODELSCOPE_CACHE``). With ``local_files_only`` the hub is never asked; when the hub
    cannot be reached, the cached copy is used, as huggingface_hub does. ``argument``: the option that named it,
    for errors."""
    if os.path.isdir(model):
        return model
    if not is_hub_id(model):
        raise FileNotFoundError(f'{argument}={model!r}: no such file or folder{hub_id_hint(model)}. Pass a ModelScope '
                                f"model id such as '{DEFAULT_MODEL_ID}', a diffusers model folder, or a .safetensors "
                                'checkpoint file.')
    from modelscope.hub.snapshot_download import snapshot_download
    try:
        ignore = None if allow_patterns else hub_ignore_patterns(model, revision, local_files_only)
        return snapshot_download(
            model, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir,
            allow_file_pattern=list(allow_patterns) if allow_patterns else None, ignore_file_pattern=ignore)
    except Exception as err:  # the hub client's cache-miss error type differs across modelscope versions
        if local_files_only:
            raise FileNotFoundError(
                f'{argument}={model!r} (revision {revision!r}) is not in the ModelScope cache ({_cache(cache_dir)}) '
                'and local_files_only=True: download it once with network access, or pass a local folder.') from err
        status = hub_status(err)
        if status in (401, 403, 404):  # the hub's answer, which says the same for a private model as for none
            from modelscope.hub.api import HubApi
            raise FileNotFoundError(
                f"{argument}={model!r} (revision {revision!r}) is not on ModelScope's hub "
                f'({HubApi().endpoint}) or not open to you (HTTP '
                f'{status}): check the id (owner/name, as in the model page\'s address) and the revision, run '
                '`modelscope login` for a private model, or pass a local diffusers folder or a .safetensors '
                'file.') from err
        if not hub_unreachable(err):
            raise
        try:
            path = snapshot_download(model, revision=revision, local_files_only=True, cache_dir=cache_dir)
        except Exception:  # noqa: BLE001 (not cached: the network is the problem to report)
            raise ConnectionError(
                f"{argument}={model!r} (revision {revision!r}): ModelScope's hub could not be reached "
                f'({root_cause(err)}), and the model is not in the ModelScope cache ({_cache(cache_dir)}). Check '
                'the network connection (or MODELSCOPE_ENDPOINT), or pass a local diffusers folder or a .safetensors '
                'file.') from err
        logger.warning("ModelScope's hub could not be reached (%s): %s (revision %s) comes from the ModelScope "
                       'cache, %s. Pass local_files_only=True (--local_files_only) not to ask the hub.',
                       root_cause(err), model, revision, path)
        return path


def hub_unreachable(err: BaseException) -> bool:
    """Whether ``err``, or an error behind it, says the hub could not be reached (no network, no name resolution,
    refused, timed out), as opposed to an answer from the hub (no such model or revision, no permission)."""
    import socket

    import requests
    kinds = (ConnectionError, TimeoutError, socket.gaierror, requests.exceptions.ConnectionError,
             requests.exceptions.Timeout)
    return any(isinstance(error, kinds) for error in _chain(err))


def hub_status(err: BaseException) -> Optional[int]:
    """The HTTP status of the hub's answer behind ``err`` (404: no such model or revision), or None."""
    for error in _chain(err):
        response = getattr(error, 'response', None)
        status = getattr(error, 'status_code', None) or getattr(response, 'status_code', None)
        if isinstance(status, int):
            return status
    return None


def root_cause(err: BaseException) -> str:
    """The first error of ``err``'s chain, named: the hub client's own message runs to hundreds of characters."""
    *_, first = _chain(err)
    return f'{type(first).__name__}: {first}'


def _chain(err: BaseException):
    """``err``, then the errors it was raised from or while handling, back to the first."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _cache(cache_dir: Optional[str]) -> str:
    return cache_dir or os.environ.get('MODELSCOPE_CACHE', '~/.cache/modelscope')


def hub_ignore_patterns(model: str, revision: Optional[str], local_files_only: bool = False) -> List[str]:
    """What a hub download of a diffusers model can leave out: original checkpoints and non-EMA copies by name,
    and (when the hub's file list can be had) the weight files loading never reads."""
    return list(HUB_IGNORE_PATTERNS) + ([] if local_files_only else _unread_hub_files(model, revision))


def _unread_hub_files(model: str, revision: Optional[str]) -> List[str]:
    """`unread_weight_files` of the hub repo's file list; nothing when the list cannot be had (the download
    that follows then reports the problem, or fetches the whole repo as it always did)."""
    from modelscope.hub.api import HubApi
    try:
        files = HubApi().get_model_files(model, revision=revision, recursive=True)
    except Exception as err:  # noqa: BLE001 (any hub client failure: the listing is only an optimisation)
        if hub_unreachable(err):  # the download would wait out the same retries: on to the cache at once
            raise
        logger.debug('No file list for %s (%s): downloading every weight file.', model, err)
        return []
    return unread_weight_files([f['Path'] for f in files if f.get('Type') != 'tree'])


def unread_weight_files(paths: Sequence[str]) -> List[str]:
    """Repo files that loading never reads: pickle ``.bin`` weights in a folder that has ``.safetensors`` ones
    (diffusers and transformers read those), and ``.fp16.`` variants beside full-precision weights (we cast
    on load). SD1.5 repos carry all of them: several GB that need not be downloaded."""
    folders = defaultdict(list)
    for path in paths:
        folders[posixpath.dirname(path)].append(posixpath.basename(path))
    unread = []
    for folder, names in folders.items():
        plain = [n for n in names if n.count('.') == 1]  # model.safetensors, diffusion_pytorch_model.bin
        has_safetensors = any(n.endswith('.safetensors') for n in plain)
        has_full = any(n.endswith(('.safetensors', '.bin')) for n in plain)
        for name in names:
            if (has_safetensors and name.endswith('.bin')) or (has_full and '.fp16.' in name):
                unread.append(posixpath.join(folder, name))
    return unread


def check_safetensors(path: str) -> List[str]:
    """Read the header only: a truncated or garbled download fails here with the file named. Returns the keys."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework='pt') as f:
            return list(f.keys())
    except SafetensorError as err:
        raise ValueError(f'{path} is not a valid safetensors file ({err}). The download is probably '
                         'incomplete: delete the file and download it again.') from err


def hub_id_hint(model: str) -> str:
    """For a hub page's address or an id with a trailing slash: the hub id it names, as a hint for an error; for a
    path that starts with ``~`` (Python does not expand it, nor does a shell within quotes): the path it means."""
    if model.startswith('~') and os.path.exists(os.path.expanduser(model)):
        return f" ('~' is not expanded here: pass {os.path.expanduser(model)!r})"
    page = _HUB_PAGE.match(model)
    meant = page.group(1) if page else model.rstrip('/') if _HUB_ID.match(model.rstrip('/')) else None
    if meant:
        return f' (the hub id in it is {meant!r}: pass that)'
    return ' (a web address: pass the ModelScope id, owner/name)' if model.startswith(('http://', 'https://')) else ''


def check_not_a_part(model, argument: str = 'model') -> None:
    """Refuse a component folder such as ``unet/``, a file in one, or a folder's ``model_index.json`` by the model
    folder to pass instead (loaded as a folder or a file, each fails with a message about something else). A
    single-file checkpoint beside ``model_index.json`` (as SD1.5's repo holds one) is not a part."""
    whole = _model_part(os.fspath(model))
    if whole:
        raise ValueError(f'{argument}={os.fspath(model)!r} is a part of the diffusers model in {whole!r}: pass that '
                         'folder.')


def _model_part(path: str) -> Optional[str]:
    path = os.path.abspath(path)
    if not os.path.exists(path):
        return None
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, MODEL_INDEX)):
            return None
        candidates = [os.path.dirname(path)]
    else:
        folder = os.path.dirname(path)
        candidates = ([folder] if path.endswith(('.json', '.txt')) else []) + [os.path.dirname(folder)]
    return next((c for c in candidates if os.path.isfile(os.path.join(c, MODEL_INDEX))), None)


def check_model_dir(path: str) -> None:
    """A diffusers Stable Diffusion folder, or a clear error saying what is missing."""
    index_path = os.path.join(path, MODEL_INDEX)
    if not os.path.isfile(index_path):
        raise ValueError(
            f'model={path!r} is not a Stable Diffusion model folder: {MODEL_INDEX} is missing. Expected the '
            f"diffusers layout ({MODEL_INDEX}, {'/, '.join(REQUIRED_COMPONENTS)}/), as written by "
            "save_pretrained() or the trainers' output_dir; for a single checkpoint pass the .safetensors file.")
    try:
        with open(index_path, encoding='utf-8') as f:
            index = json.load(f)
    except ValueError as err:
        raise ValueError(f'model={path!r}: {MODEL_INDEX} is not valid JSON ({err}). {_INCOMPLETE}') from None
    missing = [name for name in REQUIRED_COMPONENTS
               if name not in index or not os.path.isdir(os.path.join(path, name))]
    if missing:
        raise ValueError(f'model={path!r} is not a complete Stable Diffusion model: missing {missing}.')
    absent = [f'{name}/{file}' for name, file in CONFIG_FILES.items()
              if not os.path.isfile(os.path.join(path, name, file))]
    absent += [f'weights in {name}/ (a .safetensors or .bin file)' for name in WEIGHTED_COMPONENTS
               if not any(glob.glob(os.path.join(path, name, pattern)) for pattern in WEIGHT_PATTERNS)]
    if absent:
        raise ValueError(f'model={path!r} has no {"; no ".join(absent)}. {_INCOMPLETE}')
    for weights in glob.glob(os.path.join(path, '*', '*.safetensors')):
        check_safetensors(weights)


def write_configuration(folder: str) -> str:
    """Add ModelScope's configuration.json to a diffusers folder, so that plain
    ``pipeline(task=Tasks.text_to_image_synthesis, model=folder)`` picks this package's pipeline."""
    check_model_dir(folder)
    path = os.path.join(folder, CONFIGURATION)
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(MODELSCOPE_CONFIGURATION, f, indent=2)
    return path


def load_pipeline(model, *, revision: Optional[str] = None, torch_dtype=None, device=None,
                  config: Optional[str] = None, allow_pickle: bool = False,
                  load_safety_checker: bool = True, local_files_only: bool = False,
                  use_safetensors: Optional[bool] = None):
    """Hub id, folder, single file or an existing diffusers pipeline → ``StableDiffusionPipeline``
    on ``device`` in ``torch_dtype``. ``use_safetensors=True`` (diffusers' and ModelScope's argument): a folder
    component or a single file without safetensors weights is an error, not loaded from ``.bin``/``.ckpt``."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    if use_safetensors not in (None, True):
        raise ValueError(f'use_safetensors={use_safetensors!r}: pickle weights are not preferred over .safetensors '
                         'here (a hub download skips .bin files that have .safetensors beside them). Leave it out; '
                         'a single .ckpt file loads with allow_pickle=True.')
    if use_safetensors and allow_pickle:
        raise ValueError('use_safetensors=True refuses the pickle files allow_pickle=True lets in: pass one of the two.')
    device = resolve_device(device)
    dtype = resolve_dtype(torch_dtype, device)
    if isinstance(model, DiffusionPipeline):
        pipe = StableDiffusionPipeline(**{k: v for k, v in model.components.items()
                                          if k in StableDiffusionPipeline._optional_components
                                          or k in REQUIRED_COMPONENTS},
                                       requires_safety_checker=False)
        for module in pipe.components.values():  # torch's to(): diffusers' warns of fp32-kept modules on any cast
            if isinstance(module, torch.nn.Module):
                torch.nn.Module.to(module, device, dtype)
        return pipe
    elif not isinstance(model, (str, os.PathLike)):
        raise TypeError(f'model must be a hub id, a folder or a file path (str), got {type(model).__name__}')
    check_not_a_part(model)
    if os.path.isfile(model):
        pipe = _load_single_file(os.fspath(model), config, allow_pickle, dtype, local_files_only)
    else:
        path = resolve_model_dir(os.fspath(model), revision, local_files_only)
        checkpoint = lone_checkpoint(path)
        if checkpoint is not None:  # a hub repo or folder that holds one original-layout checkpoint
            pipe = _load_single_file(checkpoint, config, allow_pickle, dtype, local_files_only)
        else:
            check_model_dir(path)
            extra = {} if load_safety_checker else {'safety_checker': None, 'requires_safety_checker': False}
            strict = {'use_safetensors': True} if use_safetensors else {}
            pipe = StableDiffusionPipeline.from_pretrained(path, **dtype_argument(dtype), **extra, **strict)
    return pipe.to(device)  # already in dtype


def dtype_argument(dtype: torch.dtype) -> Dict[str, torch.dtype]:
    """The dtype argument of diffusers' loaders: ``dtype`` since 0.40, as in transformers (``torch_dtype`` then
    warns on every load); ``torch_dtype`` before, which did not know ``dtype``."""
    import diffusers
    from packaging.version import Version
    return {'dtype' if Version(diffusers.__version__).release >= (0, 40) else 'torch_dtype': dtype}


def checkpoint_kind(keys: List[str]) -> str:
    """What a lone .safetensors file holds, by its keys: 'model' (original layout: the UNet under
    ``model.diffusion_model.``), 'lora', 'embedding', or 'unknown'. Users keep adapters and embeddings as lone
    files beside their models, named for where they go."""
    if any(k.startswith('model.diffusion_model.') for k in keys):
        return 'model'
    if any('lora' in k for k in keys):
        return 'lora'
    if len(keys) <= 2:  # emb_params, or A1111/SDXL embedding pairs
        return 'embedding'
    return 'unknown'


def _check_checkpoint_keys(path: str, keys: List[str]) -> None:
    kind = checkpoint_kind(keys)
    if kind == 'lora':
        raise ValueError(f'model={path!r} is a LoRA adapter, not a model: load a base model and pass '
                         f'lora_dir={path!r}.')
    if kind == 'embedding':
        raise ValueError(f'model={path!r} holds {keys}, as a textual-inversion embedding does, not a model: load a '
                         f'base model and pass textual_inversion={path!r}.')
    if kind == 'unknown':
        raise ValueError(f'model={path!r} holds no Stable Diffusion UNet weights (model.diffusion_model.*): it is '
                         'not an original-layout SD checkpoint.')


def lone_checkpoint(folder: str) -> Optional[str]:
    """The single-file checkpoint a folder without the diffusers layout holds (as community repos on the hub
    often do), or None. Several are refused by name: which one to load is the caller's choice."""
    if os.path.isfile(os.path.join(folder, MODEL_INDEX)):
        return None
    names = sorted(n for n in os.listdir(folder) if n.endswith(('.safetensors',) + PICKLE_SUFFIXES)
                   and os.path.isfile(os.path.join(folder, n)))
    safetensors = [n for n in names if n.endswith('.safetensors')]
    candidates = safetensors or names
    if len(candidates) > 1 and safetensors:  # beside a model, adapters and embeddings are not candidates
        models = [n for n in candidates if checkpoint_kind(check_safetensors(os.path.join(folder, n))) == 'model']
        candidates = models or candidates[:1]  # no model at all: the first says what it is instead
    if len(candidates) > 1:
        raise ValueError(f'model={folder!r} holds several checkpoints {candidates} and no {MODEL_INDEX}: pass the path '
                         'of the one to load.')
    return os.path.join(folder, candidates[0]) if candidates else None


def _load_single_file(path: str, config: Optional[str], allow_pickle: bool, dtype, local_files_only: bool):
    """An original (LDM-layout) checkpoint such as ``v1-5-pruned-emaonly.safetensors``. Component configs
    and the tokenizer come from ``config`` (a diffusers folder or hub id), by default the SD1.5 repo on
    ModelScope, of which only the small json/txt files are fetched."""
    from diffusers import StableDiffusionPipeline

    suffix = os.path.splitext(path)[1].lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ValueError(
                f'model={path!r} is a pickle checkpoint, and loading pickle can run arbitrary code. Use the '
                '.safetensors version of the checkpoint (e.g. v1-5-pruned-emaonly.safetensors), or pass '
                'allow_pickle=True if you trust this file.')
    elif suffix == '.safetensors':
        _check_checkpoint_keys(path, check_safetensors(path))
    else:
        raise ValueError(f'model={path!r}: single-file checkpoints must be .safetensors '
                         f'(or, with allow_pickle=True, one of {PICKLE_SUFFIXES}).')
    if config is None:
        config_dir = resolve_model_dir(DEFAULT_MODEL_ID, DEFAULT_MODEL_REVISION, local_files_only,
                                       allow_patterns=HUB_CONFIG_PATTERNS)
    else:
        config_dir = resolve_model_dir(config, None, local_files_only, allow_patterns=HUB_CONFIG_PATTERNS,
                                       argument='config')
    return StableDiffusionPipeline.from_single_file(
        path, config=config_dir, **dtype_argument(dtype), local_files_only=True,
        safety_checker=None, requires_safety_checker=False)
