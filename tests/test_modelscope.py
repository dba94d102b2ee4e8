"""ModelScope integration: the model card's snippet, registration, hub ids, local folders."""

import os
import shutil
import sys
import textwrap

import numpy as np
import pytest

BUILTIN_MODULE = 'modelscope.pipelines.multi_modal.diffusers_wrapped.stable_diffusion.stable_diffusion_pipeline'
MODEL_CARD_SNIPPET = textwrap.dedent('''
    import cv2, modelscope_sd                      # importing registers our pipeline
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    pipe = pipeline(task=Tasks.text_to_image_synthesis,
                    model='AI-ModelScope/stable-diffusion-v1-5', model_revision='v1.0.0')
    output = pipe({'text': '飞流直下三千尺,油画'})
    cv2.imwrite('result.png', output['output_imgs'][0])
''')


def test_model_card_snippet_word_for_word(cached_model, fake_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(MODEL_CARD_SNIPPET, 'model_card_snippet', 'exec'), namespace)
    import cv2
    from modelscope_sd import StableDiffusionText2ImagePipeline
    assert type(namespace['pipe']) is StableDiffusionText2ImagePipeline
    image = cv2.imread(str(tmp_path / 'result.png'))
    assert image.shape == (32, 32, 3) and image.std() > 0
    assert 'torchvision' not in sys.modules
    assert BUILTIN_MODULE not in sys.modules  # ModelScope's own SD pipeline was never imported
    # resolved through the (fake) hub's API against the cached snapshot, nothing downloaded again
    assert any('/openapi/v1/models/AI-ModelScope/stable-diffusion-v1-5' in r for r in fake_hub.requests)
    assert fake_hub.downloads() == []


def test_loading_does_not_advise_installing_torchvision_or_kernels(tiny_model_dir):
    """transformers 5 tells users without torchvision to install it; beside the pinned CPU torch it breaks.
    bitsandbytes (the test extra installs it), imported by diffusers on load, asks for `kernels` on a CPU."""
    import subprocess
    code = ('from modelscope_sd import StableDiffusionText2ImagePipeline; '
            f'StableDiffusionText2ImagePipeline({tiny_model_dir!r}, device="cpu")')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'torchvision' not in result.stderr and 'gemm_4bit' not in result.stderr


def test_builtin_pipeline_type_resolves_to_our_module():
    import modelscope_sd
    from modelscope.pipelines.builder import PIPELINES
    from modelscope.utils.import_utils import LazyImportModule
    from modelscope_sd.constants import BUILTIN_PIPELINE_NAME, PIPELINE_NAME, TASK
    index = LazyImportModule.get_ast_index()['index']
    for name in (BUILTIN_PIPELINE_NAME, PIPELINE_NAME):
        assert PIPELINES.get(name, group_key=TASK) is modelscope_sd.StableDiffusionText2ImagePipeline
        assert index[('PIPELINES', TASK, name)]['module'] == 'modelscope_sd.pipeline'


def test_local_folder_with_configuration_json(tiny_model_dir):
    import modelscope_sd
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    # use_safetensors=True, as ModelScope's SDXL model card passes it, reaches our loader
    pipe = pipeline(task=Tasks.text_to_image_synthesis, model=tiny_model_dir, device='cpu', use_safetensors=True)
    assert isinstance(pipe, modelscope_sd.StableDiffusionText2ImagePipeline)
    out = pipe({'text': 'a cat', 'num_inference_steps': 2, 'seed': 0})
    assert out['output_imgs'][0].shape == (32, 32, 3)


def test_local_folder_without_configuration_json_via_pipeline_name(tiny_model_dir, tmp_path):
    import modelscope_sd
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    folder = tmp_path / 'plain-diffusers'
    shutil.copytree(tiny_model_dir, folder)
    os.remove(folder / 'configuration.json')
    pipe = pipeline(task=Tasks.text_to_image_synthesis, model=str(folder), device='cpu',
                    pipeline_name=modelscope_sd.PIPELINE_NAME)
    assert isinstance(pipe, modelscope_sd.StableDiffusionText2ImagePipeline)


def test_extra_pipeline_kwargs_reach_our_class(tiny_model_dir):
    """ModelScope passes every extra keyword through; typos must fail, not vanish."""
    import modelscope_sd  # noqa: F401
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    with pytest.raises(ValueError, match="'lora_dri'.*lora_dir"):
        pipeline(task=Tasks.text_to_image_synthesis, model=tiny_model_dir, device='cpu', lora_dri='x')


