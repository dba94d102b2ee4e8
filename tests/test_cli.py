"""The modelscope-sd command and reproducible PNGs."""

import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from diffusers import PNDMScheduler

from modelscope_sd import metadata
from modelscope_sd.cli import main
from modelscope_sd.schedulers import SCHEDULERS, make_scheduler, named_schedulers, scheduler_name


def test_parameters_round_trip():
    text = metadata.format_parameters('a cat, (red hat:1.3)\nsecond line', 'blurry, dark', 20, 'dpm++_2m_karras',
                                      6.5, 42, 512, 448, 'AI-ModelScope/stable-diffusion-v1-5',
                                      [('my-lora', 0.8), ('/x/kohya.safetensors', 1.0)], clip_skip=1,
                                      guidance_rescale=0.7, emphasis='no norm')
    assert 'Sampler: DPM++ 2M Karras' in text and 'Clip skip: 2' in text and 'Rescale CFG: 0.7' in text
    assert 'Emphasis: No norm' in text
    parsed = metadata.parse_parameters(text)
    assert parsed['call'] == {'text': 'a cat, (red hat:1.3)\nsecond line', 'negative_prompt': 'blurry, dark',
                              'num_inference_steps': 20, 'guidance_scale': 6.5, 'width': 512, 'height': 448,
                              'scheduler': 'dpm++_2m_karras', 'seed': 42, 'clip_skip': 1, 'guidance_rescale': 0.7,
                              'emphasis': 'No norm'}
    assert parsed['model'] == 'AI-ModelScope/stable-diffusion-v1-5'
    assert parsed['lora_dir'] == ['my-lora', '/x/kohya.safetensors'] and parsed['lora_scale'] == [0.8, 1.0]


def test_reads_an_a1111_parameters_text():
    text = ('masterpiece, a castle\nNegative prompt: lowres\nSteps: 30, Sampler: Euler a, Schedule type: '
            'Automatic, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly')
    parsed = metadata.parse_parameters(text)
    call = parsed['call']
    assert call['scheduler'] == 'euler_ancestral' and call['seed'] == 1234 and call['height'] == 768
    assert parsed['not_applied'] == []  # a model hash only describes the file
    dpm2 = text.replace('Sampler: Euler a, Schedule type: Automatic', 'Sampler: DPM2 a, Schedule type: Karras')
    assert metadata.parse_parameters(dpm2)['call']['scheduler'] == 'dpm2_ancestral_karras'
    # A1111 1.9+'s DPM++ 2M SDE runs on exponential sigmas and says so; Uniform is a sampler's plain sigmas
    for sampler, schedule, ours, not_applied in (
            ('DPM++ 2M SDE', 'Exponential', 'dpm++_2m_sde_exponential', []), ('Euler', 'Karras', 'euler_karras', []),
            ('DPM++ 2M SDE Heun', 'Exponential', 'dpm++_2m_sde_heun_exponential', []),
            ('Heun', 'Beta', 'heun_beta', []), ('DPM++ 2M', 'Uniform', 'dpm++_2m', []),
            ('Euler a', 'Karras', 'euler_ancestral', ['Schedule type Karras']),  # diffusers' Euler a has none
            ('DPM++ 2M', 'SGM Uniform', 'dpm++_2m', ['Schedule type SGM Uniform'])):
        parsed = metadata.parse_parameters(text.replace('Sampler: Euler a, Schedule type: Automatic',
                                                        f'Sampler: {sampler}, Schedule type: {schedule}'))
        assert (parsed['call']['scheduler'], parsed['not_applied']) == (ours, not_applied)


