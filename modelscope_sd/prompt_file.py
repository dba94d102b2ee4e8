"""Prompt files, which the trainers' --sample_prompts and generate's --prompt_file read. A .txt file holds one
prompt a line, each with kohya's sample options ('a dog --n blurry --w 512 --h 768 --d 42 --l 7 --s 28 --ss
euler_a') or written as A1111's "Prompts from file" script writes a line ('--prompt "a dog" --steps 28
--sampler_name "DPM++ 2M Karras"'); '#' starts a comment line. kohya's .json (a list of lines or of objects) and
.toml ([prompt] defaults, [[prompt.subset]] entries) files name the options with its keys. Every value is checked
on reading, so a bad line fails before a model loads."""

import json
import math
import os
import shlex
from typing import Any, Dict, List

from .files import read_text
from .prompts import check_syntax
from .schedulers import check_scheduler_name

# kohya's options (a .txt line's ' --x VALUE', a .json/.toml entry's key) → diffusers' argument names
LINE_OPTIONS = {'n': 'negative_prompt', 'w': 'width', 'h': 'height', 'd': 'seed', 'l': 'guidance_scale',
                's': 'num_inference_steps', 'ss': 'scheduler'}
FILE_KEYS = {'prompt': 'prompt', 'negative_prompt': 'negative_prompt', 'width': 'width', 'height': 'height',
             'seed': 'seed', 'scale': 'guidance_scale', 'sample_steps': 'num_inference_steps',
             'sample_sampler': 'scheduler'}
# A1111's "Prompts from file or textbox" line options → diffusers' names
A1111_OPTIONS = {'prompt': 'prompt', 'negative_prompt': 'negative_prompt', 'seed': 'seed', 'steps': 'num_inference_steps',
                 'cfg_scale': 'guidance_scale', 'width': 'width', 'height': 'height', 'sampler_name': 'scheduler'}
_KINDS = {'width': int, 'height': int, 'seed': int, 'num_inference_steps': int, 'guidance_scale': float}


def read_prompt_file(path: str, name: str = 'prompt_file') -> List[Dict[str, Any]]:
    """Each prompt of the file as the options of a call: {'prompt': ..., and those of 'negative_prompt', 'width',
    'height', 'seed', 'guidance_scale', 'num_inference_steps', 'scheduler' that it sets}. ``name``: the argument
    that named the file, for errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{name}={path!r}: no such file.')
    ext = os.path.splitext(path)[1].lower()
    if ext in ('.yaml', '.yml'):
        raise ValueError(f'{name}={path!r}: a .txt file (one prompt a line), or a .json or .toml file as kohya '
                         'writes them; YAML is not read.')
    text = read_text(path, name)
    if ext == '.json':
        entries = list(enumerate(_json_list(path, name, text), 1))
    elif ext == '.toml':
        entries = list(enumerate(_toml_entries(path, name, text), 1))
    else:  # .txt, or any other name: lines of text
        entries = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
                   if line.strip() and not line.lstrip().startswith('#')]
    if not entries:
        raise ValueError(f'{name}={path!r} holds no prompt.')
    where = 'entry' if ext in ('.json', '.toml') else 'line'
    return [_entry(f'{name}={path!r} {where} {n}', entry) for n, entry in entries]


def _json_list(path, name, text: str) -> list:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f'{name}={path!r} is not valid JSON: {err}') from None
    if not isinstance(data, list):
        raise ValueError(f'{name}={path!r}: a JSON list of prompts (strings, or objects with a "prompt").')
    return data


def _toml_entries(path, name, text: str) -> list:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise ValueError(f'{name}={path!r}: .toml needs Python 3.11 (tomllib); use a .txt or .json file.') from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f'{name}={path!r} is not valid TOML: {err}') from None
    table = data.get('prompt')
    if not isinstance(table, dict) or not isinstance(table.get('subset'), list):
        raise ValueError(f"{name}={path!r}: kohya's TOML layout is a [prompt] table of defaults and "
                         '[[prompt.subset]] entries, each with a prompt.')
    defaults = {k: v for k, v in table.items() if k != 'subset'}
    return [{**defaults, **subset} for subset in table['subset']]


def _entry(place: str, entry) -> Dict[str, Any]:
    """A .txt line or a .json/.toml entry → a call's options, each value checked and named with its place."""
    if isinstance(entry, str) and entry.startswith('--') and entry[2:].split(' ')[0].lower() not in LINE_OPTIONS:
        values = _a1111_line(place, entry)
    elif isinstance(entry, str):
        text, *options = (' ' + entry).split(' --')  # a line that starts with kohya's options has no prompt
        values = {'prompt': text.strip()}
        for option in options:
            key, _, value = option.strip().partition(' ')
            if key.lower() not in LINE_OPTIONS:
                raise ValueError(f"{place}: --{key} is not an option here; kohya's options are "
                                 f"{', '.join('--' + k for k in LINE_OPTIONS)} (a prompt's own ' --' needs no "
                                 'space before it).')
            values[LINE_OPTIONS[key.lower()]] = value.strip()
    elif isinstance(entry, dict):
        unknown = sorted(set(entry) - set(FILE_KEYS) - {'enum'})
        if unknown:
            raise ValueError(f"{place}: {unknown} not known; kohya's keys are {', '.join(FILE_KEYS)}.")
        values = {FILE_KEYS[k]: v for k, v in entry.items() if k in FILE_KEYS}
    else:
        raise ValueError(f'{place}: a prompt string or an object with a "prompt", not {type(entry).__name__}.')
    if not isinstance(values.get('prompt'), str) or not values['prompt'].strip():
        raise ValueError(f'{place} has no prompt.')
    for key in ('prompt', 'negative_prompt'):
        if values.get(key) is not None:
            check_syntax(f'{place} {key}', str(values[key]))
    return _typed(place, values)