def test_hub_download_into_an_empty_cache(fake_hub, tmp_path):
    """A cold cache downloads the repo through the hub API, then serves it offline."""
    from modelscope_sd.loading import resolve_model_dir
    cache = str(tmp_path / 'cold')
    before = len(fake_hub.downloads())
    path = resolve_model_dir('AI-ModelScope/stable-diffusion-v1-5', 'v1.0.0', cache_dir=cache)
    assert path.startswith(cache)
    assert os.path.isfile(os.path.join(path, 'unet', 'diffusion_pytorch_model.safetensors'))
    assert len(fake_hub.downloads()) - before >= 10
    requests = len(fake_hub.requests)
    assert resolve_model_dir('AI-ModelScope/stable-diffusion-v1-5', 'v1.0.0', local_files_only=True,
                             cache_dir=cache) == path
    assert len(fake_hub.requests) == requests  # offline: the hub was not asked


def test_hub_download_skips_weight_files_that_loading_never_reads(fake_hub, tiny_model_dir, tmp_path):
    """SD1.5's repo holds each component's weights up to four times (safetensors, pickle .bin, fp16 variants of
    both); only the full-precision safetensors are read, so only they are downloaded."""
    from modelscope_sd.loading import load_pipeline, resolve_model_dir, unread_weight_files
    repo = tmp_path / 'repo'
    shutil.copytree(tiny_model_dir, repo)
    unet = repo / 'unet' / 'diffusion_pytorch_model.safetensors'
    for twin in ('diffusion_pytorch_model.bin', 'diffusion_pytorch_model.fp16.safetensors'):
        shutil.copy(unet, repo / 'unet' / twin)
    os.makedirs(repo / 'extra')
    (repo / 'extra' / 'pytorch_model.bin').write_bytes(b'pickle-only folder: kept')
    fake_hub.add_repo('AI-ModelScope/sd-with-twins', str(repo))
    path = resolve_model_dir('AI-ModelScope/sd-with-twins', 'v1.0.0', cache_dir=str(tmp_path / 'cache'))
    assert sorted(os.listdir(os.path.join(path, 'unet'))) == ['config.json', 'diffusion_pytorch_model.safetensors']
    assert os.path.isfile(os.path.join(path, 'extra', 'pytorch_model.bin'))
    assert load_pipeline(path, device='cpu').unet is not None
    # a pickle-only component keeps its .bin; an fp16 variant is skipped only beside full weights
    assert unread_weight_files(['te/pytorch_model.bin', 'te/model.fp16.safetensors', 'vae/x.fp16.safetensors']) == [
        'te/model.fp16.safetensors']


def test_pipeline_downloads_only_what_loading_reads(fake_hub, tiny_model_dir, tmp_path, monkeypatch):
    """ModelScope's pipeline() fetches the hub repo before our class runs; SD1.5's repo carries original
    checkpoints and each weight file up to four times, tens of GB that the snippet must not download."""
    import modelscope_sd  # noqa: F401
    from modelscope.pipelines import builder, pipeline
    from modelscope.utils.constant import Tasks
    repo = tmp_path / 'repo'
    shutil.copytree(tiny_model_dir, repo)
    unet = repo / 'unet' / 'diffusion_pytorch_model.safetensors'
    unread = ['unet/diffusion_pytorch_model.bin', 'unet/diffusion_pytorch_model.fp16.safetensors',
              'v1-5-pruned-emaonly.safetensors', 'v1-5-pruned.ckpt', 'unet/diffusion_pytorch_model.non_ema.bin']
    for name in unread:
        shutil.copy(unet, repo / name)
    fake_hub.add_repo('AI-ModelScope/sd-full-repo', str(repo))
    monkeypatch.setenv('MODELSCOPE_CACHE', str(tmp_path / 'cache'))
    before = len(fake_hub.downloads())
    pipe = pipeline(task=Tasks.text_to_image_synthesis, model='AI-ModelScope/sd-full-repo',
                    model_revision='v1.0.0', device='cpu')
    fetched = ' '.join(fake_hub.downloads()[before:])
    assert 'diffusion_pytorch_model.safetensors' in fetched and 'model_index.json' in fetched
    assert not [name for name in unread if os.path.basename(name) in fetched]
    assert pipe('a cat', num_inference_steps=2, seed=0)['output_imgs'][0].shape == (32, 32, 3)
    # the caller's own ignore_file_pattern wins, and other pipelines' repos download as ModelScope always did
    monkeypatch.setenv('MODELSCOPE_CACHE', str(tmp_path / 'cache2'))
    path = builder.normalize_model_input('AI-ModelScope/sd-full-repo', 'v1.0.0', ignore_file_pattern=['*.ckpt'])
    assert os.path.isfile(os.path.join(path, 'unet', 'diffusion_pytorch_model.bin'))
    assert not os.path.exists(os.path.join(path, 'v1-5-pruned.ckpt'))
    other = tmp_path / 'other'
    shutil.copytree(repo, other)
    (other / 'configuration.json').write_text('{"framework": "pytorch", "task": "text-to-image-synthesis", '
                                              '"pipeline": {"type": "someone-elses-pipeline"}}')
    fake_hub.add_repo('someone/other', str(other))
    path = builder.normalize_model_input('someone/other', 'v1.0.0')
    assert all(os.path.isfile(os.path.join(path, name)) for name in unread)


