"""Command lines: one flag per config field (``config.py``), plus the flags of ModelScope's example scripts and
of kohya's sd-scripts (``kohya_flags.py``) mapped onto them, each mapping named in the log; never silently
dropped."""

import argparse
import dataclasses
import os
import re
import sys
import typing
from typing import Callable, Dict, List, Optional, Tuple

from . import kohya_flags


# ModelScope's example scripts (examples/pytorch/stable_diffusion/*/run_train_*.sh) use these flags.
# Each maps to a field, or is accepted and reported as meaningless here; never silently dropped.
def _work_dir(value):
    return {'output_dir': os.path.join(value, 'output')}


def _torch_type(value):
    table = {'float16': 'fp16', 'fp16': 'fp16', 'bfloat16': 'bf16', 'bf16': 'bf16', 'float32': 'no', 'fp32': 'no'}
    if value not in table:
        raise ValueError(f'--torch_type {value!r} is not one of {sorted(table)}.')
    return {'mixed_precision': table[value]}


def _save_ckpt_strategy(value):
    if value == 'by_epoch':
        return {'checkpointing_epochs': 1, 'checkpointing_steps': None}
    if value == 'by_step':
        return {}
    raise ValueError(f"--save_ckpt_strategy {value!r} must be 'by_epoch' or 'by_step'.")


MODELSCOPE_FLAGS = {
    'model': ('pretrained_model_name_or_path', None),
    'model_revision': ('revision', None),
    'work_dir': (None, _work_dir),
    'train_dataset_name': ('dataset_name', None),
    'max_epochs': (None, lambda v: {'num_train_epochs': int(v), 'max_train_steps': None}),
    'lora_rank': ('rank', int),
    'train.optimizer.lr': ('learning_rate', float),
    'torch_type': (None, _torch_type),
    'save_ckpt_strategy': (None, _save_ckpt_strategy),
    'logging_interval': ('logging_steps', int),
    'train.dataloader.workers_per_gpu': ('dataloader_num_workers', int),
    'evaluation.dataloader.workers_per_gpu': (None, None),
    'use_model_config': (None, None),
}
IGNORED_REASONS = {
    **kohya_flags.IGNORED_REASONS,
    'evaluation.dataloader.workers_per_gpu': 'validation loss is computed in the main process',
    'use_model_config': "there is no ModelScope trainer config to merge; every setting is a flag here",
}


def str2bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ('1', 'true', 'yes', 'y', 'on'):
        return True
    if value.lower() in ('0', 'false', 'no', 'n', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected true or false, got {value!r}')


# a usage line that lists the ~100 flags would bury each error message under it; --help lists them
USAGE = '%(prog)s [--FLAG VALUE ...]  (--help lists every flag)'


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, unless the help says it; the description (the trainer's docstring,
    with its example command lines) as written."""

    def _get_help_string(self, action):
        return action.help if 'default' in (action.help or '') else super()._get_help_string(action)


def build_parser(config_cls, description: str, extra_flags: Dict[str, tuple],
                 prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False, usage=USAGE,
                                     formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        kind = hints[f.name]
        base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
        if base is bool:  # --flag, or ModelScope's --flag true/false
            parser.add_argument(f'--{f.name}', type=str2bool, nargs='?', const=True, default=f.default,
                                help=f.metadata.get('help'))
        else:
            parser.add_argument(f'--{f.name}', type=f.metadata.get('parse') or base, default=f.default,
                                help=f.metadata.get('help'))
    groups = {False: parser.add_argument_group("ModelScope example flags (mapped onto the ones above)"),
              True: parser.add_argument_group("kohya's sd-scripts flags (mapped onto the ones above)")}
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for flag in extra_flags:
        if flag not in fields:
            valueless = {'nargs': '?', 'const': 'true'} if flag in kohya_flags.VALUELESS else {}
            groups[flag in kohya_flags.FLAGS].add_argument(f'--{flag}', dest=f'ms:{flag}', default=None,
                                                           metavar='VALUE', **valueless)
    for flag in kohya_flags.REFUSED:  # refused in parse_args, each with what to do instead
        if flag not in fields:
            parser.add_argument(f'--{flag}', dest=f'refused:{flag}', nargs='*', default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(config_cls, argv: Optional[List[str]], description: str,
               extra_flags: Optional[Dict[str, tuple]] = None, prog: Optional[str] = None) -> Tuple[object, List[str]]:
    """argv → (validated config, notes on each ModelScope or kohya flag that was mapped or ignored)."""
    extra_flags = {**MODELSCOPE_FLAGS, **kohya_flags.FLAGS} if extra_flags is None else extra_flags
    parser = build_parser(config_cls, description, extra_flags, prog)
    namespace = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    refused = [flag for flag in kohya_flags.REFUSED if namespace.get(f'refused:{flag}') is not None]
    if refused:  # all at once: a pasted kohya command line is fixed in one go
        parser.error('kohya flags that this trainer does not follow: ' + '; '.join(
            f'--{flag}: {kohya_flags.REFUSED[flag]}' for flag in refused) + '. Drop them to train here.')
    values = {k: v for k, v in namespace.items() if not k.startswith(('ms:', 'refused:'))}
    notes, given_as = [], {}
    for flag, (target, convert) in extra_flags.items():
        raw = namespace.get(f'ms:{flag}')
        if raw is None:
            continue
        if target is None and convert is None:
            notes.append(f'--{flag} {raw}: accepted, no effect here ({IGNORED_REASONS.get(flag, "not used")}).')
            continue
        try:
            mapped = convert(raw) if target is None else {target: convert(raw) if convert else raw}
        except ValueError as err:
            parser.error(str(err))
        values.update(mapped)
        given_as.update({key: f'--{flag} {raw}' for key in mapped})
        notes.append(f'--{flag} {raw} → ' + (', '.join(f'--{k} {v}' for k, v in mapped.items()) or 'as here'))
    try:
        return config_cls(**values), notes
    except (ValueError, FileNotFoundError) as err:  # a missing file or folder is one line too, not a traceback
        flags = [flag for key, flag in given_as.items() if re.search(rf'\b{key}\b', str(err))]
        parser.error(''.join(f'{flag}: ' for flag in flags) + str(err))  # the flag typed, then ours it set


def run_trainer(main: Callable, config_cls, argv: Optional[List[str]], description: str, prog: str):
    """A trainer's command line: flags → config → ``main(config, notes)``. A user error raised by this package's
    own checks while it runs (a bad dataset, images the VAE cannot encode) ends in one line, as a bad flag does;
    an error raised anywhere else keeps its traceback."""
    config, notes = parse_args(config_cls, argv, description, prog=prog)
    try:
        return main(config, notes)
    except (ValueError, FileNotFoundError, ConnectionError) as err:  # a bad dataset, a missing file, the hub
        if not _raised_by_own_checks(err):
            raise
        print(f'{prog}: error: {err}', file=sys.stderr)
        raise SystemExit(2) from None


def _raised_by_own_checks(err: BaseException) -> bool:
    """Whether ``err`` was raised in finetune/ or modelscope_sd/ (where errors are written for users)."""
    import modelscope_sd
    here = tuple(os.path.dirname(os.path.abspath(module.__file__)) + os.sep
                 for module in (sys.modules[__package__], modelscope_sd))
    trace = err.__traceback__
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    return trace is not None and os.path.abspath(trace.tb_frame.f_code.co_filename).startswith(here)
