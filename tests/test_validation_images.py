"""kohya's sample-prompt files and the trainers' validation settings: read exactly, refused by name when wrong."""

import json
import re

import pytest

from finetune.config import LoraTrainConfig
from finetune.flags import parse_args
from finetune.validation_images import SamplePrompt, load_sample_prompts, validation_samples


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding='utf-8')
    return str(path)


def test_a_kohya_txt_file_reads_each_line_and_its_options(tmp_path):
    path = _write(tmp_path, 'prompts.txt', '# kohya sample prompts\n\n'
                  'masterpiece, 1girl, (red hair:1.2) --n low quality, worst quality --w 512 --h 768 --d 42 '
                  '--l 6.5 --s 28 --ss k_euler_a\n'
                  'a sks dog on a beach  --S 12 --N blurry\n')
    assert load_sample_prompts(path) == [
        SamplePrompt('masterpiece, 1girl, (red hair:1.2)', negative_prompt='low quality, worst quality', width=512,
                     height=768, seed=42, guidance_scale=6.5, num_inference_steps=28, scheduler='k_euler_a',
                     name='sample00'),
        SamplePrompt('a sks dog on a beach', negative_prompt='blurry', num_inference_steps=12, name='sample01')]


def test_a1111_prompts_from_file_lines_read_too(tmp_path):
    path = _write(tmp_path, 'prompts.txt', '--prompt "a cat, sitting" --negative_prompt "blurry" --steps 20 '
                  '--cfg_scale 6.5 --seed -1 --width 512 --height 768 --sampler_name "DPM++ 2M Karras"\n'
                  '--prompt "a dog" --seed 5\n')
    assert load_sample_prompts(path) == [
        SamplePrompt('a cat, sitting', negative_prompt='blurry', num_inference_steps=20, guidance_scale=6.5,
                     width=512, height=768, scheduler='DPM++ 2M Karras', name='sample00'),  # seed -1: A1111's random
        SamplePrompt('a dog', seed=5, name='sample01')]


def test_kohya_json_and_toml_files_read_as_the_txt_lines(tmp_path):
    entries = ['a red house --s 10', {'prompt': 'a cat', 'negative_prompt': 'dog', 'width': 640, 'height': 384,
                                      'seed': 5, 'scale': 4, 'sample_steps': 20, 'sample_sampler': 'ddim'}]
    expected = [SamplePrompt('a red house', num_inference_steps=10, name='sample00'),
                SamplePrompt('a cat', negative_prompt='dog', width=640, height=384, seed=5, guidance_scale=4.0,
                             num_inference_steps=20, scheduler='ddim', name='sample01')]
    assert load_sample_prompts(_write(tmp_path, 'p.json', json.dumps(entries))) == expected
    toml = ('[prompt]\nnegative_prompt = "dog"\nwidth = 640\nheight = 384\nsample_steps = 20\n\n'
            '[[prompt.subset]]\nprompt = "a cat"\nseed = 5\nscale = 4\nsample_sampler = "ddim"\n\n'
            '[[prompt.subset]]\nprompt = "a red house"\nnegative_prompt = ""\nsample_steps = 10\n')
    assert load_sample_prompts(_write(tmp_path, 'p.toml', toml)) == [
        SamplePrompt('a cat', negative_prompt='dog', width=640, height=384, seed=5, guidance_scale=4.0,
                     num_inference_steps=20, scheduler='ddim', name='sample00'),
        SamplePrompt('a red house', negative_prompt='', width=640, height=384, num_inference_steps=10,
                     name='sample01')]