def test_a_hub_repo_holding_one_checkpoint_loads_it(fake_hub, tiny_single_file, tiny_model_dir, sd_pipe,
                                                    tmp_path, monkeypatch):
    """Community models on the hub are often one original-layout .safetensors and a README, no diffusers layout."""
    import modelscope_sd
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    repo = tmp_path / 'repo'
    repo.mkdir()
    shutil.copy(tiny_single_file, repo / 'dreamy-v2.safetensors')
    (repo / 'README.md').write_text('a community model')
    fake_hub.add_repo('someone/dreamy-v2', str(repo))
    monkeypatch.setenv('MODELSCOPE_CACHE', str(tmp_path / 'cache'))
    pipe = pipeline(task=Tasks.text_to_image_synthesis, model='someone/dreamy-v2', model_revision='v1.0.0',
                    pipeline_name=modelscope_sd.PIPELINE_NAME, config=tiny_model_dir, device='cpu')
    args = dict(num_inference_steps=2, seed=0)
    got, expected = pipe('a cat', **args)['output_imgs'][0], sd_pipe('a cat', **args)['output_imgs'][0]
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    # the trainers say how to convert it; two checkpoints in one folder are the caller's choice
    from finetune.models import load_components
    with pytest.raises(ValueError, match='is a single-file checkpoint \\(dreamy-v2.safetensors\\).*convert-model'):
        load_components(str(repo), None)
    from train_helpers import make_random_lora
    make_random_lora(tiny_model_dir, str(tmp_path / 'lora'))  # an adapter beside the model is no second candidate
    shutil.copy(tmp_path / 'lora' / 'pytorch_lora_weights.safetensors', repo / 'dreamy-style-lora.safetensors')
    with pytest.raises(ValueError, match='is a single-file checkpoint \\(dreamy-v2.safetensors\\)'):
        load_components(str(repo), None)
    shutil.copy(tiny_single_file, repo / 'dreamy-v2-inpainting.safetensors')
    with pytest.raises(ValueError, match='holds several checkpoints.*pass the path of the one to load'):
        modelscope_sd.StableDiffusionText2ImagePipeline(str(repo), config=tiny_model_dir, device='cpu')


def test_offline_mode_without_cache_names_the_fix(fake_hub, tmp_path):
    from modelscope_sd.loading import resolve_model_dir
    with pytest.raises(FileNotFoundError, match='not in the ModelScope cache.*local_files_only=True'):
        resolve_model_dir('AI-ModelScope/stable-diffusion-v1-5', 'v1.0.0', local_files_only=True,
                          cache_dir=str(tmp_path / 'empty'))