@pytest.mark.parametrize('name', sorted(named_schedulers()))
def test_every_scheduler_has_an_a1111_name_read_back_from_a_png(name):
    """Its object (the model's own scheduler) is named right too: DPM++ 2M SDE is not written as DPM++ 2M. A
    schedule type A1111's sampler names leave out is written as A1111 1.9+ writes it."""
    scheduler = make_scheduler(name, PNDMScheduler().config)
    assert scheduler_name(scheduler) == name
    text = metadata.format_parameters('a', None, 20, scheduler_name(scheduler), 7.0, 1, 512, 512, 'm')
    base, _, schedule = name.rpartition('_')
    written = (f'Sampler: {metadata.A1111_SAMPLERS[name]},' if name in SCHEDULERS else
               f'Sampler: {metadata.A1111_SAMPLERS[base]}, Schedule type: {schedule.capitalize()},')
    assert written in text
    assert (metadata.parse_parameters(text)['call']['scheduler'], metadata.parse_parameters(text)['not_applied']) == (
        name, [])
    if name.endswith('_karras'):  # A1111 1.9+ writes Karras as a schedule type of the sampler
        a1111_19 = text.replace(' Karras,', ', Schedule type: Karras,')
        assert metadata.parse_parameters(a1111_19) == metadata.parse_parameters(text)


def test_reads_a1111_19_schedule_type_and_the_hires_fix():
    text = ('a castle\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, '
            'Denoising strength: 0.55, Hires upscale: 2, Hires steps: 20, Hires upscaler: Latent, Version: v1.10.1')
    parsed = metadata.parse_parameters(text)
    call = parsed['call']
    assert call['scheduler'] == 'dpm++_2m_karras' and call['width'] == 512 and call['height'] == 768
    assert (call['hr_scale'], call['hr_second_pass_steps'], call['hr_upscaler'], call['strength']) == (
        2.0, 20, 'latent', 0.55)
    assert parsed['not_applied'] == []
    img2img = 'a castle\nSteps: 30, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.6'
    assert metadata.parse_parameters(img2img)['call']['strength'] == 0.6
    # what the call leaves out or runs otherwise is named, for --from_png to warn that the image will differ
    esrgan = text.replace('Hires upscaler: Latent', 'Hires upscaler: R-ESRGAN 4x+')
    parsed = metadata.parse_parameters(esrgan)
    assert parsed['call']['hr_upscaler'] == 'lanczos'
    assert parsed['not_applied'] == ['Hires upscaler R-ESRGAN 4x+ (ran as Lanczos)']
    # A1111's other latent upscalers and its pixel resizes run as they are; its "None" resizes with Lanczos
    for a1111, ours in (('Latent (nearest-exact)', 'latent (nearest-exact)'), ('Latent (bicubic antialiased)',
                        'latent (bicubic antialiased)'), ('Nearest', 'nearest'), ('None', 'lanczos')):
        parsed = metadata.parse_parameters(text.replace('Hires upscaler: Latent', f'Hires upscaler: {a1111}'))
        assert (parsed['call']['hr_upscaler'], parsed['not_applied']) == (ours, [])
    resize = text.replace('Hires upscale: 2', 'Hires resize: 1024x1024')
    parsed = metadata.parse_parameters(resize)
    assert 'hr_scale' not in parsed['call'] and 'strength' not in parsed['call']
    assert parsed['not_applied'] == ["Hires resize 1024x1024 (not the first pass's size scaled: A1111 crops to it)",
                                     'Hires steps', 'Hires upscaler', 'Denoising strength']
    # a resize to the first pass's size scaled is that scale (test_hires.py has more)
    parsed = metadata.parse_parameters(text.replace('Hires upscale: 2', 'Hires resize: 1024x1536'))
    assert (parsed['call']['hr_scale'], parsed['call']['hr_second_pass_steps'], parsed['not_applied']) == (2.0, 20, [])
    other = 'a castle\nSteps: 30, Sampler: Euler, Schedule type: SGM Uniform, CFG scale: 7, Seed: 1, ' \
        'Size: 512x512, Emphasis: No norm, VAE: kl-f8-anime2.ckpt'
    parsed = metadata.parse_parameters(other)
    assert parsed['not_applied'] == ['Schedule type SGM Uniform'] and parsed['call']['emphasis'] == 'No norm'
    assert parsed['vae'] == 'kl-f8-anime2.ckpt'  # generate loads it when it is there (see the --vae test)
    assert 'Emphasis Sharp' in metadata.parse_parameters(other.replace('No norm', 'Sharp'))['not_applied']
    # A1111's samplers that no diffusers scheduler here runs: the model's own runs, named, instead of an error
    parsed = metadata.parse_parameters(other.replace('Sampler: Euler, Schedule type: SGM Uniform', 'Sampler: DPM '
                                                     'fast') + ', Hires upscale: 2, Hires sampler: Restart')
    assert 'scheduler' not in parsed['call'] and 'hr_scheduler' not in parsed['call']
    assert parsed['not_applied'] == [
        "Sampler DPM fast (not offered here: the model's own runs unless --scheduler names one)",
        "Hires sampler Restart (not offered here: the first pass's runs unless --hr_scheduler names one)"]
    # A1111 leaves its default out, and so does a PNG written here
    default = metadata.format_parameters('a', None, 20, 'pndm', 7.5, 1, 512, 512, 'm', emphasis='Original')
    assert 'Emphasis' not in default


