"""``fast=True, precompile=True``: each compiled function of the fast path kept whole on disk, per call signature,
so that a new process loads it instead of tracing the model again.

With warm inductor caches, `torch.compile` still runs dynamo over the model's Python code in every new process, and
only then finds its kernels on disk: 6.2-6.7 s of bytecode tracing for SD1.5's step, text encoder and decoder on our
2-core CPU, where a new process's first call took 21.2-21.7 s without precompile and 14.5-15.6 s with it. torch's AOT
precompile (``torch.compile(fullgraph=True).aot_compile``, experimental since torch 2.9)
writes dynamo's bytecode and guards, AOTAutograd's graph and inductor's kernels to one file, and
``torch.compiler.load_compiled_function`` reads it back.

torch cannot save guards on object identity (which class, which function code). The file name holds what those
stood for: the versions of torch, diffusers, transformers and this package, the source of the module defining the
function, the device, and each argument's shapes, dtypes and strides (a module's: its weights'). The guards that are
saved (every tensor's and weight's metadata, the modules' structure and attribute values, grad mode) are checked on
each call as dynamo checks them, and a call that fails them all compiles again.
"""

import hashlib
import inspect
import logging
import os
from typing import Any, Callable, Dict, List, Optional

import torch

logger = logging.getLogger(__name__)

MAX_LOADED = 16  # graphs of one function kept in memory (each size, batch and call signature makes one)


def _guard_is_savable(entry) -> bool:
    """Whether torch can write this guard to disk: not on globals, not on object identity."""
    from torch._dynamo.guards import CheckFunctionManager
    unsavable = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    return not (entry.is_global or entry.guard_type in unsavable or unsavable.intersection(entry.derived_guard_types)
                or getattr(entry.orig_guard, '_unserializable', False))


def savable_guards(entries) -> List[bool]:
    """``guard_filter_fn`` for ``torch.compile``: keep the guards torch can save."""
    return [_guard_is_savable(entry) for entry in entries]


def signature(value, module: Callable[[torch.nn.Module], Any]) -> Any:
    """What of a call's arguments a compiled graph is specialized on, as hashable plain data: each tensor's shape,
    dtype, strides and device, ``module(m)`` for each module, values of plain types, the type of anything else."""
    if torch.is_tensor(value):
        return 'tensor', tuple(value.shape), str(value.dtype), value.stride(), str(value.device)
    if isinstance(value, torch.nn.Module):
        return module(value)
    if isinstance(value, (tuple, list)):
        return type(value).__name__, tuple(signature(v, module) for v in value)
    if isinstance(value, dict):
        return 'dict', tuple(sorted((str(k), signature(v, module)) for k, v in value.items()))
    if isinstance(value, (int, float, bool, str, type(None))):
        return value
    return f'{type(value).__module__}.{type(value).__qualname__}'