def _unreachable_hub(monkeypatch, answer=None):
    """ModelScope's client as it fails without a network (a name that does not resolve, under requests'
    ConnectionError), or with ``answer``: the hub's own refusal. Returns the calls: 'list' for the file listing,
    then local_files_only of each download."""
    import importlib
    import socket

    import requests
    from modelscope.hub import api
    module = importlib.import_module('modelscope.hub.snapshot_download')  # the package's name is the function
    calls, real = [], module.snapshot_download

    def fail():
        if answer is not None:
            raise answer
        try:
            raise socket.gaierror(-2, 'Name or service not known')
        except socket.gaierror as err:
            raise requests.exceptions.ConnectionError("Failed to resolve 'modelscope.cn'") from err

    def snapshot_download(model, *args, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        return real(model, *args, local_files_only=True, **kwargs) if local_files_only else fail()

    monkeypatch.setattr(module, 'snapshot_download', snapshot_download)
    monkeypatch.setattr(api.HubApi, 'get_model_files', lambda *args, **kwargs: calls.append('list') or fail())
    return calls


def test_an_unreachable_hub_falls_back_to_the_cached_model_at_once(cached_model, monkeypatch, caplog):
    from modelscope_sd.loading import resolve_model_dir
    calls = _unreachable_hub(monkeypatch)
    with caplog.at_level('WARNING', logger='modelscope_sd.loading'):
        path = resolve_model_dir('AI-ModelScope/stable-diffusion-v1-5', 'v1.0.0')
    assert os.path.samefile(path, cached_model)
    assert calls == ['list', True]  # no download that would wait out the listing's retries again
    assert "hub could not be reached (gaierror: [Errno -2] Name or service not known): " \
           'AI-ModelScope/stable-diffusion-v1-5 (revision v1.0.0) comes from the ModelScope cache' in caplog.text


def test_an_unreachable_hub_without_a_cached_model_says_so_once(monkeypatch, tmp_path, capsys):
    from modelscope_sd.cli import main
    from modelscope_sd.loading import resolve_model_dir
    _unreachable_hub(monkeypatch)
    with pytest.raises(ConnectionError, match=r"model='AI-ModelScope/stable-diffusion-v1-5' \(revision 'v1.0.0'\): "
                                              r"ModelScope's hub could not be reached \(gaierror: \[Errno -2\] Name "
                                              r"or service not known\), and the model is not in the ModelScope "
                                              r'cache'):
        resolve_model_dir('AI-ModelScope/stable-diffusion-v1-5', 'v1.0.0', cache_dir=str(tmp_path / 'empty'))
    with pytest.raises(SystemExit) as exit:
        main(['generate', '--prompt', 'a', '--model', 'someone/never-downloaded', '--device', 'cpu'])
    assert exit.value.code == 2
    assert capsys.readouterr().err.startswith("modelscope-sd generate: error: model='someone/never-downloaded' ")


def test_the_hubs_own_refusal_is_not_taken_for_a_network_failure(cached_model, monkeypatch):
    from modelscope_sd.loading import resolve_model_dir
    calls = _unreachable_hub(monkeypatch, answer=ValueError('revision v9 does not exist'))
    with pytest.raises(ValueError, match='revision v9 does not exist'):
        resolve_model_dir('AI-ModelScope/stable-diffusion-v1-5', 'v9')
    assert calls == ['list', False]


def test_an_id_the_hub_does_not_have_is_one_error_naming_the_option(fake_hub, tiny_model_dir, tmp_path, capsys):
    from modelscope_sd import StableDiffusionText2ImagePipeline
    from modelscope_sd.cli import main
    from modelscope_sd.loading import resolve_model_dir
    with pytest.raises(FileNotFoundError, match=r"model='nobody/nothing' \(revision None\) is not on ModelScope's "
                                                r'hub .* \(HTTP 404\): check the id'):
        resolve_model_dir('nobody/nothing', cache_dir=str(tmp_path / 'cache'))
    with pytest.raises(FileNotFoundError, match=r"lora_dir='nobody/no-lora' \(revision None\) is not on"):
        StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', lora_dir='nobody/no-lora')
    with pytest.raises(SystemExit) as exit:
        main(['generate', '--prompt', 'a', '--model', 'nobody/nothing', '--device', 'cpu',
              '--output_dir', str(tmp_path)])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("modelscope-sd generate: error: model='nobody/nothing' (revision None) is not on ")


def test_our_class_resolves_hub_ids_itself_offline(cached_model, fake_hub):
    from modelscope_sd import StableDiffusionText2ImagePipeline
    requests = len(fake_hub.requests)
    pipe = StableDiffusionText2ImagePipeline('AI-ModelScope/stable-diffusion-v1-5', model_revision='v1.0.0',
                                             device='cpu', local_files_only=True, progress_bar=False)
    assert len(fake_hub.requests) == requests
    assert pipe('a', num_inference_steps=1, seed=0)['output_imgs'][0].shape == (32, 32, 3)


def test_write_configuration_makes_a_plain_folder_work_without_pipeline_name(tiny_model_dir, tmp_path):
    import modelscope_sd
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    folder = tmp_path / 'plain'
    shutil.copytree(tiny_model_dir, folder)
    os.remove(folder / 'configuration.json')
    modelscope_sd.write_configuration(str(folder))
    pipe = pipeline(task=Tasks.text_to_image_synthesis, model=str(folder), device='cpu')
    assert isinstance(pipe, modelscope_sd.StableDiffusionText2ImagePipeline)


def test_write_configuration_refuses_a_folder_that_is_not_a_model(tmp_path):
    import modelscope_sd
    with pytest.raises(ValueError, match='model_index.json is missing'):
        modelscope_sd.write_configuration(str(tmp_path))
