"""Many replicas: BN statistics, weights, all-reduce count and checkpoints.

Two logical CPU devices (see conftest) and the shared `mirrored` strategy.
Replica 1 is fed deliberately different data (its examples shifted by +5),
so per-replica statistics differ from global ones and the between-replica
part of the variance is large: any shortcut (one replica's moments, the mean
of per-replica variances, unsynchronized copies) fails these tests.
"""

import contextlib
from collections.abc import Callable

import keras
import numpy as np
import pytest
import tensorflow as tf
from numpy_reference import EPS, LOSS, mlp

import tfloop
from tfloop import bn

GLOBAL_BATCH = 16
STEPS = 3
DECAY = 0.7


def _global_batches(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """STEPS global batches; the second half of each (replica 1's) is shifted."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(STEPS):
        x = (rng.normal(size=(GLOBAL_BATCH, 5)) * [1, 2, 3, 1, 1]).astype("float32")
        x[GLOBAL_BATCH // 2 :] += 5.0
        batches.append((x, rng.integers(0, 4, GLOBAL_BATCH)))
    return batches


def _distributed(strategy: tf.distribute.Strategy, batches: list):
    """The same global batches, each split in halves over the replicas."""
    xs = np.concatenate([x for x, _ in batches])
    ys = np.concatenate([y for _, y in batches])
    dataset = tf.data.Dataset.from_tensor_slices((xs, ys)).batch(GLOBAL_BATCH)
    return strategy.experimental_distribute_dataset(dataset)


def _branches(num_bn: int, seed: int = 1) -> keras.Model:
    """`num_bn` parallel Dense -> BN branches of the input, then a head.

    Every BN layer's input depends on the input and Dense weights only, not
    on an upstream BN layer, so with learning rate 0 it is the same whether
    the batch runs on one device or is split over replicas.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    outputs = [
        keras.layers.BatchNormalization(momentum=0.99, epsilon=EPS)(
            keras.layers.Dense(3, name=f"branch{i}")(inputs)
        )
        for i in range(num_bn)
    ]
    merged = outputs[0] if num_bn == 1 else keras.layers.Concatenate()(outputs)
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(merged))


def _no_bn(seed: int = 1) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, activation="relu"),
            keras.layers.Dense(4),
        ]
    )


def _train(
    builder: Callable[[], keras.Model],
    strategy: tf.distribute.Strategy | None,
    batches: list,
    *,
    learning_rate: float = 0.0,
    **step_args,
) -> keras.Model:
    """Builds a model (initial weights of `builder()` on one device) and trains it.

    `strategy=None` runs on one device (the default strategy) on the global
    batches as they are; otherwise on the strategy's replicas.
    """
    reference = builder()
    scope = strategy.scope() if strategy else contextlib.nullcontext()
    with scope:
        model = builder()
        model.set_weights(reference.get_weights())
        optimizer = keras.optimizers.SGD(learning_rate)
    step = tfloop.make_train_step(
        model, optimizer, LOSS, strategy=strategy, bn_audit="error", **step_args
    )
    for element in _distributed(strategy, batches) if strategy else batches:
        step(element)
    return model


