"""Scheduler by name: the names people use in A1111/ComfyUI mapped onto diffusers classes."""

import difflib
import inspect
from typing import Any, Dict, Tuple, Union

import diffusers
from diffusers import SchedulerMixin

# name -> (diffusers class, overrides applied on top of the model's own scheduler config)
SCHEDULERS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    'pndm': ('PNDMScheduler', {}),
    'ddim': ('DDIMScheduler', {}),
    'ddpm': ('DDPMScheduler', {}),
    'euler': ('EulerDiscreteScheduler', {}),
    'euler_ancestral': ('EulerAncestralDiscreteScheduler', {}),
    'heun': ('HeunDiscreteScheduler', {}),
    'lms': ('LMSDiscreteScheduler', {}),
    'lms_karras': ('LMSDiscreteScheduler', {'use_karras_sigmas': True}),
    'dpm++_2m': ('DPMSolverMultistepScheduler', {}),
    'dpm++_2m_karras': ('DPMSolverMultistepScheduler', {'use_karras_sigmas': True}),
    'dpm++_2m_sde': ('DPMSolverMultistepScheduler', {'algorithm_type': 'sde-dpmsolver++'}),
    'dpm++_2m_sde_karras': ('DPMSolverMultistepScheduler', {
        'algorithm_type': 'sde-dpmsolver++', 'use_karras_sigmas': True}),
    'unipc': ('UniPCMultistepScheduler', {}),
    'dpm2': ('KDPM2DiscreteScheduler', {}),
    'dpm2_karras': ('KDPM2DiscreteScheduler', {'use_karras_sigmas': True}),
    'dpm2_ancestral': ('KDPM2AncestralDiscreteScheduler', {}),
    'dpm2_ancestral_karras': ('KDPM2AncestralDiscreteScheduler', {'use_karras_sigmas': True}),
}
# What makes a sampler the one it is. A model's own scheduler config may carry another's (one whose default is
# DPM++ 2M Karras has use_karras_sigmas): each named scheduler resets those its overrides do not set.
_SAMPLER_DEFAULTS = {'use_karras_sigmas': False, 'use_exponential_sigmas': False, 'use_beta_sigmas': False,
                     'algorithm_type': 'dpmsolver++'}
ALIASES = {'plms': 'pndm', 'euler_a': 'euler_ancestral', 'k_euler': 'euler',
           'k_euler_a': 'euler_ancestral', 'k_lms': 'lms', 'dpm_solver++': 'dpm++_2m', 'dpm2_a': 'dpm2_ancestral',
           'dpm2_a_karras': 'dpm2_ancestral_karras', 'k_dpm_2': 'dpm2', 'k_dpm_2_a': 'dpm2_ancestral'}


def normalize_scheduler_name(name: str) -> str:
    """'DPM++ 2M Karras', 'dpmpp-2m-karras' and 'dpm++_2m_karras' are one scheduler."""
    key = name.strip().lower().replace(' ', '_').replace('-', '_').replace('dpmpp', 'dpm++')
    return ALIASES.get(key, key)


def scheduler_names():
    return sorted(SCHEDULERS) + sorted(ALIASES)


def make_scheduler(scheduler: Union[str, SchedulerMixin], base_config) -> SchedulerMixin:
    """Build the named scheduler from the model's own scheduler config (betas, offsets, prediction type)."""
    if isinstance(scheduler, SchedulerMixin):
        return scheduler
    if not isinstance(scheduler, str):
        raise TypeError(f'scheduler must be a name (str) or a diffusers scheduler, got {type(scheduler).__name__}')
    key = normalize_scheduler_name(scheduler)
    if key not in SCHEDULERS:
        class_names = {cls: name for name, (cls, extra) in SCHEDULERS.items() if not extra}
        key = class_names.get(scheduler.strip(), key)  # diffusers class names work too
    if key not in SCHEDULERS:
        close = difflib.get_close_matches(key, scheduler_names(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ''
        raise ValueError(f"scheduler={scheduler!r} is not known.{hint} Allowed: {', '.join(scheduler_names())}.")
    class_name, overrides = SCHEDULERS[key]
    cls = getattr(diffusers, class_name)
    accepted = inspect.signature(cls.__init__).parameters
    resets = {k: v for k, v in _SAMPLER_DEFAULTS.items() if k in accepted}
    return cls.from_config(base_config, **{**resets, **overrides})
