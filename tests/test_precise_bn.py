"""Precise BN (`recalibrate`), `staleness` and `freeze`, checked against numpy."""

import importlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from numpy_reference import LOSS, mlp, numpy_bn_inputs

import tfloop
from tfloop import bn


def _population(model, batches):
    """Population mean/var of each BN layer's inputs, upstream BN on batch stats."""
    inputs = [numpy_bn_inputs(model, x) for x in batches]
    return [
        (
            np.concatenate([h[i] for h in inputs]).mean(0),
            np.concatenate([h[i] for h in inputs]).var(0),
        )
        for i in range(2)
    ]


def _features(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 5)) * [1, 2, 3, 4, 5] + [5, -3, 0, 1, 100]).astype(
        "float32"
    )


@pytest.mark.parametrize("sizes", [[32], [10, 10, 10, 2], [7, 25]])
def test_recalibrate_sets_population_statistics(sizes):
    model = mlp(dropout=0.5)  # Dropout must stay off while recalibrating.
    x = _features()
    batches = np.split(x, np.cumsum(sizes)[:-1])
    snapshot = {v.path: v.numpy().copy() for v in model.trainable_variables}
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(batches), output_signature=tf.TensorSpec((None, 5), tf.float32)
    )
    assert bn.recalibrate(model, dataset, num_batches=10) == len(sizes)
    for layer, (mean, var) in zip(bn.layers(model), _population(model, batches)):
        np.testing.assert_allclose(
            layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-4
        )
        np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-4)
    for variable in model.trainable_variables:
        np.testing.assert_array_equal(variable.numpy(), snapshot[variable.path])
    assert [int(c.numpy()) for c in bn.state(model).counts] == [len(sizes)] * 2


def test_recalibrate_takes_at_most_num_batches():
    model = mlp()
    batches = np.split(_features(), 4)
    dataset = tf.data.Dataset.from_tensor_slices(np.stack(batches))
    assert bn.recalibrate(model, dataset, num_batches=2) == 2
    mean, _ = _population(model, batches[:2])[0]
    np.testing.assert_allclose(
        bn.layers(model)[0].moving_mean.numpy(), mean, rtol=1e-5, atol=1e-4
    )
    with pytest.raises(ValueError, match="`num_batches`"):
        bn.recalibrate(model, dataset, num_batches=0)


def _numpy_stop(model, batches, tolerance):
    """Batches a tolerance-based recalibration uses, computed with numpy alone.

    The first b >= 4 at which, for both BN layers, the RMS over channels of
    SE(mean) / std and SE(var) / (2 var) (standard errors from the spread
    between batches, ddof=1) is at most `tolerance`; all batches otherwise.
    """
    inputs = [numpy_bn_inputs(model, x) for x in batches]
    epsilon = bn.layers(model)[0].epsilon
    for b in range(bn.precise.MIN_BATCHES, len(batches) + 1):
        errors = []
        for i in range(2):
            h = [np.asarray(inputs[j][i], np.float64) for j in range(b)]
            means = np.stack([x.mean(0) for x in h])
            variances = np.stack([x.var(0) for x in h])
            var = np.concatenate(h).var(0) + epsilon
            mean_se2 = means.var(0, ddof=1) / b
            var_se2 = variances.var(0, ddof=1) / b
            squared = mean_se2 / var + var_se2 / (4 * var**2)
            errors.append(np.sqrt(squared.mean()))
        if max(errors) <= tolerance:
            return b
    return len(batches)


def test_recalibrate_stops_once_the_statistics_have_converged():
    model = mlp()
    rng = np.random.default_rng(1)
    # Noisy batches: small, with batch-to-batch shifts of the inputs.
    batches = [
        _features(8, seed=i) + rng.normal(size=5).astype("float32") for i in range(16)
    ]
    dataset = tf.data.Dataset.from_tensor_slices(np.stack(batches))
    stops = {}
    for tolerance in (0.0, 0.05, 0.1, 0.2, 0.4, 10.0):
        used = bn.recalibrate(model, dataset, num_batches=16, tolerance=tolerance)
        assert used == (_numpy_stop(model, batches, tolerance) if tolerance else 16)
        stops[tolerance] = used
        mean, var = _population(model, batches[:used])[1]
        layer = bn.layers(model)[1]
        np.testing.assert_allclose(
            layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-4
        )
        np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-4)
    # The tolerances span early, intermediate and no stops.
    assert stops[10.0] == bn.precise.MIN_BATCHES
    assert any(bn.precise.MIN_BATCHES < n < 16 for n in stops.values())
    assert list(stops.values()) == sorted(stops.values(), reverse=True)


@pytest.mark.parametrize("tolerance", [-0.1, float("nan")])
def test_recalibrate_refuses_a_bad_tolerance(tolerance):
    dataset = tf.data.Dataset.from_tensor_slices(np.stack(np.split(_features(), 4)))
    with pytest.raises(ValueError, match="`tolerance`"):
        bn.recalibrate(mlp(), dataset, num_batches=2, tolerance=tolerance)