def test_png_without_parameters_is_an_error(tmp_path):
    Image.new('RGB', (8, 8)).save(tmp_path / 'plain.png')
    with pytest.raises(ValueError, match='carries no generation parameters'):
        metadata.read_png(str(tmp_path / 'plain.png'))


@pytest.mark.parametrize('suffix, encoding', [('jpg', 'utf_16_be'), ('webp', 'utf_16_be'), ('jpg', 'utf_16_le')])
def test_a1111_jpeg_and_webp_carry_their_parameters_in_exif(tmp_path, suffix, encoding):
    """A1111 saves JPEG and WEBP with the parameters text in EXIF's UserComment, as piexif's
    UserComment.dump(text, encoding='unicode') writes it: b'UNICODE\\0', then UTF-16 big-endian (some tools
    write little-endian under the same code)."""
    text = '一只猫, (red hat:1.2)\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, ' \
        'CFG scale: 7, Seed: 5, Size: 512x768, Model: m'
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b'UNICODE\0' + text.encode(encoding)
    Image.new('RGB', (8, 8)).save(tmp_path / f'a.{suffix}', exif=exif.tobytes())
    assert metadata.read_png(str(tmp_path / f'a.{suffix}')) == metadata.parse_parameters(text)
    Image.new('RGB', (8, 8)).save(tmp_path / f'plain.{suffix}')
    with pytest.raises(ValueError, match='carries no generation parameters.*EXIF UserComment'):
        metadata.read_png(str(tmp_path / f'plain.{suffix}'))


def test_a_comfyui_png_is_named_as_one(tmp_path):
    """ComfyUI writes its node graph ('prompt' and 'workflow' chunks), not A1111's parameters text."""
    info = PngInfo()
    info.add_text('prompt', '{"3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 20}}}')
    info.add_text('workflow', '{}')
    Image.new('RGB', (8, 8)).save(tmp_path / 'comfy.png', pnginfo=info)
    with pytest.raises(ValueError, match='is a ComfyUI image: its settings are a node graph.*KSampler'):
        metadata.read_png(str(tmp_path / 'comfy.png'))


def test_from_png_of_a_file_that_is_no_image_is_an_error_without_traceback(tmp_path, capsys):
    (tmp_path / 'notes.txt').write_text('a castle, oil painting')
    with pytest.raises(SystemExit) as exit:
        main(['generate', '--from_png', str(tmp_path / 'notes.txt')])
    assert exit.value.code == 2
    assert capsys.readouterr().err == (f"modelscope-sd generate: error: {tmp_path / 'notes.txt'} is not an image: the "
                                       'settings come from a PNG written by modelscope-sd generate, or an A1111 '
                                       'PNG, JPEG or WEBP.\n')
    with pytest.raises(SystemExit):
        main(['generate', '--from_png', str(tmp_path / 'missing.png')])
    assert capsys.readouterr().err == (f"modelscope-sd generate: error: --from_png '{tmp_path / 'missing.png'}': no "
                                       'such file.\n')


def test_save_png_never_replaces_an_existing_image(tmp_path):
    first = metadata.save_png(str(tmp_path / '42.png'), np.zeros((8, 8, 3), np.uint8), 'a cat')
    second = metadata.save_png(str(tmp_path / '42.png'), np.full((8, 8, 3), 255, np.uint8), 'a dog')
    third = metadata.save_png(str(tmp_path / '42.png'), np.full((8, 8, 3), 9, np.uint8), 'a cow')
    assert [os.path.basename(p) for p in (first, second, third)] == ['42.png', '42-1.png', '42-2.png']
    assert Image.open(first).text['parameters'] == 'a cat' and np.asarray(Image.open(first)).max() == 0
    assert Image.open(second).text['parameters'] == 'a dog'


