"""LoRA adapters on the pipeline side: find, load (diffusers/peft or kohya/A1111 files), weigh, fuse."""

import glob
import math
import numbers
import os
import warnings
from typing import List, Sequence, Tuple, Union

from .constants import LORA_WEIGHT_NAME, MODEL_INDEX, PICKLE_SUFFIXES
from .loading import check_safetensors, checkpoint_kind, is_hub_id, resolve_model_dir
from .lycoris import KINDS as LYCORIS_KINDS
from .lycoris import LycorisError, load_lycoris, lycoris_kind

LEGACY_WEIGHT_NAMES = ('pytorch_lora_weights.bin',)  # ModelScope's old trainer wrote this pickle


def locate_adapter(path: str, allow_pickle: bool = False, lycoris: bool = False,
                   argument: str = 'lora_dir') -> Tuple[str, str]:
    """``lora_dir`` (a folder, a .safetensors file or a ModelScope hub id) → (folder, weight file name). Pickle
    files (ModelScope's old trainer wrote ``pytorch_lora_weights.bin``) only with ``allow_pickle``; LyCORIS LoHa
    and LoKr files only with ``lycoris`` (the pipeline loads them; the trainers and converters do not). Errors name
    ``argument``: the pipeline's ``lora_dir``, the trainers' ``network_weights``, convert-lora's ``input``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f'{argument} must be a path or a list of paths, got {type(path).__name__}')
    path = os.fspath(path)
    given = f'{argument}={path!r}'
    if os.path.isfile(path):
        folder, name = os.path.split(os.path.abspath(path))
    elif os.path.isdir(path) or is_hub_id(path):
        folder = resolve_model_dir(path, argument=argument)
        if os.path.isfile(os.path.join(folder, MODEL_INDEX)) and not os.path.isfile(os.path.join(folder, LORA_WEIGHT_NAME)):
            raise ValueError(f'{given} is a whole Stable Diffusion model ({MODEL_INDEX}), not a LoRA adapter: load '
                             "it as the model (the pipeline's model=, the trainers' --pretrained_model_name_or_path).")
        name = _pick_weight_file(folder, given, argument)
    else:
        raise FileNotFoundError(f'{given}: no such file or folder.')
    if name.endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            raise ValueError(f'{given} holds a pickle file ({name}), which can run code when loaded. '
                             'Pass allow_pickle=True (on the command line --allow_pickle) if you trust it (diffusers '
                             'reads the attention-processor format of ModelScope\'s old trainer), or convert it to '
                             '.safetensors.')
        return folder, name
    keys = check_safetensors(os.path.join(folder, name))
    _refuse_full_checkpoint(given, path, keys)
    _refuse_lycoris(given, keys, allowed=set(LYCORIS_KINDS.values()) if lycoris else ())
    return folder, name


def _refuse_full_checkpoint(given: str, path: str, keys: List[str]) -> None:
    """A single-file model (A1111's ``model.diffusion_model.…`` keys, no LoRA keys) or an embedding is not an
    adapter."""
    kind = checkpoint_kind(keys)
    if kind == 'model' and not any('lora' in k for k in keys):
        raise ValueError(f'{given} is a whole single-file model checkpoint, not a LoRA adapter: load it '
                         'as the model, pipeline(task=..., model=..., pipeline_name=modelscope_sd.PIPELINE_NAME).')
    if kind == 'embedding':
        raise ValueError(f'{given} holds {keys}, as a textual-inversion embedding does, not a LoRA '
                         f'adapter: pass it as textual_inversion={path!r}.')


# LyCORIS adapter types (common on civitai) by a key suffix each has; diffusers loads LoRA and LoCon only, the
# pipeline LoHa and LoKr too (`lycoris.KINDS`)
LYCORIS_TYPES = {**LYCORIS_KINDS, '.on_input': '(IA)^3', '.a1.weight': 'GLoRA', '.oft_blocks': 'OFT',
                 '.oft_diag': 'OFT'}


def _refuse_lycoris(given: str, keys: List[str], allowed: Sequence[str] = ()) -> None:
    found = sorted({kind for k in keys for suffix, kind in LYCORIS_TYPES.items() if k.endswith(suffix)})
    if found and not set(found) <= set(allowed):
        loads = 'LoRA, LoCon, LoHa and LoKr' if allowed else 'LoRA and LoCon'
        raise ValueError(f'{given} is a LyCORIS {"/".join(found)} adapter; {loads} files load here. '
                         'Merge it into a model with LyCORIS or kohya\'s tools and load that model, or use a LoRA '
                         'version of the adapter.')


def _pick_weight_file(folder: str, given: str, argument: str) -> str:
    if os.path.isfile(os.path.join(folder, LORA_WEIGHT_NAME)):
        return LORA_WEIGHT_NAME
    candidates = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, '*.safetensors')))
    if len(candidates) == 1:
        return candidates[0]
    legacy = [n for n in LEGACY_WEIGHT_NAMES if os.path.isfile(os.path.join(folder, n))]
    if legacy:
        return legacy[0]
    if not candidates:
        raise FileNotFoundError(f'{given} holds no LoRA adapter: expected {LORA_WEIGHT_NAME} (or one '
                                f'.safetensors file). Point {argument} at a training output_dir or an adapter file.')
    raise ValueError(f'{given} holds several .safetensors files {candidates}: pass the path of the one to load.')


def a1111_names(lora_dir) -> List[str]:
    """What A1111's ``<lora:name:weight>`` tags call each adapter of ``lora_dir``: a file's name without its
    extension, a folder's name, or a hub id's name."""
    if lora_dir is None:
        return []
    paths = list(lora_dir) if isinstance(lora_dir, (list, tuple)) else [lora_dir]
    names = []
    for path in map(os.fspath, paths):
        base = os.path.basename(os.path.normpath(path))
        names.append(os.path.splitext(base)[0] if os.path.isfile(path) else base)
    return names


def check_scales(scales, adapters: Sequence[str]) -> List[float]:
    """One finite number for all adapters, or one per adapter."""
    def is_scale(value):
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if is_scale(scales):
        return [float(scales)] * len(adapters)
    if isinstance(scales, (list, tuple)) and len(scales) == len(adapters) and all(is_scale(s) for s in scales):
        return [float(s) for s in scales]
    raise ValueError(f'lora_scale={scales!r} must be a finite number or a list of {len(adapters)} numbers '
                     f'(one per adapter in lora_dir).')


def load_adapters(pipe, lora_dir, lora_scale: Union[float, Sequence[float]] = 1.0, fuse: bool = False,
                  allow_pickle: bool = False) -> List[str]:
    """Load each adapter of ``lora_dir`` under its own name and weigh them; ``fuse`` merges them into the
    base weights (no per-step LoRA cost, scales fixed). Returns the adapter names, empty when fused."""
    if lora_dir is None:
        return []
    paths = list(lora_dir) if isinstance(lora_dir, (list, tuple)) else [lora_dir]
    if not paths:
        raise ValueError('lora_dir is an empty list: pass a path, a list of paths, or None.')
    names = [f'lora_{i}' for i in range(len(paths))]
    scales = check_scales(lora_scale, names)
    for name, path in zip(names, paths):
        folder, weight_name = locate_adapter(path, allow_pickle, lycoris=True)
        weights = os.path.join(folder, weight_name)
        pickled = weight_name.endswith(PICKLE_SUFFIXES)
        try:
            with warnings.catch_warnings():  # peft warns on every adapter after the first; several are the point here
                warnings.filterwarnings('ignore', message='Already found a `peft_config` attribute')
                if not pickled and lycoris_kind(check_safetensors(weights)):
                    load_lycoris(pipe, weights, name)  # its errors name the layer and what does not fit
                elif pickled:
                    pipe.load_lora_weights(_read_pickled_adapter(weights), adapter_name=name)
                else:
                    pipe.load_lora_weights(folder, weight_name=weight_name, adapter_name=name)
        except LycorisError:
            raise
        except (RuntimeError, ValueError, KeyError) as err:
            raise ValueError(f'lora_dir={path!r} could not be loaded into this model: {err}. An adapter only '
                             'fits the base model family it was trained on (SD1.x here).') from err
        if not _has_adapter(pipe, name):
            raise ValueError(f'lora_dir={path!r}: {weight_name} holds no LoRA weights for this model '
                             '(no UNet or text-encoder keys matched).')
        _check_finite(pipe, name, path)
    pipe.set_adapters(names, adapter_weights=scales)
    if fuse:
        pipe.fuse_lora(adapter_names=names)
        pipe.unload_lora_weights()  # the deltas are in the base weights now
        return []
    return names


def _read_pickled_adapter(path: str) -> dict:
    """A pickle adapter the caller allowed. ModelScope's old trainer saved ``unet.save_attn_procs()``: UNet keys
    in the attention-processor format, without the ``unet.`` prefix that diffusers now loads by."""
    import torch
    state = torch.load(path, map_location='cpu', weights_only=True)
    if not any(k.startswith(('unet.', 'text_encoder.', 'lora_unet_', 'lora_te_')) for k in state):
        state = {f'unet.{k}': v for k, v in state.items()}
    return state


def _has_adapter(pipe, name: str) -> bool:
    return any(name in getattr(model, 'peft_config', {}) for model in (pipe.unet, pipe.text_encoder))


def nonfinite(named) -> List[str]:
    """The names of the (name, tensor) pairs of ``named`` whose floating-point values hold NaN or inf: what a
    diverged training leaves in its adapter."""
    return [key for key, tensor in named if tensor.is_floating_point() and not bool(tensor.isfinite().all())]


def _check_finite(pipe, name: str, path) -> None:
    """Adapter ``name``'s weights as loaded, all finite: one NaN makes every image it touches black (NaN)."""
    weights = [(key, param) for model in (pipe.unet, pipe.text_encoder)
               for key, param in model.named_parameters() if name in key.split('.')]
    broken = nonfinite(weights)
    if broken:
        raise ValueError(f'lora_dir={path!r} holds NaN or inf in {len(broken)} of its {len(weights)} weights (e.g. '
                         f'{broken[0].replace(f".{name}", "")}): the training that wrote it diverged, and every image '
                         'would come out black. Load an earlier checkpoint of that training.')


def set_scales(pipe, adapters: Sequence[str], scales: Union[float, Sequence[float]]) -> None:
    pipe.set_adapters(list(adapters), adapter_weights=check_scales(scales, adapters))