def weights(module: torch.nn.Module) -> tuple:
    """A module as the file name sees it: its class, and its weights' and buffers' names, shapes, dtypes and strides."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return ('module', type(module).__module__, type(module).__qualname__,
            tuple((name, tuple(t.shape), str(t.dtype), t.stride()) for name, t in tensors))


def environment() -> Dict[str, Optional[str]]:
    """Library versions and device: a file compiled under others is never loaded."""
    import diffusers
    import transformers

    from . import __version__
    info = {'torch': torch.__version__, 'diffusers': diffusers.__version__, 'transformers': transformers.__version__,
            'modelscope_sd': __version__}
    if torch.cuda.is_available():
        info['cuda'] = f'{torch.cuda.get_device_name()} {torch.cuda.get_device_capability()} {torch.version.cuda}'
    return info


def _first_line(error: Exception) -> str:
    """``Type: message`` of an error, its first line (dynamo's explanations and hints run on for many)."""
    lines = str(error).strip().splitlines()
    return f'{type(error).__name__}: {lines[0][:300] if lines else ""}'


class PrecompiledFunction:
    """``fn`` compiled with ``mode`` once per call signature, saved under ``cache_dir`` and loaded from there in later
    processes. A signature torch cannot compile whole (a graph break) or read back once saved runs a plain
    ``torch.compile(fn, mode=mode, fullgraph=fullgraph)`` instead, with a warning saying why, and a note next to
    where its file would be keeps later processes from trying again; so does, in this process, one whose loaded
    graph fails its first call. The fast path keeps working; such a signature's second start is as slow as without
    precompile."""

    def __init__(self, fn: Callable, mode: str, cache_dir: str, fullgraph: bool = True):
        self.fn, self.mode, self.cache_dir, self.fullgraph = fn, mode, cache_dir, fullgraph
        from torch._inductor import list_mode_options
        self.options = list_mode_options(mode)  # e.g. {'triton.cudagraphs': True}
        self.loaded: List[Any] = []  # AOTCompiledFunction, the latest used first
        self.unsupported = set()  # signatures (modules by identity) that run the fallback
        self._fallback: Optional[Callable] = None
        source = inspect.getsource(inspect.getmodule(fn))
        self._code = hashlib.sha256(source.encode()).hexdigest()

    def __call__(self, *args, **kwargs):
        for i, compiled in enumerate(self.loaded):
            if compiled.guard_check(*args, **kwargs):
                if i:
                    self.loaded.insert(0, self.loaded.pop(i))
                return compiled(*args, **kwargs)
        key = signature((args, kwargs), id)
        if key not in self.unsupported:
            compiled = self._load_or_compile(args, kwargs)
            if compiled is not None:
                try:
                    result = compiled(*args, **kwargs)
                except Exception as error:  # experimental in torch: the plain compile keeps the fast path working
                    logger.warning('precompile=True: %s', self._fallback_message(
                        'its precompiled graph failed its first call', error))
                else:
                    self.loaded = [compiled] + self.loaded[:MAX_LOADED - 1]
                    return result
            self.unsupported.add(key)
        return self.fallback(*args, **kwargs)

    @property
    def fallback(self) -> Callable:
        """``fn`` under a plain ``torch.compile``, for the signatures that cannot be precompiled."""
        if self._fallback is None:
            self._fallback = torch.compile(self.fn, mode=self.mode, fullgraph=self.fullgraph)
        return self._fallback

    def __getstate__(self):
        # torch's precompile pickles the attributes of the modules a graph guards on, and fast=True's compiled forward
        # is one of them: a copy without graphs (their guard managers cannot be pickled), which nothing calls
        return {**self.__dict__, 'loaded': [], 'unsupported': set(), '_fallback': None}

    def _fallback_message(self, what: str, error: Exception) -> str:
        return (f'{self.fn.__name__} with these arguments: {what} ({_first_line(error)}); it is compiled in each '
                'process instead, as with precompile=False')

    def path(self, args, kwargs) -> str:
        """The file for this call's signature."""
        key = repr((self.fn.__module__, self.fn.__qualname__, self._code, self.mode, environment(),
                    signature((args, kwargs), weights)))
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        return os.path.join(self.cache_dir, f'{self.fn.__name__}-{digest}.bin')

    def _load_or_compile(self, args, kwargs):
        """The signature's graph, loaded or compiled (and saved), or None where it cannot be precompiled."""
        path = self.path(args, kwargs)
        note = f'{path}.unsupported'
        if os.path.exists(note):
            with open(note, encoding='utf-8') as f:
                logger.info('precompile=True: %s (noted by an earlier run in %s)', f.read(), note)
            return None
        compiled = self._load(path, args, kwargs)
        if compiled is not None:
            logger.info('Loaded the precompiled %s from %s.', self.fn.__name__, path)
            return compiled
        try:
            # torch 2.9-2.12 attach .aot_compile only under this flag (the GPU image's torch 2.11 among them); 2.13 sets
            # it by default
            with torch._dynamo.config.patch(enable_aot_compile=True):
                compiled = torch.compile(self.fn, fullgraph=True, dynamic=False,
                                         options={**self.options, 'guard_filter_fn': savable_guards}).aot_compile(
                    (args, kwargs))
        except Exception as error:  # torch's precompile is experimental: keep the fast path, say why it is slower
            return self._unsupported(note, self._fallback_message('cannot be precompiled', error))
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            partial = f'{path}.{os.getpid()}.partial'
            compiled.save_compiled_function(partial)
            os.replace(partial, path)  # another process never reads half a file
        except Exception as error:  # a full disk, a read-only folder, an object torch cannot save
            logger.warning('precompile=True: could not save %s to %s (%s); this process uses it, the next one '
                           'compiles again.', self.fn.__name__, path, _first_line(error))
            compiled.disable_guard_check()  # __call__ checks them before each call
            return compiled
        # what runs is what a later process loads: a file that does not load fails now, not in the next process
        try:
            return self._read(path)
        except Exception as error:
            os.remove(path)
            return self._unsupported(note, self._fallback_message('compiled, but its file does not load', error))

    def _unsupported(self, note: str, message: str) -> None:
        logger.warning('precompile=True: %s.', message)
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            with open(note, 'w', encoding='utf-8') as f:
                f.write(message)
        except OSError:  # the next process tries again, and warns again
            pass

    def _read(self, path):
        # the inductor options of the mode, CUDA graphs included, are applied as the graph is loaded
        with open(path, 'rb') as f, torch._inductor.config.patch(self.options):
            compiled = torch.compiler.load_compiled_function(f)
        compiled.disable_guard_check()  # __call__ checks them before each call
        return compiled

    def _load(self, path, args, kwargs):
        """The function saved at ``path`` if it loads and its guards hold for this call, else None."""
        if not os.path.exists(path):
            return None
        try:
            compiled = self._read(path)
        except Exception as error:
            logger.warning('precompile=True: could not load %s (%s); compiling again.', path, _first_line(error))
            return None
        if not compiled.guard_check(*args, **kwargs):
            logger.info('The precompiled %s at %s was compiled for another state of the model; compiling again.',
                        self.fn.__name__, path)
            return None
        return compiled
