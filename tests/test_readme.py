"""The README documents every option and the command CI runs."""

import dataclasses
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        return f.read()


@pytest.mark.parametrize('config', ['LoraTrainConfig', 'DreamBoothConfig'])
def test_every_trainer_flag_is_in_the_readme(config):
    import finetune.config as module
    readme = _readme()
    missing = [f.name for f in dataclasses.fields(getattr(module, config)) if f'`--{f.name}`' not in readme]
    assert missing == []


def test_every_call_option_and_pipeline_argument_is_in_the_readme():
    import inspect

    from modelscope_sd.pipeline import CALL_DEFAULTS, StableDiffusionText2ImagePipeline
    readme = _readme()
    arguments = [p for p in inspect.signature(StableDiffusionText2ImagePipeline.__init__).parameters
                 if p not in ('self', 'kwargs', 'trust_remote_code')]
    missing = [name for name in list(CALL_DEFAULTS) + arguments if f'`{name}`' not in readme]
    assert missing == []


def test_ci_runs_the_readme_test_command():
    readme = _readme()
    start = readme.index('## Start')
    commands = re.findall(r'```bash\n(.*?)```', readme[start:], re.S)[0].strip().splitlines()
    with open(os.path.join(ROOT, '.ci', 'run'), encoding='utf-8') as f:
        ci = f.read()
    assert commands[0].replace('pip install', 'python -m pip install --quiet') in ci
    assert commands[1] in ci


def test_readme_generate_commands_run_as_written(cached_model, fake_hub, tmp_path, monkeypatch):
    """Against the fake hub, whose AI-ModelScope/stable-diffusion-v1-5 is the tiny model."""
    import shlex

    from modelscope_sd.cli import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'prompts.txt').write_text('一只猫,油画\n', encoding='utf-8')
    lines = [line for line in _readme().splitlines() if line.startswith('modelscope-sd generate')]
    assert len(lines) == 4
    for line in lines:
        main(shlex.split(line, comments=True)[1:])  # as bash reads it
    assert sorted(os.listdir(tmp_path / 'outputs')) == sorted(['42.png', '43.png', '7.png'] +
                                                              [f'{seed}.png' for seed in range(100, 104)])
    import numpy as np
    from PIL import Image
    # made in a batch of two, re-made alone: a batch's arithmetic may round one value the other way
    first, again = (np.asarray(Image.open(tmp_path / d / '43.png')).astype(int) for d in ('outputs', 'again'))
    assert np.abs(first - again).max() <= 1


def test_every_scheduler_is_in_the_readme():
    from modelscope_sd.schedulers import ALIASES, SCHEDULERS
    readme = _readme()
    spelled = {name: [name] + [alias for alias, target in ALIASES.items() if target == name] for name in SCHEDULERS}
    assert [name for name, ways in spelled.items() if not any(f'`{way}`' in readme for way in ways)] == []


def test_requirements_txt_mirrors_install_requires():
    import configparser
    setup = configparser.ConfigParser()
    setup.read(os.path.join(ROOT, 'setup.cfg'))
    required = setup['options']['install_requires'].split()
    with open(os.path.join(ROOT, 'requirements.txt'), encoding='utf-8') as f:
        listed = [line.strip() for line in f if line.strip() and not line.startswith('#')]
    assert listed == required
