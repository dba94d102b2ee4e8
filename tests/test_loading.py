"""Model sources and their failures: folders, files, dtypes."""

import copy
import os
import re
import shutil

import pytest
import torch

from modelscope_sd import StableDiffusionText2ImagePipeline
from modelscope_sd.loading import resolve_device, resolve_dtype


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match='no such file or folder'):
        StableDiffusionText2ImagePipeline(str(tmp_path / 'nope'), device='cpu')


@pytest.mark.parametrize('model, meant', [
    ('https://modelscope.cn/models/AI-ModelScope/stable-diffusion-v1-5/summary', "'AI-ModelScope/stable-diffusion-v1-5'"),
    ('owner/some-model/', "'owner/some-model'"),
])
def test_a_model_pages_address_or_an_id_with_a_trailing_slash_names_the_id(model, meant):
    with pytest.raises(FileNotFoundError, match=re.escape(f'no such file or folder (the hub id in it is {meant}: pass '
                                                          'that)')):
        StableDiffusionText2ImagePipeline(model, device='cpu')


def test_a_path_from_the_home_folder_names_the_path_it_means(tiny_model_dir, tmp_path, monkeypatch):
    """Python does not expand '~' (nor does a shell within quotes)."""
    monkeypatch.setenv('HOME', os.path.dirname(tiny_model_dir))
    given = '~/' + os.path.basename(tiny_model_dir)
    with pytest.raises(FileNotFoundError, match=re.escape(f"model={given!r}: no such file or folder ('~' is not "
                                                          f"expanded here: pass {tiny_model_dir!r})")):
        StableDiffusionText2ImagePipeline(given, device='cpu')


@pytest.mark.parametrize('part', ['unet', 'unet/config.json', 'unet/diffusion_pytorch_model.safetensors',
                                  'model_index.json'])
def test_a_part_of_a_diffusers_model_names_the_folder_to_pass(tiny_model_dir, part):
    """A component folder held one .safetensors, so it read as a single-file checkpoint 'with no UNet weights'."""
    import os

    from finetune.models import load_components
    path = os.path.join(tiny_model_dir, part)
    with pytest.raises(ValueError, match=re.escape(f'model={path!r} is a part of the diffusers model in '
                                                   f'{tiny_model_dir!r}: pass that folder.')):
        StableDiffusionText2ImagePipeline(path, device='cpu')
    with pytest.raises(ValueError, match=re.escape(f'pretrained_model_name_or_path={path!r} is a part of')):
        load_components(path, None)


def test_a_single_file_beside_a_models_index_loads_as_that_file(tiny_model_dir, tiny_single_file, tmp_path, sd_pipe):
    """SD1.5's hub repo holds v1-5-pruned-emaonly.safetensors beside model_index.json: a file to pass by name."""
    folder = tmp_path / 'model'
    shutil.copytree(tiny_model_dir, folder)
    shutil.copy(tiny_single_file, folder / 'v1-5-pruned-emaonly.safetensors')
    pipe = StableDiffusionText2ImagePipeline(str(folder / 'v1-5-pruned-emaonly.safetensors'), config=tiny_model_dir,
                                             device='cpu', progress_bar=False)
    assert pipe.sd.unet.config.in_channels == sd_pipe.sd.unet.config.in_channels


def test_folder_that_is_not_a_sd_model(tmp_path):
    (tmp_path / 'readme.txt').write_text('hello')
    with pytest.raises(ValueError, match='not a Stable Diffusion model folder: model_index.json is missing'):
        StableDiffusionText2ImagePipeline(str(tmp_path), device='cpu')


def test_folder_missing_a_component(tiny_model_dir, tmp_path):
    folder = tmp_path / 'model'
    shutil.copytree(tiny_model_dir, folder)
    shutil.rmtree(folder / 'vae')
    with pytest.raises(ValueError, match=r"missing \['vae'\]"):
        StableDiffusionText2ImagePipeline(str(folder), device='cpu')


def test_a_model_folder_without_weights_configs_or_a_whole_index_is_named_as_an_incomplete_copy(tiny_model_dir, tmp_path):
    """Before: diffusers' 'Error no file named diffusion_pytorch_model.bin found in directory', after loading half."""
    folder = tmp_path / 'model'
    shutil.copytree(tiny_model_dir, folder)
    (folder / 'unet' / 'diffusion_pytorch_model.safetensors').unlink()
    (folder / 'scheduler' / 'scheduler_config.json').unlink()
    with pytest.raises(ValueError, match=re.escape(f"model='{folder}' has no scheduler/scheduler_config.json; no "
                                                   'weights in unet/ (a .safetensors or .bin file). The download or '
                                                   'copy probably stopped part way')):
        StableDiffusionText2ImagePipeline(str(folder), device='cpu')
    (folder / 'model_index.json').write_text('{"_class_name": ')
    with pytest.raises(ValueError, match=re.escape(f"model='{folder}': model_index.json is not valid JSON (Expecting "
                                                   'value: line 1 column 17 (char 16)). The download or copy')):
        StableDiffusionText2ImagePipeline(str(folder), device='cpu')