def test_generate_writes_pngs_that_recreate_themselves(tiny_model_dir, tmp_path):
    paths = main(['generate', '--prompt', '飞流直下三千尺,(油画:1.4)', '--model', tiny_model_dir, '--num_inference_steps',
                  '3', '--num_images', '2', '--seed', '42', '--scheduler', 'euler_a', '--guidance_rescale', '0.7',
                  '--emphasis', 'No norm', '--device', 'cpu', '--output_dir', str(tmp_path / 'first')])
    assert [os.path.basename(p) for p in paths] == ['42.png', '43.png']
    saved = metadata.read_png(paths[1])
    assert saved['not_applied'] == []
    assert saved['call']['seed'] == 43 and saved['call']['scheduler'] == 'euler_ancestral'
    assert saved['call']['guidance_rescale'] == 0.7 and saved['call']['emphasis'] == 'No norm'
    again = main(['generate', '--from_png', paths[1], '--device', 'cpu', '--output_dir', str(tmp_path / 'again')])
    first, second = (np.asarray(Image.open(p)).astype(int) for p in (paths[1], again[0]))
    assert np.abs(first - second).max() <= 1  # made in a batch, re-made alone: at most a rounding apart


def test_generate_takes_a1111s_seed_of_minus_one_as_random(tiny_model_dir, tmp_path):
    paths = main(['generate', '--prompt', 'a cat', '--model', tiny_model_dir, '--num_inference_steps', '2',
                  '--num_images', '2', '--seed', '-1', '--device', 'cpu', '--output_dir', str(tmp_path)])
    seeds = [int(os.path.basename(p)[:-len('.png')]) for p in paths]
    assert seeds[0] >= 0 and seeds[1] == seeds[0] + 1
    assert metadata.read_png(paths[1])['call']['seed'] == seeds[1]


