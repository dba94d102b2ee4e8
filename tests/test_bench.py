"""The memory estimator behind the README's DreamBooth memory numbers, on the tiny UNet."""

import pytest

from bench.estimate_training_memory import estimate


@pytest.fixture(scope='module')
def rows():
    return {name: estimate(name, tiny=True) for name in ('adamw', 'adafactor')}


def test_adamw_state_is_two_copies_of_the_weights(rows):
    kinds = rows['adamw']['step_peak_gib_by_kind']
    assert kinds['opt'] == pytest.approx(2 * kinds['param'], rel=0.05)
    assert kinds['grad'] <= kinds['param'] * 1.01
    assert rows['adamw']['estimated_peak_gib'] >= kinds['param'] + kinds['opt']


def test_adafactor_state_is_factored(rows):
    assert rows['adafactor']['step_peak_gib_by_kind']['opt'] < 0.5 * rows['adamw']['step_peak_gib_by_kind']['opt']
