"""Scheduler by name: the names people use in A1111/ComfyUI mapped onto diffusers classes."""

import difflib
import functools
import inspect
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import diffusers
import torch
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
    'dpm++_2m_sde_heun': ('DPMSolverMultistepScheduler', {'algorithm_type': 'sde-dpmsolver++', 'solver_type': 'heun'}),
    'unipc': ('UniPCMultistepScheduler', {}),
    'dpm2': ('KDPM2DiscreteScheduler', {}),
    'dpm2_karras': ('KDPM2DiscreteScheduler', {'use_karras_sigmas': True}),
    'dpm2_ancestral': ('KDPM2AncestralDiscreteScheduler', {}),
    'dpm2_ancestral_karras': ('KDPM2AncestralDiscreteScheduler', {'use_karras_sigmas': True}),
    'dpm++_sde': ('DPMSolverSDEScheduler', {}),
    'dpm++_sde_karras': ('DPMSolverSDEScheduler', {'use_karras_sigmas': True}),
}
# What makes a sampler the one it is. A model's own scheduler config may carry another's (one whose default is
# DPM++ 2M Karras has use_karras_sigmas): each named scheduler resets those its overrides do not set.
_SAMPLER_DEFAULTS = {'use_karras_sigmas': False, 'use_exponential_sigmas': False, 'use_beta_sigmas': False,
                     'algorithm_type': 'dpmsolver++'}
# and those of one class: UniPC takes a solver_type too, of its own kind (bh1, bh2)
_CLASS_DEFAULTS = {'DPMSolverMultistepScheduler': {'solver_type': 'midpoint'}}
# A1111's schedule types (1.9+ writes them apart from the sampler) as diffusers' sigma options: each sampler whose
# diffusers class takes the option is also named with its suffix ('euler_karras', 'dpm++_2m_sde_exponential')
SCHEDULE_TYPES = {'karras': 'use_karras_sigmas', 'exponential': 'use_exponential_sigmas', 'beta': 'use_beta_sigmas'}
# (kohya's --sample_sampler names among them)
ALIASES = {'plms': 'pndm', 'euler_a': 'euler_ancestral', 'k_euler': 'euler',
           'k_euler_a': 'euler_ancestral', 'k_lms': 'lms', 'dpm_solver++': 'dpm++_2m', 'dpmsolver++': 'dpm++_2m',
           'dpm2_a': 'dpm2_ancestral', 'dpm2_a_karras': 'dpm2_ancestral_karras', 'k_dpm_2': 'dpm2', 'dpm_2': 'dpm2',
           'k_dpm_2_a': 'dpm2_ancestral', 'dpm_2_a': 'dpm2_ancestral'}


class DPMSolverSDEScheduler(diffusers.DPMSolverSDEScheduler):
    """diffusers' DPM++ SDE, with its Brownian-tree noise made on the CPU from one seed per image, as A1111 does
    (`image_seeds`, set per call by the pipeline). diffusers' own draws a random seed per call, so its images
    change from run to run whatever the generator, and makes the tree on the latents' device, whose random
    numbers differ from the CPU's. Here an image is the one its seed makes alone, on any device."""

    image_seeds: Optional[List[int]] = None

    def brownian_noise(self, sample: torch.Tensor) -> Callable[[float, float], torch.Tensor]:
        """The noise sampler for latents like ``sample`` over this call's sigmas: (sigma, sigma_next) → noise on
        ``sample``'s device and dtype, the same for each image as a call of that image alone would draw."""
        from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler  # needs torchsde
        low, high = float(self.sigmas[self.sigmas > 0].min()), float(self.sigmas.max())
        seeds = self.image_seeds
        if seeds is not None and len(seeds) != sample.shape[0]:
            raise ValueError(f'{len(seeds)} image seeds for a batch of {sample.shape[0]} latents.')
        tree = BrownianTreeNoiseSampler(torch.zeros(sample.shape, dtype=torch.float32), low, high,
                                        None if seeds is None else list(seeds))

        def noise(sigma, sigma_next):
            with warnings.catch_warnings():  # torchsde rounds the tree's ends to 6 digits, then clamps the
                warnings.filterwarnings('ignore', 'Should have t', UserWarning)  # queries past them, and says so
                return tree(float(sigma), float(sigma_next)).to(sample.device, sample.dtype)
        return noise

    def step(self, model_output, timestep, sample, return_dict: bool = True, s_noise: float = 1.0):
        if self.noise_sampler is None:  # set_timesteps clears it: one tree per call, built at its first step
            self.noise_sampler = self.brownian_noise(sample)
        return super().step(model_output, timestep, sample, return_dict=return_dict, s_noise=s_noise)


def image_seeds(generator, count: int) -> List[int]:
    """The seed of each of a call's ``count`` images: each generator's own (the pipeline's are seed + i), or
    for one generator shared by the batch, its seed + i."""
    if isinstance(generator, Sequence):
        return [g.initial_seed() for g in generator]
    return [generator.initial_seed() + i for i in range(count)]