def test_generate_in_batches_writes_each_batch_as_it_is_made(tiny_model_dir, tmp_path, monkeypatch):
    from modelscope_sd import StableDiffusionText2ImagePipeline
    args = ['generate', '--prompt', 'a cat', '--model', tiny_model_dir, '--num_inference_steps', '3',
            '--num_images', '3', '--seed', '42', '--device', 'cpu']
    whole = main([*args, '--output_dir', str(tmp_path / 'whole')])
    real, calls = StableDiffusionText2ImagePipeline.__call__, []

    def fails_on_the_third_batch(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError('out of memory')
        return real(self, *a, **kw)

    monkeypatch.setattr(StableDiffusionText2ImagePipeline, '__call__', fails_on_the_third_batch)
    with pytest.raises(RuntimeError):
        main([*args, '--batch_size', '1', '--output_dir', str(tmp_path / 'split')])
    assert sorted(os.listdir(tmp_path / 'split')) == ['42.png', '43.png']  # the batches made before the failure
    monkeypatch.undo()
    split = main([*args, '--batch_size', '2', '--output_dir', str(tmp_path / 'split2')])
    assert [os.path.basename(p) for p in split] == ['42.png', '43.png', '44.png']
    for a, b in zip(split, whole, strict=True):
        assert np.abs(np.asarray(Image.open(a), int) - np.asarray(Image.open(b), int)).max() <= 1
        assert Image.open(a).text['parameters'] == Image.open(b).text['parameters']


def test_prompt_file_gives_each_prompt_its_images_and_seeds_batched_or_not(tiny_model_dir, tmp_path):
    (tmp_path / 'prompts.txt').write_text('a red ball\n\na blue cube\na tree\n', encoding='utf-8')
    args = ['generate', '--prompt_file', str(tmp_path / 'prompts.txt'), '--model', tiny_model_dir, '--num_images', '2',
            '--seed', '10', '--num_inference_steps', '2', '--device', 'cpu']
    whole = main([*args, '--output_dir', str(tmp_path / 'whole')])
    split = main([*args, '--batch_size', '4', '--output_dir', str(tmp_path / 'split')])
    assert [os.path.basename(p) for p in split] == [f'{seed}.png' for seed in range(10, 16)]
    for a, b in zip(split, whole, strict=True):
        assert Image.open(a).text['parameters'] == Image.open(b).text['parameters']
        assert np.abs(np.asarray(Image.open(a), int) - np.asarray(Image.open(b), int)).max() <= 1
    assert [metadata.read_png(p)['call']['text'] for p in split[1:4]] == ['a red ball', 'a blue cube', 'a blue cube']
    assert metadata.read_png(split[3])['call']['seed'] == 13
    with pytest.raises(SystemExit, match='2'):
        main(['generate', '--prompt_file', str(tmp_path / 'none.txt'), '--model', tiny_model_dir, '--device', 'cpu'])


def test_prompt_files_saved_as_utf16_read_as_utf8_ones(tmp_path):
    from modelscope_sd.prompt_file import read_prompt_file
    expected = [{'prompt': '一只猫'}, {'prompt': 'a dog', 'seed': 7, 'negative_prompt': 'blurry'}]
    (tmp_path / 'p.txt').write_text('一只猫\r\n# a comment\r\na dog --d 7 --n blurry\r\n', encoding='utf-16')
    (tmp_path / 'p.json').write_text('["一只猫", {"prompt": "a dog", "seed": 7, "negative_prompt": "blurry"}]',
                                     encoding='utf-16')
    (tmp_path / 'p-utf8.txt').write_text('一只猫\na dog --d 7 --n blurry\n', encoding='utf-8')
    for name in ('p.txt', 'p.json', 'p-utf8.txt'):
        assert read_prompt_file(str(tmp_path / name)) == expected, name


def test_prompt_file_lines_with_kohyas_sample_options_are_each_their_own_call(tiny_model_dir, tmp_path, capsys):
    """The trainers' --sample_prompts file renders here too: a line's options win over the flags for that line, a
    line without --d takes the seed of its place in the file."""
    from modelscope_sd import StableDiffusionText2ImagePipeline
    (tmp_path / 'samples.txt').write_text('# kohya sample prompts\n'
                                          'a red ball --n dark --w 48 --h 32 --d 7 --l 5 --s 3 --ss euler_a\n'
                                          'a blue cube\n'
                                          '--prompt "a green tree" --sampler_name "DPM++ 2M Karras" --seed 99\n',
                                          encoding='utf-8')
    paths = main(['generate', '--prompt_file', str(tmp_path / 'samples.txt'), '--model', tiny_model_dir,
                  '--num_images', '2', '--seed', '10', '--num_inference_steps', '2', '--device', 'cpu',
                  '--output_dir', str(tmp_path / 'out')])
    assert [os.path.basename(p) for p in paths] == ['7.png', '8.png', '12.png', '13.png', '99.png', '100.png']
    tree = metadata.read_png(paths[4])['call']  # a line of A1111's "Prompts from file" script
    assert (tree['text'], tree['scheduler'], tree['num_inference_steps']) == ('a green tree', 'dpm++_2m_karras', 2)
    first = metadata.read_png(paths[0])['call']
    assert first == {'text': 'a red ball', 'negative_prompt': 'dark', 'width': 48, 'height': 32, 'seed': 7,
                     'guidance_scale': 5.0, 'num_inference_steps': 3, 'scheduler': 'euler_ancestral'}
    last = metadata.read_png(paths[3])['call']
    assert (last['text'], last['seed'], last['num_inference_steps'], last['width']) == ('a blue cube', 13, 2, 32)
    pipe = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False)
    again = pipe('a red ball', negative_prompt='dark', width=48, height=32, seed=7, guidance_scale=5,
                 num_inference_steps=3, scheduler='euler_a', num_images_per_prompt=2)['output_imgs']
    for path, image in zip(paths[:2], again):
        assert np.abs(np.asarray(Image.open(path), int)[..., ::-1] - image.astype(int)).max() <= 1
    (tmp_path / 'bad.txt').write_text('a dog --cfg 7\n', encoding='utf-8')
    with pytest.raises(SystemExit):
        main(['generate', '--prompt_file', str(tmp_path / 'bad.txt'), '--model', tiny_model_dir, '--device', 'cpu'])
    assert "bad.txt' line 1: --cfg is not an option here; kohya's options are --n, --w" in capsys.readouterr().err