def _copies(variable) -> list[np.ndarray]:
    """Every replica's copy of a Keras or TF variable; one item on one device."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return [v.numpy() for v in getattr(variable, "values", (variable,))]


def _debiased_ema(values: list[np.ndarray], decay: float) -> np.ndarray:
    """Zero-debiased moving average of per-step values (as in test_bn)."""
    t = len(values)
    weights = [(1 - decay) * decay ** (t - 1 - i) for i in range(t)]
    return sum(w * v for w, v in zip(weights, values)) / (1 - decay**t)


def test_replica_statistics_are_identical_and_global(mirrored):
    batches = _global_batches()
    distributed = _train(
        lambda: _branches(2), mirrored, batches, bn_decay=DECAY, bn_averaging="debias"
    )
    one_device = _train(
        lambda: _branches(2), None, batches, bn_decay=DECAY, bn_averaging="debias"
    )
    pairs = zip(bn.layers(distributed), bn.layers(one_device))
    for i, (layer, reference) in enumerate(pairs):
        # Independent numpy reference: moments of the whole global batch.
        kernel, bias = (w.numpy() for w in one_device.get_layer(f"branch{i}").weights)
        inputs = [x @ kernel + bias for x, _ in batches]
        means = [h.mean(0) for h in inputs]
        variances = [h.var(0) for h in inputs]
        # The data make the between-replica variance matter.
        naive = [np.mean([half.var(0) for half in np.split(h, 2)], 0) for h in inputs]
        assert np.max(np.abs(naive[0] / variances[0] - 1)) > 0.1
        for name, expected in (
            ("moving_mean", _debiased_ema(means, DECAY)),
            ("moving_variance", _debiased_ema(variances, DECAY)),
        ):
            first, second = _copies(getattr(layer, name))
            np.testing.assert_array_equal(first, second, err_msg=name)
            np.testing.assert_allclose(
                first, getattr(reference, name).numpy(), rtol=1e-5, err_msg=name
            )
            np.testing.assert_allclose(
                first, expected, rtol=1e-4, atol=1e-5, err_msg=name
            )
    counts = [_copies(c) for c in bn.state(distributed).counts]
    assert counts == [[STEPS, STEPS]] * 2


def test_stock_keras_leaves_replica_copies_different(mirrored):
    """The bug tfloop fixes: each replica averages its own shard into its copy."""
    model = _train(lambda: _branches(2), mirrored, _global_batches(), own_bn=False)
    for layer in bn.layers(model):
        first, second = _copies(layer.moving_mean)
        assert np.max(np.abs(first - second)) > 0.01


@pytest.mark.parametrize(
    "builder, step_args",
    [(mlp, {"sync_bn": True}), (_no_bn, {})],
    ids=["sync_bn", "no_bn"],
)
def test_weights_equal_one_device(mirrored, builder, step_args):
    batches = _global_batches()
    distributed = _train(builder, mirrored, batches, learning_rate=0.5, **step_args)
    one_device = _train(builder, None, batches, learning_rate=0.5)
    initial = builder()
    moved = False
    for variable, reference, start in zip(
        distributed.weights, one_device.weights, initial.weights
    ):
        first, second = _copies(variable)
        np.testing.assert_array_equal(first, second, err_msg=variable.path)
        np.testing.assert_allclose(
            first, reference.numpy(), rtol=1e-5, atol=1e-6, err_msg=variable.path
        )
        moved |= not np.allclose(first, start.numpy())
    assert moved  # The steps did change the weights.


class _ReductionCounter:
    """Counts the tensors a strategy reduces across replicas while tracing.

    Every cross-replica reduction of `MirroredStrategy` goes through its
    `_reduce_to` (`strategy.reduce`) or `_batch_reduce_to` (replica-context
    `all_reduce` and the optimizer's gradient aggregation); each reduced
    tensor is one all-reduce.
    """

    def __init__(self, strategy: tf.distribute.Strategy, monkeypatch) -> None:
        self.count = 0
        extended = strategy.extended
        reduce_to, batch_reduce_to = extended._reduce_to, extended._batch_reduce_to

        def counting_reduce_to(reduce_op, value, destinations, options):
            self.count += 1
            return reduce_to(reduce_op, value, destinations, options)

        def counting_batch_reduce_to(reduce_op, value_destination_pairs, options):
            self.count += len(value_destination_pairs)
            return batch_reduce_to(reduce_op, value_destination_pairs, options)

        monkeypatch.setattr(extended, "_reduce_to", counting_reduce_to)
        monkeypatch.setattr(extended, "_batch_reduce_to", counting_batch_reduce_to)


def _reductions(
    strategy: tf.distribute.Strategy, monkeypatch, num_bn: int, **step_args
) -> int:
    """All-reduces in one trace of a train step of `_branches(num_bn)`."""
    with strategy.scope():
        model = _branches(num_bn)
    step = tfloop.make_train_step(
        model, keras.optimizers.SGD(0.1), LOSS, strategy=strategy, **step_args
    )
    element = next(iter(_distributed(strategy, _global_batches())))
    with monkeypatch.context() as patch:
        counter = _ReductionCounter(strategy, patch)
        tf.function(step._step).get_concrete_function(element)
    return counter.count


def test_one_all_reduce_for_all_bn_layers(mirrored, monkeypatch):
    def bn_reductions(num_bn: int, **step_args) -> int:
        # Stock BN makes no reduction: the rest (gradients, metrics) is common.
        return _reductions(mirrored, monkeypatch, num_bn, **step_args) - _reductions(
            mirrored, monkeypatch, num_bn, own_bn=False
        )

    # Every BN layer's moments ride on the all-reduce that the step makes
    # anyway for the global example count: no reduction of their own.
    assert bn_reductions(1) == bn_reductions(4) == 0
    # Synchronized BN needs one all-reduce per layer in the forward pass, and
    # its gradient one in the backward pass (Keras' own makes three of each).
    assert bn_reductions(4, sync_bn=True) == 4 * bn_reductions(1, sync_bn=True) == 8


def _checkpoint(model: keras.Model) -> tf.train.Checkpoint:
    return tf.train.Checkpoint(model=model, bn=bn.state(model))


def test_checkpoint_from_two_replicas_restores_on_one_device(mirrored, tmp_path):
    trained = _train(
        lambda: _branches(2), mirrored, _global_batches(), learning_rate=0.1
    )
    path = _checkpoint(trained).write(str(tmp_path / "ckpt"))
    restored = _branches(2, seed=2)  # Other initial weights.
    _checkpoint(restored).read(path).assert_consumed()
    for variable, expected in zip(restored.weights, trained.weights):
        first, second = _copies(expected)
        np.testing.assert_array_equal(first, second)
        np.testing.assert_array_equal(variable.numpy(), first, err_msg=variable.path)
    counts = [int(c.numpy()) for c in bn.state(restored).counts]
    assert counts == [STEPS] * 2


def test_checkpoint_from_one_device_restores_on_every_replica(mirrored, tmp_path):
    trained = _train(lambda: _branches(2), None, _global_batches(), learning_rate=0.1)
    path = _checkpoint(trained).write(str(tmp_path / "ckpt"))
    with mirrored.scope():
        restored = _branches(2, seed=2)
    # `bn.state` before any step, outside the scope, as a user may write it.
    _checkpoint(restored).read(path).assert_consumed()
    for variable, expected in zip(restored.weights, trained.weights):
        for copy in _copies(variable):
            np.testing.assert_array_equal(copy, expected.numpy(), err_msg=variable.path)
    # Training goes on from the restored update counts, once per step.
    step = tfloop.make_train_step(
        restored, keras.optimizers.SGD(0.0), LOSS, strategy=mirrored
    )
    step(next(iter(_distributed(mirrored, _global_batches(seed=1)))))
    for count in bn.state(restored).counts:
        assert _copies(count) == [STEPS + 1, STEPS + 1]


def test_an_empty_shard_counts_for_nothing(mirrored):
    """A last global batch of one example leaves replica 1 with none."""
    with mirrored.scope():
        model = _branches(2)
    x = _global_batches()[0][0][:5]
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(4)  # 4, then 1.
    assert bn.recalibrate(model, dataset, num_batches=2, strategy=mirrored) == 2
    for i, layer in enumerate(bn.layers(model)):
        kernel, bias = (w.numpy() for w in model.get_layer(f"branch{i}").weights)
        h = x @ kernel + bias
        for name, expected in (
            ("moving_mean", h.mean(0)),
            ("moving_variance", h.var(0)),
        ):
            for copy in _copies(getattr(layer, name)):
                np.testing.assert_allclose(
                    copy, expected, rtol=1e-5, atol=1e-6, err_msg=name
                )


# --- Nothing silently wrong across replicas ---------------------------------


def _uneven_batches() -> list[tuple[np.ndarray, np.ndarray]]:
    """Global batches of 5 (3 + 2 per replica) and 1 (1 + an empty shard)."""
    x, y = _global_batches()[0]
    return [(x[:5], y[:5]), (x[5:6], y[5:6])]


def _train_losses(builder, strategy, batches, **step_args):
    reference = builder()
    scope = strategy.scope() if strategy else contextlib.nullcontext()
    with scope:
        model = builder()
        model.set_weights(reference.get_weights())
        optimizer = keras.optimizers.SGD(0.5)
    step = tfloop.make_train_step(
        model, optimizer, LOSS, strategy=strategy, **step_args
    )
    elements = (
        strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices(
                tuple(np.concatenate(parts) for parts in zip(*batches))
            ).batch(5)
        )
        if strategy
        else batches
    )
    losses = [float(step(element)["loss"]) for element in elements]
    return model, losses


@pytest.mark.parametrize("builder", [mlp, _no_bn], ids=["bn", "no_bn"])
def test_uneven_and_empty_shards_equal_one_device(mirrored, builder):
    batches = _uneven_batches()
    distributed, losses = _train_losses(builder, mirrored, batches, sync_bn=True)
    one_device, expected = _train_losses(builder, None, batches)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    for variable, reference in zip(distributed.weights, one_device.weights):
        for copy in _copies(variable):
            np.testing.assert_allclose(
                copy, reference.numpy(), rtol=1e-5, atol=1e-6, err_msg=variable.path
            )


def _input_normalizer(**bn_args) -> keras.Model:
    """BN as the first layer: it sees the raw features (an input normalizer)."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.BatchNormalization(**bn_args),
            keras.layers.Dense(2),
        ]
    )


