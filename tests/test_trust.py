"""The trusted validation: recalibrated numbers, stale check on a few batches."""

import numpy as np
import tensorflow as tf
from numpy_reference import LOSS, mlp

import tfloop
from tfloop import bn, trust


def _data(shift):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(96, 5)) * [1, 2, 3, 4, 5] + shift).astype("float32")
    y = rng.integers(0, 4, 96)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    return dataset, dataset.take(trust.CHECK_BATCHES)


def _statistics(model):
    return [v.numpy().copy() for v in trust._variables(model)]


def _recalibrate(model, dataset):
    return lambda: bn.recalibrate(model, dataset, num_batches=4)


def test_stale_averages_get_the_full_check_and_precise_statistics_stay():
    model = mlp()  # Fresh moving statistics (0 and 1) against inputs near 100.
    val, head = _data(shift=[5, -3, 0, 1, 100])
    eval_step = tfloop.make_eval_step(model, LOSS)
    expected_moving = tfloop.evaluate(eval_step, val)
    # The reference: recalibrate and validate a copy, the plain way.
    reference = mlp()
    reference.set_weights(model.get_weights())
    bn.recalibrate(reference, val, num_batches=4)
    expected = tfloop.evaluate(tfloop.make_eval_step(reference, LOSS), val)

    check = trust.validate(eval_step, val, head, _recalibrate(model, val))

    assert check.full_check and check.stale
    assert check.moving_loss == expected_moving["loss"]
    assert check.moving_top1 == expected_moving["top1"]
    assert (check.loss, check.top1) == (expected["loss"], expected["top1"])
    for mine, theirs in zip(_statistics(model), _statistics(reference)):
        np.testing.assert_array_equal(mine, theirs)


def test_fresh_averages_are_checked_on_the_first_batches_only():
    model = mlp()
    val, head = _data(shift=0.0)
    bn.recalibrate(model, val, num_batches=4)  # The averages are precise.
    eval_step = tfloop.make_eval_step(model, LOSS)
    expected_head = tfloop.evaluate(eval_step, head)

    check = trust.validate(eval_step, val, head, _recalibrate(model, val))

    assert not check.full_check and not check.stale
    assert check.moving_loss == expected_head["loss"]
    assert trust.is_stale(check.loss * 1.21 + 0.06, check.loss)
    assert not trust.is_stale(check.loss + 0.049, check.loss)
