"""The examples run as the README shows them."""

import os
import runpy
import sys

import cv2

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