def test_bad_options_are_refused_before_the_model_loads(tmp_path, capsys):
    (tmp_path / 'prompts.txt').write_text('a dog --w 512\na cat --h 500\n', encoding='utf-8')
    (tmp_path / 'in.png').write_bytes(b'not a png')
    Image.new('RGB', (32, 32)).save(tmp_path / 'good.png')
    (tmp_path / 'a-file').write_text('')
    for args, message in ((['--prompt', 'a', '--height', '33'], 'height=33 must be a positive multiple of 8'),
                          (['--prompt', 'a', '--num_inference_steps', '0'], 'num_inference_steps=0 is out of range'),
                          (['--prompt', 'a', '--guidance_scale', 'nan'], 'guidance_scale=nan must be a finite'),
                          (['--prompt_file', str(tmp_path / 'prompts.txt')], 'height=500 must be a positive'),
                          (['--prompt', 'a', '--scheduler', 'eulr'], "scheduler='eulr' is not known"),
                          (['--prompt', 'a', '--hr_scale', '2', '--hr_scheduler', 'x'], "hr_scheduler='x' is not"),
                          (['--prompt', 'a', '--strength', '0.5'], 'strength applies to image-to-image'),
                          (['--prompt', 'a', '--image', str(tmp_path / 'in.png')], "in.png' is not an image (PNG"),
                          (['--prompt', 'a', '--image', str(tmp_path / 'good.png'), '--mask_image',
                            str(tmp_path / 'nope.png')], "mask_image='" + str(tmp_path / 'nope.png')),
                          (['--prompt', 'a', '--output_dir', str(tmp_path / 'a-file')], 'cannot be made: File exists')):
        with pytest.raises(SystemExit) as exit_info:  # a model that loading could never find: never asked for
            main(['generate', '--model', str(tmp_path / 'no-such-model'), '--output_dir', str(tmp_path), *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and 'no-such-model' not in err, err


def test_bad_generate_options_are_one_line_errors(tiny_model_dir, tmp_path, capsys):
    for args, message in ((['--seed', '-2'], 'seed=-2 is out of range'), (['--batch_size', '0'], '--batch_size 0'),
                          (['--num_images', '0'], '--num_images 0: must be >= 1'),
                          (['--prompt_file', __file__], '--prompt or --prompt_file, not both'),
                          (['--precompile'], '--precompile keeps --fast'),
                          (['--image', str(tmp_path / 'nope.png')], 'nope.png')):
        with pytest.raises(SystemExit) as exit_info:
            main(['generate', '--prompt', 'a cat', '--model', tiny_model_dir, '--device', 'cpu',
                  '--output_dir', str(tmp_path), *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith('modelscope-sd generate: error: ') and message in err
        assert 'Traceback' not in err and len(err.strip().splitlines()) == 1


def test_generate_with_lora_image_and_mask(tiny_model_dir, tmp_path):
    from train_helpers import make_random_lora
    lora = os.path.dirname(make_random_lora(tiny_model_dir, str(tmp_path / 'lora')))
    Image.new('RGB', (32, 32), (200, 30, 30)).save(tmp_path / 'in.png')
    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255
    Image.fromarray(mask).save(tmp_path / 'mask.png')
    paths = main(['generate', '--prompt', 'a cat', '--model', tiny_model_dir, '--num_inference_steps', '2',
                  '--seed', '1', '--lora', f'{lora}=0.7', '--image', str(tmp_path / 'in.png'),
                  '--mask_image', str(tmp_path / 'mask.png'), '--device', 'cpu', '--output_dir', str(tmp_path)])
    text = Image.open(paths[0]).text['parameters']
    assert f'Lora: "{lora}=0.7"' in text or f'Lora: {lora}=0.7' in text
    out = np.asarray(Image.open(paths[0]))
    assert np.array_equal(out[16:], np.full((16, 32, 3), (200, 30, 30), np.uint8))  # unmasked half kept


def test_convert_model_writes_one_file_that_loads_with_the_same_images(tiny_model_dir, sd_pipe, tmp_path, capsys):
    from modelscope_sd import StableDiffusionText2ImagePipeline
    path = str(tmp_path / 'tiny.safetensors')
    main(['convert-model', tiny_model_dir, path, '--fp32'])
    assert capsys.readouterr().out.strip() == path
    single = StableDiffusionText2ImagePipeline(path, config=tiny_model_dir, device='cpu', progress_bar=False)
    args = dict(num_inference_steps=2, seed=0)
    assert np.array_equal(single('a cat', **args)['output_imgs'][0], sd_pipe('a cat', **args)['output_imgs'][0])
    with pytest.raises(SystemExit) as exit_info:
        main(['convert-model', tiny_model_dir, str(tmp_path / 'tiny.ckpt')])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("modelscope-sd convert-model: error: '")  # the path, then the fix
    before = os.path.getmtime(path)
    with pytest.raises(SystemExit) as exit_info:  # the file just written is not written over
        main(['convert-model', tiny_model_dir, path])
    assert exit_info.value.code == 2 and "tiny.safetensors' exists: name a new file" in capsys.readouterr().err
    assert os.path.getmtime(path) == before


def test_convert_model_turns_a_single_file_into_the_folder_the_trainers_need(tiny_model_dir, tiny_single_file,
                                                                             sd_pipe, tmp_path, capsys):
    from safetensors import safe_open

    from finetune.config import LoraTrainConfig
    from modelscope_sd import StableDiffusionText2ImagePipeline
    with pytest.raises(ValueError, match='is a single-file checkpoint .*the trainers read a diffusers folder.*'
                                         'modelscope-sd convert-model'):
        LoraTrainConfig(pretrained_model_name_or_path=tiny_single_file, dataset_name='test/unused')
    out = str(tmp_path / 'from-file')
    main(['convert-model', tiny_single_file, out, '--config', tiny_model_dir, '--fp32'])
    assert os.path.isfile(os.path.join(out, 'configuration.json')) and not os.path.exists(out + '.partial')
    pipe = StableDiffusionText2ImagePipeline(out, device='cpu', progress_bar=False)
    args = dict(num_inference_steps=2, seed=0)
    assert np.array_equal(pipe('a cat', **args)['output_imgs'][0], sd_pipe('a cat', **args)['output_imgs'][0])
    LoraTrainConfig(pretrained_model_name_or_path=out, dataset_name='test/unused')  # accepted now
    main(['convert-model', tiny_single_file, str(tmp_path / 'half'), '--config', tiny_model_dir])
    with safe_open(str(tmp_path / 'half' / 'unet' / 'diffusion_pytorch_model.safetensors'), framework='pt') as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16  # fp16 unless --fp32
    with pytest.raises(SystemExit):  # never over an existing folder
        main(['convert-model', tiny_single_file, out, '--config', tiny_model_dir])
    assert 'exists' in capsys.readouterr().err


def test_convert_lora_both_ways_keeps_the_effect(tiny_model_dir, tmp_path):
    from modelscope_sd import StableDiffusionText2ImagePipeline
    from train_helpers import make_random_lora
    original = make_random_lora(tiny_model_dir, str(tmp_path / 'a'), seed=4, text_encoder=True)
    main(['convert-lora', original, str(tmp_path / 'kohya.safetensors')])
    main(['convert-lora', str(tmp_path / 'kohya.safetensors'), str(tmp_path / 'back.safetensors'), '--to', 'diffusers'])
    # the training output_dir as input, as lora_dir takes it; a new folder for the output; a kohya file again
    main(['convert-lora', str(tmp_path / 'a'), str(tmp_path / 'new' / 'from-folder.safetensors')])
    main(['convert-lora', str(tmp_path / 'kohya.safetensors'), str(tmp_path / 'kohya-again.safetensors')])

    def image(path):
        pipe = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False, lora_dir=path)
        return pipe('a cat', num_inference_steps=2, seed=0)['output_imgs'][0].astype(int)
    reference = image(original)
    for converted in ('kohya', 'back', 'new/from-folder', 'kohya-again'):
        assert np.abs(image(str(tmp_path / f'{converted}.safetensors')) - reference).max() <= 1, converted


def test_convert_lora_refuses_what_it_cannot_write_or_read_in_one_line(tiny_model_dir, tmp_path, capsys):
    from train_helpers import make_random_lora
    original = make_random_lora(tiny_model_dir, str(tmp_path / 'a'))
    (tmp_path / 'taken.safetensors').write_bytes(b'a file of the user')
    (tmp_path / 'notes.safetensors').write_text('not an adapter')
    (tmp_path / 'none').mkdir()
    from safetensors.torch import load_file, save_file
    diverged = {key: value * float('nan') for key, value in load_file(original).items()}
    save_file(diverged, str(tmp_path / 'diverged.safetensors'))
    for args, message in (([original, str(tmp_path / 'taken.safetensors')], 'taken.safetensors\' exists'),
                          ([str(tmp_path / 'diverged.safetensors'), str(tmp_path / 'k.safetensors')],
                           'holds NaN or inf in'),
                          ([original, str(tmp_path / 'k.ckpt')], "name it *.safetensors"),
                          ([original, str(tmp_path)], "name it *.safetensors"),
                          ([tiny_model_dir, str(tmp_path / 'k.safetensors')],
                           f"input={tiny_model_dir!r} is a whole Stable Diffusion model"),
                          ([str(tmp_path / 'none'), str(tmp_path / 'k.safetensors')], 'Point input at'),
                          ([str(tmp_path / 'notes.safetensors'), str(tmp_path / 'k.safetensors')],
                           'not a valid safetensors file')):
        with pytest.raises(SystemExit) as exit_info:
            main(['convert-lora', *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / 'taken.safetensors').read_bytes() == b'a file of the user'
    assert sorted(os.listdir(tmp_path)) == ['a', 'diverged.safetensors', 'none', 'notes.safetensors',
                                            'taken.safetensors']


def test_train_lora_command(tiny_model_dir, tmp_path, fresh_accelerate):
    from train_helpers import make_images
    make_images(str(tmp_path / 'imgs'), count=2)
    path = main(['train-lora', '--pretrained_model_name_or_path', tiny_model_dir, '--dataset_name',
                 str(tmp_path / 'imgs'), '--resolution', '32', '--max_train_steps', '1',
                 '--output_dir', str(tmp_path / 'out')])
    assert os.path.isfile(path)


def test_a_trainers_own_check_failing_at_run_time_ends_in_one_line(tiny_model_dir, tmp_path, fresh_accelerate,
                                                                   capsys):
    """A bad dataset is found after the flags are read: it ended in a traceback, where a bad flag is one line."""
    from train_helpers import make_images
    make_images(str(tmp_path / 'imgs'), count=2)
    (tmp_path / 'imgs' / 'img1.png').write_bytes(b'not a png')
    with pytest.raises(SystemExit) as exit_info:
        main(['train-lora', '--pretrained_model_name_or_path', tiny_model_dir, '--dataset_name',
              str(tmp_path / 'imgs'), '--output_dir', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith('modelscope-sd train-lora: error: 1 unreadable image(s)') and '--skip_bad_images' in err


def test_an_error_raised_outside_the_package_keeps_its_traceback():
    """Only the package's own checks speak to users; anything else is a bug to report, with its trace."""
    from finetune.config import LoraTrainConfig
    from finetune.flags import run_trainer

    def main(config, notes):
        return int('not a number')  # raised by Python, not by a check of ours

    with pytest.raises(ValueError, match='invalid literal'):
        run_trainer(main, LoraTrainConfig, ['--dataset_name', '.'], 'doc', 'prog')


def test_console_script_is_installed_and_exits_0_when_it_made_the_images(tiny_model_dir, tmp_path):
    result = subprocess.run(['modelscope-sd', '--help'], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ('generate', 'train-lora', 'train-dreambooth', 'convert-lora'):
        assert command in result.stdout
    # `modelscope-sd generate … && next-step` must go on: the paths are printed, the status is 0
    result = subprocess.run(['modelscope-sd', 'generate', '--prompt', 'a cat', '--model', tiny_model_dir, '--seed', '1',
                             '--num_inference_steps', '1', '--device', 'cpu', '--output_dir', str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(tmp_path / '1.png')]
