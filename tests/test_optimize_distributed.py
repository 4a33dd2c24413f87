"""`optimize_loss` under `MirroredStrategy`: the knobs act on the global gradients."""

from __future__ import annotations

import functools
import random

import numpy as np
import tensorflow as tf
from optimize_reference import (
    B0,
    BATCH,
    LR,
    W0,
    _assert_weights,
    _batches,
    _clip_each,
    _clip_global,
    _global_norm,
    _grads,
    _loss,
    _model,
    _numpy_loss,
    _numpy_sgd,
    _read_events,
    _train,
    _weights,
)

from tfloop import optimize


@functools.cache
def _mirrored() -> tf.distribute.MirroredStrategy:
    """One strategy for the module, reducing without collective ops.

    Every default `MirroredStrategy` over the same devices restarts TF's
    collective instance keys, so a second one in the same process can hit
    "Shape mismatch in the collective instance" (tensorflow#62790). The
    reduction implementation does not change what these tests check.
    """
    return tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def _distributed(strategy, batches):
    """The same global batches, split so each replica sees different examples."""
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    return strategy.experimental_distribute_dataset(dataset)


KNOBS = {
    "clip_gradients": 0.5,
    "clip_gradient_norm": 0.4,
    "gradient_multipliers": {"bias": 3.0},
}


def _knobs_numpy(grads):
    return _clip_each(_clip_global([grads[0], grads[1] * 3.0], 0.5), 0.4)


def _per_replica_clipping(batches) -> list[np.ndarray]:
    """What clipping each replica's own gradient (then summing) would give."""
    params = [W0.copy(), B0.copy()]
    half = BATCH // 2
    for x, y in batches:
        shares = [
            [g / 2 for g in _grads(*params, x[i : i + half], y[i : i + half])]
            for i in (0, half)
        ]
        grads = [sum(gs) for gs in zip(*(_knobs_numpy(share) for share in shares))]
        params = [p - LR * g for p, g in zip(params, grads)]
    return params


def test_mirrored_clipped_sgd_equals_one_device(tmp_path):
    steps, batches = 4, _batches(steps=4, seed=1)
    strategy = _mirrored()
    model = _model(strategy)
    step = optimize.optimize_loss(
        model,
        _loss,
        learning_rate=LR,
        optimizer="SGD",
        strategy=strategy,
        summaries=optimize.OPTIMIZER_SUMMARIES,
        **KNOBS,
    )
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        for element in _distributed(strategy, batches):
            step(element)
    writer.flush()
    single = _model()
    _train(
        optimize.optimize_loss(
            single, _loss, learning_rate=LR, optimizer="SGD", **KNOBS
        ),
        batches,
    )
    expected = _numpy_sgd(batches, _knobs_numpy)
    _assert_weights(single, expected)
    for got, want in zip(_weights(model), _weights(single)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # The check can fail: clipping per replica would land elsewhere.
    assert not np.allclose(_per_replica_clipping(batches)[0], expected[0], rtol=1e-3)
    assert int(step.global_step.numpy()) == steps
    # One event per step and tag (replica 0's), holding global-batch values.
    events = _read_events(tmp_path)
    assert len(events) == 8
    for by_step in events.values():
        assert sorted(by_step) == list(range(steps))
    params = [W0.copy(), B0.copy()]
    for t, (x, y) in enumerate(batches):
        grads = _grads(*params, x, y)
        np.testing.assert_allclose(
            events["loss"][t], _numpy_loss(*params, x, y), rtol=1e-5
        )
        np.testing.assert_allclose(
            events["global_norm/gradient_norm"][t],
            _global_norm([grads[0], grads[1] * 3.0]),
            rtol=1e-5,
        )
        params = [p - LR * g for p, g in zip(params, _knobs_numpy(grads))]


def test_mirrored_gradient_noise_equals_one_device():
    batches = _batches(steps=3, seed=2)
    strategy = _mirrored()
    model, single = _model(strategy), _model()
    random.seed(7)
    step = optimize.optimize_loss(
        model,
        _loss,
        learning_rate=LR,
        optimizer="SGD",
        strategy=strategy,
        gradient_noise_scale=0.5,
    )
    random.seed(7)
    single_step = optimize.optimize_loss(
        single, _loss, learning_rate=LR, optimizer="SGD", gradient_noise_scale=0.5
    )
    for element in _distributed(strategy, batches):
        step(element)
    _train(single_step, batches)
    for got, want in zip(_weights(model), _weights(single)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    noiseless = _numpy_sgd(batches, lambda g: g)
    assert not np.allclose(_weights(model)[0], noiseless[0], atol=1e-3)