def test_use_safetensors_refuses_a_component_saved_as_bin_which_loads_by_default(tiny_model_dir, tmp_path):
    """ModelScope's and diffusers' examples pass use_safetensors=True: it is taken, and means what it does there."""
    from diffusers import UNet2DConditionModel
    folder = tmp_path / 'model'
    shutil.copytree(tiny_model_dir, folder)
    unet = UNet2DConditionModel.from_pretrained(folder / 'unet')
    (folder / 'unet' / 'diffusion_pytorch_model.safetensors').unlink()
    unet.save_pretrained(folder / 'unet', safe_serialization=False)
    with pytest.raises(OSError, match='no file named diffusion_pytorch_model.safetensors'):
        StableDiffusionText2ImagePipeline(str(folder), device='cpu', use_safetensors=True)
    StableDiffusionText2ImagePipeline(str(folder), device='cpu')  # .bin weights load with torch's weights_only
    StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', use_safetensors=True)
    with pytest.raises(ValueError, match='use_safetensors=False: pickle weights are not preferred'):
        StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', use_safetensors=False)
    with pytest.raises(ValueError, match='pass one of the two'):
        StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', use_safetensors=True, allow_pickle=True)


def test_corrupt_safetensors_names_the_file(tiny_model_dir, tmp_path):
    folder = tmp_path / 'model'
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / 'unet' / 'diffusion_pytorch_model.safetensors'
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    with pytest.raises(ValueError, match='diffusion_pytorch_model.safetensors is not a valid safetensors file'):
        StableDiffusionText2ImagePipeline(str(folder), device='cpu')


def test_pickle_single_file_is_refused_with_the_safetensors_alternative(tmp_path):
    ckpt = tmp_path / 'v1-5-pruned-emaonly.ckpt'
    torch.save({'state_dict': {}}, ckpt)
    with pytest.raises(ValueError, match=r'pickle.*\.safetensors.*allow_pickle=True'):
        StableDiffusionText2ImagePipeline(str(ckpt), device='cpu')


def test_unknown_single_file_suffix(tmp_path):
    weights = tmp_path / 'model.onnx'
    weights.write_bytes(b'x')
    with pytest.raises(ValueError, match='must be .safetensors'):
        StableDiffusionText2ImagePipeline(str(weights), device='cpu')


def test_device_convention(monkeypatch):
    assert resolve_device('cpu') == torch.device('cpu')
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)
        assert resolve_device('gpu') == torch.device('cpu')  # ModelScope's fallback
        with pytest.raises(ValueError, match="device='mps' names Apple's GPU, which this machine"):
            resolve_device('mps')
        # a Mac: 'gpu' (the default) is its GPU, not the CPU; mps keeps fp32 unless asked
        monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: True)
        assert resolve_device('gpu') == resolve_device('mps') == resolve_device(' MPS ') == torch.device('mps')
        assert resolve_device('cpu') == torch.device('cpu')
        assert resolve_dtype(None, torch.device('mps')) == torch.float32
        with pytest.raises(ValueError, match="not offered on Apple's mps"):
            StableDiffusionText2ImagePipeline('unused', device='mps', fast=True)
    with pytest.raises(ValueError, match="use 'gpu', 'gpu:N', 'cuda:N', 'mps' or 'cpu'"):
        resolve_device('tpu')


def test_dtype_defaults_and_names():
    assert resolve_dtype(None, torch.device('cuda', 0)) == torch.float16
    assert resolve_dtype(None, torch.device('cpu')) == torch.float32
    assert resolve_dtype('bf16', torch.device('cpu')) == torch.bfloat16
    assert resolve_dtype(torch.float16, torch.device('cpu')) == torch.float16


def test_torch_dtype_override_on_cpu(tiny_model_dir, tiny_single_file, recwarn):
    for model in (tiny_model_dir, tiny_single_file):
        pipe = StableDiffusionText2ImagePipeline(model, device='cpu', torch_dtype='bf16', config=tiny_model_dir)
        assert pipe.sd.unet.dtype == torch.bfloat16 and pipe.sd.text_encoder.dtype == torch.bfloat16
    # diffusers' own argument name for this diffusers: no deprecation warning on every load
    assert not [w for w in recwarn if 'torch_dtype' in str(w.message)]


def test_a_diffusers_pipeline_is_taken_in_the_asked_dtype_without_diffusers_cast_warning(vanilla_pipe,
                                                                                          diffusers_caplog):
    from diffusers import StableDiffusionPipeline
    # copies: the modules are cast in place, and a bf16 round trip would leave the session's vanilla_pipe rounded
    source = StableDiffusionPipeline(**{name: copy.deepcopy(module) if isinstance(module, torch.nn.Module) else module
                                        for name, module in vanilla_pipe.components.items()})
    pipe = StableDiffusionText2ImagePipeline(source, device='cpu', torch_dtype='bf16')
    dtypes = {pipe.sd.unet.dtype, pipe.sd.vae.dtype, pipe.sd.text_encoder.dtype}
    assert dtypes == {torch.bfloat16} and 'should be kept in float32' not in diffusers_caplog.text