def seeded(scheduler: SchedulerMixin, generator, count: int) -> SchedulerMixin:
    """``scheduler`` for a call of ``count`` images: DPM++ SDE's Brownian noise then comes from each image's seed."""
    if isinstance(scheduler, DPMSolverSDEScheduler):
        scheduler.image_seeds = image_seeds(generator, count)
    return scheduler


def normalize_scheduler_name(name: str) -> str:
    """'DPM++ 2M Karras', 'dpmpp-2m-karras' and 'dpm++_2m_karras' are one scheduler, and so are 'DPM2 a
    Exponential' and 'dpm2_ancestral_exponential'."""
    key = name.strip().lower().replace(' ', '_').replace('-', '_').replace('dpmpp', 'dpm++')
    if key in ALIASES:
        return ALIASES[key]
    base, _, suffix = key.rpartition('_')
    return f'{ALIASES[base]}_{suffix}' if suffix in SCHEDULE_TYPES and base in ALIASES else key


@functools.lru_cache(maxsize=None)
def named_schedulers() -> Dict[str, Tuple[str, Dict[str, Any]]]:
    """`SCHEDULERS`, plus each of them with a schedule type's suffix where its diffusers class takes that sigma
    option and the sampler sets none itself."""
    named = dict(SCHEDULERS)
    for name, (class_name, overrides) in SCHEDULERS.items():
        if any(option in overrides for option in SCHEDULE_TYPES.values()):
            continue
        accepted = inspect.signature(getattr(diffusers, class_name).__init__).parameters
        for suffix, option in SCHEDULE_TYPES.items():
            if option in accepted:
                named.setdefault(f'{name}_{suffix}', (class_name, {**overrides, option: True}))
    return named


def scheduler_names():
    return sorted(named_schedulers()) + sorted(ALIASES)


def scheduler_name(scheduler: Union[str, SchedulerMixin]) -> str:
    """Our name for a call's scheduler option, or for a scheduler object (the model's own): the named one whose
    class and sampler settings it has, else its class name."""
    if isinstance(scheduler, str):
        return normalize_scheduler_name(scheduler)
    for name, (class_name, overrides) in named_schedulers().items():
        settings = _settings(class_name, overrides)
        if class_name == type(scheduler).__name__ and all(scheduler.config.get(k, v) == v for k, v in settings.items()):
            return name
    return type(scheduler).__name__


def make_scheduler(scheduler: Union[str, SchedulerMixin], base_config, argument: str = 'scheduler') -> SchedulerMixin:
    """Build the named scheduler from the model's own scheduler config (betas, offsets, prediction type);
    ``argument``: the option that named it, for errors."""
    if type(scheduler) is diffusers.DPMSolverSDEScheduler:  # the same sampler, with noise its seeds decide
        return DPMSolverSDEScheduler.from_config(scheduler.config)
    if isinstance(scheduler, SchedulerMixin):
        return scheduler
    if not isinstance(scheduler, str):
        raise TypeError(f'{argument} must be a name (str) or a diffusers scheduler, got {type(scheduler).__name__}')
    key, named = normalize_scheduler_name(scheduler), named_schedulers()
    if key not in named:
        class_names = {cls: name for name, (cls, extra) in SCHEDULERS.items() if not extra}
        key = class_names.get(scheduler.strip(), key)  # diffusers class names work too
    if key not in named:
        close = difflib.get_close_matches(key, scheduler_names(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ''
        raise ValueError(f"{argument}={scheduler!r} is not known.{hint} Allowed: {', '.join(sorted(SCHEDULERS))} "
                         f"(each also with _{', _'.join(SCHEDULE_TYPES)} where diffusers' class has that schedule), "
                         f"and {', '.join(sorted(ALIASES))}.")
    class_name, overrides = named[key]
    cls = DPMSolverSDEScheduler if class_name == 'DPMSolverSDEScheduler' else getattr(diffusers, class_name)
    accepted = inspect.signature(cls.__init__).parameters
    return cls.from_config(base_config, **{k: v for k, v in _settings(class_name, overrides).items() if k in accepted})


def _settings(class_name: str, overrides: Dict[str, Any]) -> Dict[str, Any]:
    """All that makes a named sampler the one it is: its overrides over the defaults it resets."""
    return {**_SAMPLER_DEFAULTS, **_CLASS_DEFAULTS.get(class_name, {}), **overrides}


def check_scheduler_name(name: str, place: str = '', argument: str = 'scheduler') -> None:
    """Refuse a scheduler name the pipeline does not take, before any model loads (``place``: where it was named,
    ``argument``: the option that named it). Whether a name is known does not depend on the model's config."""
    try:
        make_scheduler(name, diffusers.PNDMScheduler().config, argument)
    except ValueError as err:
        raise ValueError(f'{place}{err}') from None
