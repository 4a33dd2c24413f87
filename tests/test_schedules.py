"""Learning-rate schedules against slim's formulas, written out here in numpy."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfloop import schedules

STEPS = np.arange(0, 60)


def _values(schedule):
    if not callable(schedule):
        return np.full(len(STEPS), schedule, np.float64)
    return np.array([float(schedule(tf.constant(s, tf.int64))) for s in STEPS])


def _make(decay_type, **kwargs):
    options = {"learning_rate": 0.1, "decay_type": decay_type, "steps_per_epoch": 7}
    return schedules.learning_rate_schedule(**{**options, **kwargs})


def test_exponential_is_slims_staircase():
    # slim: decay_steps = int(num_samples_per_epoch * num_epochs_per_decay / batch)
    decay_steps = int(7 * 1.5)
    expected = 0.1 * 0.5 ** np.floor(STEPS / decay_steps)
    actual = _values(_make("exponential", decay_factor=0.5, num_epochs_per_decay=1.5))
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_polynomial_is_slims_linear_decay_to_the_end_rate():
    decay_steps = 14
    fraction = np.minimum(STEPS, decay_steps) / decay_steps
    expected = (0.1 - 0.01) * (1 - fraction) + 0.01
    actual = _values(
        _make("polynomial", num_epochs_per_decay=2.0, end_learning_rate=0.01)
    )
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_fixed_and_cosine_over_the_run():
    assert _make("fixed") == 0.1
    total = 40
    expected = 0.001 + (0.1 - 0.001) * 0.5 * (
        1 + np.cos(np.pi * np.minimum(STEPS, total) / total)
    )
    actual = _values(_make("cosine", end_learning_rate=0.001, total_steps=total))
    np.testing.assert_allclose(actual, expected, rtol=1e-5)


def test_warmup_ramps_linearly_into_the_schedule():
    warmup = math.ceil(1.5 * 7)  # 11 steps
    decayed = 0.1 * 0.9 ** np.floor(STEPS / 14)
    expected = decayed * np.minimum(1.0, (STEPS + 1) / warmup)
    actual = _values(_make("exponential", decay_factor=0.9, warmup_epochs=1.5))
    np.testing.assert_allclose(actual, expected, rtol=1e-6)
    fixed = _values(_make("fixed", warmup_epochs=1.0))
    np.testing.assert_allclose(fixed, 0.1 * np.minimum(1.0, (STEPS + 1) / 7), rtol=1e-6)


def test_schedule_follows_the_restored_optimizer_iterations(tmp_path):
    """The rate lives in no variable: restoring `iterations` restores it."""
    variable = keras.Variable(np.zeros(2, np.float32))
    optimizer = keras.optimizers.SGD(_make("exponential", decay_factor=0.5))
    optimizer.build([variable])
    optimizer.iterations.assign(20)
    path = tf.train.Checkpoint(optimizer=optimizer).save(str(tmp_path / "ckpt"))
    restored = keras.optimizers.SGD(_make("exponential", decay_factor=0.5))
    restored.build([variable])
    tf.train.Checkpoint(optimizer=restored).restore(path)
    assert float(restored.learning_rate) == pytest.approx(0.1 * 0.5 ** (20 // 14))


def test_warmup_schedule_serializes():
    schedule = _make("polynomial", warmup_epochs=1.0)
    again = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(schedule)
    )
    np.testing.assert_allclose(_values(again), _values(schedule))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"decay_type": "step"}, "`decay_type` must be one of"),
        (
            {"num_epochs_per_decay": 0.1},
            r"`num_epochs_per_decay`=0.1 is under one step",
        ),
        ({"learning_rate": -1.0}, "`learning_rate` must be >= 0, got -1.0"),
        ({"warmup_epochs": -1.0}, "`warmup_epochs` must be >= 0"),
        ({"decay_factor": 0.0}, "`decay_factor` must be > 0"),
    ],
)
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _make(**{"decay_type": "exponential", **kwargs})


def test_cosine_needs_the_run_length():
    with pytest.raises(ValueError, match="`total_steps` must be >= 1, got None"):
        _make("cosine")