def test_without_safety_checker(tiny_model_dir):
    pipe = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', load_safety_checker=False,
                                             progress_bar=False)
    out = pipe('a', num_inference_steps=1, seed=0)
    assert pipe.sd.safety_checker is None and 'nsfw_content_detected' not in out


def test_single_file_checkpoint_matches_the_folder(tiny_single_file, tiny_model_dir, sd_pipe):
    pipe = StableDiffusionText2ImagePipeline(tiny_single_file, config=tiny_model_dir, device='cpu', progress_bar=False)
    from_file = pipe('a cat', seed=0, num_inference_steps=2)['output_imgs'][0]
    from_folder = sd_pipe('a cat', seed=0, num_inference_steps=2)['output_imgs'][0]
    assert abs(from_file.astype(int) - from_folder.astype(int)).max() <= 1


def test_single_file_through_modelscope_with_configs_from_the_sd15_repo(tiny_single_file, cached_model, fake_hub):
    """Without config=, component configs and tokenizer come from AI-ModelScope/stable-diffusion-v1-5."""
    import modelscope_sd
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    pipe = pipeline(task=Tasks.text_to_image_synthesis, model=tiny_single_file, device='cpu',
                    pipeline_name=modelscope_sd.PIPELINE_NAME)
    assert pipe('a cat', seed=0, num_inference_steps=1)['output_imgs'][0].shape == (32, 32, 3)


def test_an_adapter_or_embedding_passed_as_the_model_says_where_it_goes(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    from train_helpers import make_random_lora
    lora = make_random_lora(tiny_model_dir, str(tmp_path / 'lora'))
    for model in (lora, str(tmp_path / 'lora')):  # the file, or the folder that holds only it
        with pytest.raises(ValueError, match="is a LoRA adapter, not a model.*lora_dir="):
            StableDiffusionText2ImagePipeline(model, config=tiny_model_dir, device='cpu')
    save_file({'emb_params': torch.zeros(2, 32)}, str(tmp_path / 'style.safetensors'))
    with pytest.raises(ValueError, match="textual-inversion embedding.*textual_inversion="):
        StableDiffusionText2ImagePipeline(str(tmp_path / 'style.safetensors'), config=tiny_model_dir, device='cpu')


def test_corrupt_single_file(tmp_path):
    weights = tmp_path / 'v1-5-pruned-emaonly.safetensors'
    weights.write_bytes(b'\x00' * 64)
    with pytest.raises(ValueError, match='not a valid safetensors file'):
        StableDiffusionText2ImagePipeline(str(weights), device='cpu')


def test_pickle_checkpoint_loads_when_the_caller_opts_in(tiny_single_file, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    ckpt = tmp_path / 'model.ckpt'
    torch.save({'state_dict': load_file(tiny_single_file)}, ckpt)
    pipe = StableDiffusionText2ImagePipeline(str(ckpt), config=tiny_model_dir, allow_pickle=True, device='cpu',
                                             progress_bar=False)
    assert pipe('a', num_inference_steps=1, seed=0)['output_imgs'][0].shape == (32, 32, 3)


@pytest.mark.parametrize('kwargs, error, message', [
    (dict(fast='no'), TypeError, "fast must be True or False, got 'no' (str)."),
    (dict(local_files_only=1), TypeError, 'local_files_only must be True or False, got 1 (int).'),
    (dict(fast=True, compile_mode='reduce'), ValueError, "compile_mode='reduce' is not one of reduce-overhead"),
    (dict(lora_dir=['/no/lora']), FileNotFoundError, "lora_dir='/no/lora': no such file or folder, and not a hub id"),
    (dict(vae='./no-vae.safetensors'), FileNotFoundError, "vae='./no-vae.safetensors': no such file or folder"),
    (dict(lora_dir='https://www.modelscope.cn/models/me/my-lora/files'), FileNotFoundError,
     "no such file or folder, and not a hub id (owner/name) (the hub id in it is 'me/my-lora': pass that)"),
    (dict(textual_inversion={'style': '/no/style.pt'}), FileNotFoundError,
     "textual_inversion='/no/style.pt': no such file or folder."),
])
def test_pipeline_arguments_are_checked_before_the_model_loads(tiny_model_dir, monkeypatch, kwargs, error, message):
    monkeypatch.setattr('modelscope_sd.pipeline.load_pipeline', lambda *args, **kw: pytest.fail('the model loaded'))
    with pytest.raises(error, match=re.escape(message)):
        StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', **kwargs)