def test_recalibrate_across_two_replicas_with_different_data(mirrored):
    strategy = mirrored
    with strategy.scope():
        model = mlp()
    x = _features(30)
    x[15:] += 50.0  # Replica 1 sees very different inputs than replica 0.
    # Global batches of 10: each replica gets 5 examples; the last is partial.
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(30, "int64"))).batch(10)
    bn.recalibrate(model, dataset, num_batches=5, strategy=strategy)
    batches = np.split(x, 3)
    # Upstream BN normalizes with each replica's own batch statistics.
    per_replica = [half for b in batches for half in np.split(b, 2)]
    for layer, (mean, var) in zip(bn.layers(model), _population(model, per_replica)):
        for copy in layer.moving_mean.value.values:
            np.testing.assert_allclose(copy.numpy(), mean, rtol=1e-5, atol=1e-4)
        for copy in layer.moving_variance.value.values:
            np.testing.assert_allclose(copy.numpy(), var, rtol=1e-4)


def test_staleness_reports_lagging_statistics():
    model = mlp(momentum=0.9)
    step = tfloop.make_train_step(
        model, keras.optimizers.SGD(0.0), LOSS, bn_averaging="plain"
    )
    x = _features()
    for _ in range(3):
        step((x, np.zeros(32, "int64")))
    stale = bn.staleness(model, x)
    assert [s.layer for s in stale] == [layer.path for layer in bn.layers(model)]
    assert stale[0].initial_weight == pytest.approx(0.9**3)
    # The input mean is 100 on the last feature: 3 plain steps leave it far off.
    h1 = numpy_bn_inputs(model, x)[0]
    moving = bn.layers(model)[0].moving_mean.numpy()
    expected_shift = np.mean(np.abs(moving - h1.mean(0)) / np.sqrt(h1.var(0) + 1e-3))
    assert stale[0].mean_shift == pytest.approx(expected_shift, rel=1e-4)
    assert stale[0].mean_shift > 0.5
    bn.recalibrate(model, tf.data.Dataset.from_tensors(x), num_batches=1)
    fresh = bn.staleness(model, x)
    assert fresh[0].mean_shift < 1e-4 and fresh[0].log_variance_ratio < 1e-4


def test_debiased_statistics_carry_no_initial_weight():
    model = mlp(momentum=0.9997)
    tfloop.make_train_step(model, keras.optimizers.SGD(0.0), LOSS)(
        (_features(), np.zeros(32, "int64"))
    )
    assert all(s.initial_weight == 0.0 for s in bn.staleness(model, _features(seed=1)))


@pytest.mark.parametrize("train_scale_and_offset", [False, True])
def test_freeze_is_honoured_by_a_step_built_before_it(train_scale_and_offset):
    model = mlp()
    step = tfloop.make_train_step(model, keras.optimizers.SGD(0.5), LOSS)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 32)
    step((_features(), y))
    bn.freeze(model, train_scale_and_offset=train_scale_and_offset)
    layer = bn.layers(model)[0]
    frozen = [
        v.numpy().copy()
        for v in (layer.moving_mean, layer.moving_variance, layer.gamma)
    ]
    kernel = model.get_layer("d1").kernel.numpy().copy()
    for seed in (1, 2):
        step((_features(seed=seed), y))
    np.testing.assert_array_equal(layer.moving_mean.numpy(), frozen[0])
    np.testing.assert_array_equal(layer.moving_variance.numpy(), frozen[1])
    assert int(bn.state(model).counts[0].numpy()) == 1
    assert not np.array_equal(model.get_layer("d1").kernel.numpy(), kernel)
    gamma_moved = not np.array_equal(layer.gamma.numpy(), frozen[2])
    assert gamma_moved == train_scale_and_offset
    # Frozen layers normalize with their moving statistics in training too.
    x = _features(seed=3)
    np.testing.assert_allclose(
        model(x, training=True), model(x, training=False), rtol=1e-6
    )
    bn.unfreeze(model)
    step((x, y))
    assert int(bn.state(model).counts[0].numpy()) == 2


def test_staleness_traces_once_per_model():
    """One report per validation: the pass is traced once, not every time."""
    # `tfloop.bn.staleness` is the function; the module holds the cache.
    staleness_module = importlib.import_module("tfloop.bn.staleness")

    model = mlp()
    for seed in range(3):
        bn.staleness(model, _features(seed=seed))
    (function,) = staleness_module._FUNCTIONS[model].values()
    assert function.experimental_get_tracing_count() == 1


def test_recalibrate_without_a_layer_to_recompute_changes_nothing():
    dataset = tf.data.Dataset.from_tensor_slices(np.stack(np.split(_features(), 4)))
    dense = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    assert bn.recalibrate(dense, dataset, num_batches=2, tolerance=0.1) == 0
    model = mlp()
    bn.freeze(model)
    before = [v.numpy().copy() for v in model.weights]
    assert bn.recalibrate(model, dataset, num_batches=2) == 0
    for variable, value in zip(model.weights, before):
        np.testing.assert_array_equal(variable.numpy(), value)