def _large_mean_batch(mean: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = (mean + rng.normal(size=(16, 3)) * [1.0, 0.5, 2.0]).astype("float32")
    x[8:] += 0.5  # Replica 1's shard differs from replica 0's.
    return x, rng.integers(0, 2, 16)


@pytest.mark.parametrize("mean", [1e3, 1e4])
@pytest.mark.parametrize(
    "how", ["step", "sync_bn", "synchronized_layer", "recalibrate"]
)
def test_pooled_variance_is_exact_at_large_means(mirrored, mean, how):
    x, y = _large_mean_batch(mean)
    with mirrored.scope():
        model = _input_normalizer(synchronized=how == "synchronized_layer")
        optimizer = keras.optimizers.SGD(0.0)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    if how == "recalibrate":
        bn.recalibrate(model, dataset, num_batches=1, strategy=mirrored)
    else:
        step = tfloop.make_train_step(
            model, optimizer, LOSS, strategy=mirrored, sync_bn=how == "sync_bn"
        )
        step(next(iter(mirrored.experimental_distribute_dataset(dataset))))
    layer = bn.layers(model)[0]
    exact = x.astype("float64")  # The float32 inputs, pooled in float64.
    for copy in _copies(layer.moving_variance):
        np.testing.assert_allclose(copy, exact.var(0), rtol=1e-3)
    for copy in _copies(layer.moving_mean):
        np.testing.assert_allclose(copy, exact.mean(0), rtol=1e-6)


def test_synchronized_layers_normalize_with_global_moments(mirrored):
    """A layer with `synchronized=True` trains like one device, `sync_bn` or not."""

    def builder():
        keras.utils.set_random_seed(1)
        return keras.Sequential(
            [
                keras.Input((5,)),
                keras.layers.Dense(6),
                keras.layers.BatchNormalization(synchronized=True),
                keras.layers.ReLU(),
                keras.layers.Dense(4),
            ]
        )

    batches = _global_batches()
    distributed = _train(builder, mirrored, batches, learning_rate=0.5)
    one_device = _train(builder, None, batches, learning_rate=0.5)
    for variable, reference in zip(distributed.weights, one_device.weights):
        for copy in _copies(variable):
            np.testing.assert_allclose(
                copy, reference.numpy(), rtol=1e-5, atol=1e-6, err_msg=variable.path
            )


def test_bn_inside_tf_cond_pools_every_replica(mirrored):
    class Gated(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.norm = keras.layers.BatchNormalization()

        def build(self, shape):
            self.norm.build(shape)

        def call(self, x, training=None):
            return tf.cond(
                tf.size(x) >= 0, lambda: self.norm(x, training=training), lambda: x
            )

    with mirrored.scope():
        keras.utils.set_random_seed(2)
        model = keras.Sequential([keras.Input((5,)), Gated(), keras.layers.Dense(4)])
        optimizer = keras.optimizers.SGD(0.0)
    step = tfloop.make_train_step(model, optimizer, LOSS, bn_audit="error")
    x, y = _global_batches()[0]
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    step(next(iter(mirrored.experimental_distribute_dataset(dataset))))
    layer = bn.layers(model)[0]
    for copy in _copies(layer.moving_variance):
        np.testing.assert_allclose(copy, x.astype("float64").var(0), rtol=1e-4)


def test_reduce_metrics_gives_global_values_in_both_contexts(mirrored):
    values = {
        "loss": [0.25, 0.5],
        "data_loss": [0.2, 0.4],
        "correct": [3.0, 1.0],
        "count": [4.0, 4.0],
    }

    def replica(key):
        return lambda context: tf.constant(
            values[key][context.replica_id_in_sync_group]
        )

    per_replica = {
        key: mirrored.experimental_distribute_values_from_function(replica(key))
        for key in values
    }
    expected = {"loss": 0.75, "data_loss": 0.6, "top1": 0.5}
    cross = tfloop.reduce_metrics(per_replica, mirrored)
    assert {k: float(cross[k]) for k in expected} == pytest.approx(expected)
    assert float(cross["correct"]) == 4.0 and float(cross["count"]) == 8.0
    inside = mirrored.run(lambda v: tfloop.reduce_metrics(v), args=(per_replica,))
    for key, value in expected.items():
        assert [float(t) for t in _copies(inside[key])] == pytest.approx([value] * 2)
