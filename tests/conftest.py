"""Session fixtures: one tiny random SD model, a ModelScope cache holding it under the model card's id,
and a hub stand-in on 127.0.0.1 so ``pipeline(model='AI-ModelScope/...')`` runs offline."""

import os
import shutil
import sys
import tempfile

# ModelScope reads these when it is imported and when it resolves models: set them before any test
# module imports modelscope, so no test can touch the real cache or the real hub.
_SESSION_DIR = tempfile.mkdtemp(prefix='modelscope_sd_tests_')
os.environ['MODELSCOPE_CACHE'] = os.path.join(_SESSION_DIR, 'modelscope_cache')
os.environ.setdefault('TQDM_DISABLE', '1')
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

from hub_server import FakeHub  # noqa: E402
from tiny_sd import build_tiny_sd  # noqa: E402

MODEL_ID = 'AI-ModelScope/stable-diffusion-v1-5'
REVISION = 'v1.0.0'


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)  # the tiny model, its cache copy and single file: ~14 MB a run


@pytest.fixture(scope='session')
def tiny_model_dir():
    """A complete diffusers folder with configuration.json, as the hub repo has it."""
    return build_tiny_sd(os.path.join(_SESSION_DIR, 'tiny-sd'))


@pytest.fixture(scope='session')
def fake_hub(tiny_model_dir):
    hub = FakeHub().start()
    hub.add_repo(MODEL_ID, tiny_model_dir)
    os.environ['MODELSCOPE_ENDPOINT'] = hub.endpoint
    yield hub
    hub.stop()


@pytest.fixture(scope='session')
def cached_model(tiny_model_dir, fake_hub):
    """The tiny model already in the ModelScope cache under the model card's id and revision."""
    snapshot = os.path.join(os.environ['MODELSCOPE_CACHE'], 'models',
                            MODEL_ID.replace('/', '--'), 'snapshots', REVISION)
    if not os.path.isdir(snapshot):
        shutil.copytree(tiny_model_dir, snapshot, ignore=shutil.ignore_patterns('.*'))
    return snapshot


@pytest.fixture(scope='session')
def sd_pipe(tiny_model_dir):
    """Our pipeline on the tiny model, CPU fp32, shared by tests that only call it."""
    from modelscope_sd import StableDiffusionText2ImagePipeline
    return StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False)


@pytest.fixture(scope='module')
def fast_pipe(sd_pipe):
    """Our pipeline over the same weights, routed through the whole-step loop (eager: no compile on CPU); one per
    test module."""
    from modelscope_sd import StableDiffusionText2ImagePipeline
    from modelscope_sd.fast import WholeStepDenoiser
    pipe = StableDiffusionText2ImagePipeline(sd_pipe.sd, device='cpu', progress_bar=False)
    pipe.denoiser = WholeStepDenoiser(pipe.sd)
    return pipe


@pytest.fixture(scope='session')
def vanilla_pipe(tiny_model_dir):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope='session')
def tiny_single_file(vanilla_pipe):
    """The tiny model as one original-layout checkpoint, like v1-5-pruned-emaonly.safetensors."""
    import torch

    from modelscope_sd.single_file import save_single_file
    path = os.path.join(_SESSION_DIR, 'tiny-sd-pruned-emaonly.safetensors')
    if not os.path.exists(path):
        save_single_file(vanilla_pipe, path, dtype=torch.float32)
    return path


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps process-wide state; each in-process training run starts from scratch."""
    from train_helpers import reset_accelerate
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture
def diffusers_caplog(caplog):
    """caplog that also hears diffusers, whose loggers have a handler of their own and do not propagate."""
    import logging
    library = logging.getLogger('diffusers')
    library.addHandler(caplog.handler)
    yield caplog
    library.removeHandler(caplog.handler)