@pytest.mark.parametrize('name, text, message', [
    ('p.txt', 'a dog --cn control.png', "line 1: --cn is not an option here; kohya's options are --n, --w"),
    ('p.txt', 'a\nb --w 500', 'line 2: width=500 must be a positive multiple of 8'),
    ('p.txt', 'a dog --h tall', "line 1: height='tall' is not an integer"),
    ('p.txt', 'a dog --s 0', 'num_inference_steps=0 must be >= 1'),
    ('p.txt', 'a dog --l -1', 'guidance_scale=-1.0 must be a number >= 0'),
    ('p.txt', 'a dog --ss euler_aa', "line 1: scheduler='euler_aa' is not known. Did you mean 'euler_a'?"),
    ('p.txt', '--n blurry', 'line 1 has no prompt'),
    ('p.txt', '--prompt "a dog" --restore_faces true', "line 1: '--restore_faces' is not one of the options read "
                                                        "from A1111's line format (--prompt, --negative_prompt"),
    ('p.txt', '--prompt "a dog', "line 1: No closing quotation (A1111's line format quotes values with spaces"),
    ('p.txt', '--prompt "a dog" --steps', 'line 1: --steps has no value'),
    ('p.txt', 'a <lora:style:0.8> dog', 'A1111 network tags go in the text of a pipeline call'),
    ('p.txt', '# only a comment\n\n', 'holds no prompt'),
    ('p.json', '{"prompt": "a dog"}', 'a JSON list of prompts'),
    ('p.json', '[{"prompt": "a dog", "cfg": 7}]', "entry 1: ['cfg'] not known; kohya's keys are prompt,"),
    ('p.json', '["a dog", 3]', 'entry 2: a prompt string or an object with a "prompt", not int'),
    ('p.json', '[a dog]', 'is not valid JSON'),
    ('p.toml', 'prompt = "a dog"', "kohya's TOML layout is a [prompt] table"),
    ('p.yaml', 'a dog', 'a .txt file (one prompt a line), or a .json or .toml file as kohya writes them; YAML'),
])
def test_a_bad_sample_file_is_refused_by_place_and_value(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_sample_prompts(_write(tmp_path, name, text))


def test_a_missing_sample_file_fails_when_the_config_is_made(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"sample_prompts='{tmp_path}/none.txt': no such file")):
        LoraTrainConfig(dataset_name='test/x', sample_prompts=str(tmp_path / 'none.txt'))
    with pytest.raises(ValueError, match=re.escape("validation_scheduler: scheduler='eulr' is not known. Did you "
                                                   "mean 'euler'?")):
        LoraTrainConfig(dataset_name='test/x', validation_scheduler='eulr')


def test_a_missing_file_on_the_command_line_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(LoraTrainConfig, ['--dataset_name', 'test/x', '--sample_prompts', str(tmp_path / 'none.txt')], 'd')
    err = capsys.readouterr().err
    assert f"error: sample_prompts='{tmp_path}/none.txt': no such file." in err and 'Traceback' not in err


def test_validation_renders_the_prompt_then_each_sample_at_the_runs_seed_and_sampler(tmp_path):
    path = _write(tmp_path, 'p.txt', 'a cat --d 9 --ss ddim\na dog\n')
    config = LoraTrainConfig(dataset_name='test/x', validation_prompt='a house', num_validation_images=2, seed=4,
                             sample_prompts=path, validation_scheduler='euler')
    assert validation_samples(config) == [
        SamplePrompt('a house', seed=4, scheduler='euler', num_images=2),
        SamplePrompt('a cat', seed=9, scheduler='ddim', name='sample00'),
        SamplePrompt('a dog', seed=4, scheduler='euler', name='sample01')]
    assert validation_samples(LoraTrainConfig(dataset_name='test/x')) == []


def test_kohyas_sample_flags_map_onto_the_validation_ones(tmp_path):
    path = _write(tmp_path, 'p.txt', 'a dog\n')
    config, notes = parse_args(LoraTrainConfig, ['--dataset_name', 'test/x', '--sample_prompts', path,
                                                 '--sample_every_n_epochs', '2', '--sample_sampler', 'k_dpm_2_a',
                                                 '--sample_at_first'], 'd')
    assert (config.sample_prompts, config.validation_epochs, config.validation_scheduler) == (path, 2, 'k_dpm_2_a')
    assert config.sample_at_first and config.validation_steps is None  # epochs only, as kohya samples
    assert '--sample_every_n_epochs 2 → --validation_epochs 2' in notes
    config, _ = parse_args(LoraTrainConfig, ['--dataset_name', 'test/x', '--sample_every_n_steps', '50'], 'd')
    assert (config.validation_steps, config.validation_epochs) == (50, None)
    assert LoraTrainConfig(dataset_name='test/x').validation_steps == 100
