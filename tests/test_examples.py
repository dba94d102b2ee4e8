"""The examples run as the README shows them."""

import os
import runpy
import sys

import cv2
import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), '..', 'examples')


def test_text_to_image_example_writes_pngs(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['text_to_image.py', '--prompt', '飞流直下三千尺,油画', '--model', tiny_model_dir,
                                      '--num_inference_steps', '2', '--num_images', '2', '--seed', '42',
                                      '--scheduler', 'euler_a', '--device', 'cpu', '--output_dir', str(tmp_path)])
    runpy.run_path(os.path.join(EXAMPLES, 'text_to_image.py'), run_name='__main__')
    written = sorted(os.listdir(tmp_path))
    assert written == ['42.png', '43.png']
    assert cv2.imread(str(tmp_path / '42.png')).shape == (32, 32, 3)
    from modelscope_sd.metadata import read_png
    assert read_png(str(tmp_path / '43.png'))['call']['seed'] == 43


def test_text_to_image_example_names_a_bad_option_without_a_traceback(tiny_model_dir, tmp_path, monkeypatch, capsys):
    for extra, message in ((['--scheduler', 'foo'], "scheduler='foo' is not known"),
                           (['--num_images', '0'], 'argument --num_images: 0 must be >= 1')):
        monkeypatch.setattr(sys, 'argv', ['text_to_image.py', '--prompt', 'a', '--model', tiny_model_dir,
                                          '--device', 'cpu', '--output_dir', str(tmp_path), *extra])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(os.path.join(EXAMPLES, 'text_to_image.py'), run_name='__main__')
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and 'Traceback' not in err
    assert os.listdir(tmp_path) == []