def _a1111_line(place: str, line: str) -> Dict[str, Any]:
    """'--prompt "a dog" --steps 28 ...', as A1111's "Prompts from file or textbox" script reads a line."""
    try:
        words = shlex.split(line)
    except ValueError as err:  # an unclosed quote
        raise ValueError(f'{place}: {err} (A1111\'s line format quotes values with spaces: --prompt "a dog").') \
            from None
    values = {}
    for i in range(0, len(words), 2):
        key = words[i][2:] if words[i].startswith('--') else None
        if key not in A1111_OPTIONS:
            raise ValueError(f"{place}: {words[i]!r} is not one of the options read from A1111's line format "
                             f"({', '.join('--' + k for k in A1111_OPTIONS)}); quote values with spaces.")
        if i + 1 == len(words):
            raise ValueError(f'{place}: --{key} has no value.')
        values[A1111_OPTIONS[key]] = words[i + 1]
    if values.get('seed') in ('-1', '-1.0'):  # A1111's random seed
        del values['seed']
    return values


def _typed(place: str, values: dict) -> dict:
    typed = dict(values)
    for key, kind in _KINDS.items():
        if key not in values:
            continue
        try:
            typed[key] = kind(values[key])
        except (TypeError, ValueError):
            raise ValueError(f'{place}: {key}={values[key]!r} is not a{"n integer" if kind is int else " number"}.'
                             ) from None
    for key in ('width', 'height'):
        if key in typed and (typed[key] <= 0 or typed[key] % 8):
            raise ValueError(f'{place}: {key}={typed[key]} must be a positive multiple of 8 (e.g. 512).')
    if typed.get('num_inference_steps', 1) < 1:
        raise ValueError(f'{place}: num_inference_steps={typed["num_inference_steps"]} must be >= 1.')
    if typed.get('seed', 0) < 0:
        raise ValueError(f'{place}: seed={typed["seed"]} must be >= 0.')
    if not math.isfinite(typed.get('guidance_scale', 0.0)) or typed.get('guidance_scale', 0.0) < 0:
        raise ValueError(f'{place}: guidance_scale={typed["guidance_scale"]} must be a number >= 0 (7.5 is usual).')
    if typed.get('scheduler') is not None:
        typed['scheduler'] = str(typed['scheduler'])
        check_scheduler_name(typed['scheduler'], f'{place}: ')
    if typed.get('negative_prompt') is not None:
        typed['negative_prompt'] = str(typed['negative_prompt'])
    return typed
