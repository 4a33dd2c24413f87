"""BN statistics owned by the train step, checked against numpy."""

import logging as std_logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from numpy_reference import LOSS, mlp, numpy_bn_inputs

import tfloop
from tfloop import bn


def _ema(values, decay, averaging):
    """Reference moving averages of a list of per-step batch statistics."""
    if averaging == "debias":
        t = len(values)
        weights = [(1 - decay) * decay ** (t - 1 - i) for i in range(t)]
        return sum(w * v for w, v in zip(weights, values)) / (1 - decay**t)
    average = None
    for t, value in enumerate(values):
        d = decay if averaging == "plain" else min(decay, (1 + t) / (10 + t))
        initial = np.zeros_like(value) if average is None else average
        average = d * initial + (1 - d) * value
    return average


@pytest.mark.parametrize("averaging", ["debias", "ramp", "plain"])
def test_moving_statistics_equal_numpy_ema(averaging):
    model = mlp()
    step = tfloop.make_train_step(
        model,
        keras.optimizers.SGD(0.1),
        LOSS,
        bn_decay=0.7,
        bn_averaging=averaging,
    )
    rng = np.random.default_rng(0)
    means = [[], []]
    variances = [[], []]
    for _ in range(4):
        x = (rng.normal(size=(16, 5)) * 2 + 1).astype("float32")
        y = rng.integers(0, 4, 16)
        for i, h in enumerate(numpy_bn_inputs(model, x)):
            means[i].append(h.mean(0))
            variances[i].append(h.var(0))
        step((x, y))
    for i, layer in enumerate(bn.layers(model)):
        expected_mean = _ema(means[i], 0.7, averaging)
        # The variance starts at 1, not 0, for the non-debiased modes.
        expected_var = _ema(variances[i], 0.7, averaging)
        if averaging != "debias":
            d = [
                0.7 if averaging == "plain" else min(0.7, (1 + t) / (10 + t))
                for t in range(4)
            ]
            expected_var = expected_var + np.prod(d)
        np.testing.assert_allclose(
            layer.moving_mean.numpy(), expected_mean, rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            layer.moving_variance.numpy(), expected_var, rtol=1e-4, atol=1e-5
        )


def test_debiased_statistics_equal_first_batch_after_one_step():
    model = mlp(momentum=0.9997)
    step = tfloop.make_train_step(model, keras.optimizers.SGD(0.0), LOSS)
    x = np.random.default_rng(3).normal(size=(32, 5)).astype("float32") * 3 + 2
    h1 = numpy_bn_inputs(model, x)[0]
    step((x, np.zeros(32, "int64")))
    layer = bn.layers(model)[0]
    np.testing.assert_allclose(layer.moving_mean.numpy(), h1.mean(0), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), h1.var(0), rtol=1e-4)


class Block(keras.layers.Layer):
    """A custom layer holding a BN layer and omitting `training` in its call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(4)
        self.norm = keras.layers.BatchNormalization()

    def call(self, x):
        return self.norm(self.dense(x))


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.norm = keras.layers.BatchNormalization()
        self.head = keras.layers.Dense(3)

    def call(self, x, training=None):
        return self.head(self.norm(self.block(x), training=training))


def test_layers_finds_nested_and_custom_layers():
    inner = keras.Sequential([keras.layers.Dense(4), keras.layers.BatchNormalization()])
    inputs = keras.Input((4,))
    outputs = keras.layers.BatchNormalization()(inner(inputs))
    nested = keras.Model(inputs, outputs)
    assert len(bn.layers(nested)) == 2
    model = Subclassed()
    model(np.zeros((2, 4), "float32"))
    assert {layer.path for layer in bn.layers(model)} == {
        model.norm.path,
        model.block.norm.path,
    }


class HardCodedInference(keras.Model):
    def __init__(self):
        super().__init__()
        self.good = keras.layers.BatchNormalization(name="good")
        self.stuck = keras.layers.BatchNormalization(name="stuck")
        self.frozen = keras.layers.BatchNormalization(name="untrainable")
        self.frozen.trainable = False
        self.unused = keras.layers.BatchNormalization(name="unused")
        self.head = keras.layers.Dense(2)

    def call(self, x, training=None):
        x = self.good(x, training=training)
        x = self.stuck(x, training=False)
        return self.head(self.frozen(x, training=training))


def _data(n=8, width=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, width)).astype("float32"), rng.integers(0, 2, n)


def test_audit_names_layers_that_would_not_learn(caplog):
    model = HardCodedInference()
    model.unused.build((None, 4))
    step = tfloop.make_train_step(model, keras.optimizers.SGD(0.1), LOSS)
    with caplog.at_level(std_logging.WARNING):
        step(_data())
    text = caplog.text
    assert "3 BatchNormalization layer(s)" in text
    for name in ("stuck", "untrainable", "unused"):
        assert f"{name}`" in text
    assert "trainable=False" in text
    assert "good`" not in text
    strict = tfloop.make_train_step(
        HardCodedInference(), keras.optimizers.SGD(0.1), LOSS, bn_audit="error"
    )
    with pytest.raises(bn.BatchNormAuditError, match="stuck"):
        strict(_data())


def test_audit_accepts_layers_that_inherit_training(caplog):
    model = Subclassed()
    step = tfloop.make_train_step(
        model, keras.optimizers.SGD(0.1), LOSS, bn_audit="error"
    )
    step(_data(width=4))
    assert [int(c.numpy()) for c in bn.state(model).counts] == [1, 1]


def test_shared_layer_is_updated_once_from_all_its_calls():
    keras.utils.set_random_seed(0)
    shared = keras.layers.BatchNormalization(momentum=0.5)
    a, b = keras.Input((3,)), keras.Input((3,))
    merged = keras.layers.Concatenate()([shared(a), shared(b)])
    model = keras.Model([a, b], keras.layers.Dense(2)(merged))
    step = tfloop.make_train_step(model, keras.optimizers.SGD(0.0), LOSS)
    rng = np.random.default_rng(0)
    xa = rng.normal(size=(8, 3)).astype("float32")
    xb = (rng.normal(size=(8, 3)) * 3 + 5).astype("float32")
    step(((xa, xb), np.zeros(8, "int64")))
    both = np.concatenate([xa, xb])
    np.testing.assert_allclose(shared.moving_mean.numpy(), both.mean(0), rtol=1e-5)
    np.testing.assert_allclose(shared.moving_variance.numpy(), both.var(0), rtol=1e-4)
    assert int(bn.state(model).counts[0].numpy()) == 1


def test_owned_layer_outside_a_step_behaves_like_stock_keras():
    x = np.random.default_rng(0).normal(size=(8, 5)).astype("float32")
    owned, stock = mlp(momentum=0.6), mlp(momentum=0.6)
    tfloop.make_train_step(owned, keras.optimizers.SGD(0.1), LOSS)
    np.testing.assert_array_equal(owned(x, training=True), stock(x, training=True))
    for a, b in zip(owned.weights, stock.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_checkpoints_interchange_with_stock_models(tmp_path):
    owned = mlp()
    step = tfloop.make_train_step(owned, keras.optimizers.SGD(0.1), LOSS)
    step(_data(16, 5))
    path = tf.train.Checkpoint(model=owned).write(str(tmp_path / "owned"))
    stock = mlp()
    stock.get_layer("d1").kernel.assign(tf.zeros_like(stock.get_layer("d1").kernel))
    tf.train.Checkpoint(model=stock).read(path).assert_consumed()
    for a, b in zip(owned.weights, stock.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # And back: a stock checkpoint into an owned model, counts untouched.
    stock_path = tf.train.Checkpoint(model=stock).write(str(tmp_path / "stock"))
    fresh = mlp()
    tfloop.make_train_step(fresh, keras.optimizers.SGD(0.1), LOSS)
    tf.train.Checkpoint(model=fresh).read(stock_path).assert_consumed()
    for a, b in zip(fresh.weights, stock.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_state_round_trips_through_a_checkpoint(tmp_path):
    model = mlp()
    step = tfloop.make_train_step(model, keras.optimizers.SGD(0.1), LOSS)
    for _ in range(3):
        step(_data(16, 5))
    path = tf.train.Checkpoint(model=model, bn=bn.state(model)).write(
        str(tmp_path / "c")
    )
    restored = mlp()
    tfloop.make_train_step(restored, keras.optimizers.SGD(0.1), LOSS)
    tf.train.Checkpoint(model=restored, bn=bn.state(restored)).read(
        path
    ).assert_consumed()
    assert [int(c.numpy()) for c in bn.state(restored).counts] == [3, 3]


# --- BN layers as users write them ------------------------------------------


class FrozenBatchNorm(keras.layers.BatchNormalization):
    """Detection-style frozen BN: always inference mode, whatever `training` says."""

    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=False, mask=mask)


class SelfUpdatingBatchNorm(keras.layers.BatchNormalization):
    """A subclass whose own `call` trains (stock Keras would update it)."""

    def call(self, inputs, training=None, mask=None):
        return super().call(inputs * 1.0, training=training, mask=mask)


def _with(norm: keras.layers.Layer) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4), norm, keras.layers.Dense(2)]
    )


def test_subclass_with_its_own_call_is_honoured_not_owned():
    norm = FrozenBatchNorm(name="frozen_bn")
    model = _with(norm)
    norm.moving_mean.assign([1.0, 2.0, 3.0, 4.0])
    x, y = _data()
    expected = model(x, training=False).numpy()  # Its own call: moving stats.
    step = tfloop.make_train_step(
        model, keras.optimizers.SGD(0.0), LOSS, bn_audit="error"
    )
    step((x, y))
    assert bn.layers(model) == [norm] and bn.state(model).counts == []
    np.testing.assert_array_equal(norm.moving_mean.numpy(), [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(model(x, training=True), expected, rtol=1e-6)


def test_subclass_whose_call_trains_is_refused_by_name():
    model = _with(SelfUpdatingBatchNorm(name="custom_bn"))
    step = tfloop.make_train_step(model, keras.optimizers.SGD(0.1), LOSS)
    with pytest.raises(
        bn.BatchNormAuditError, match="SelfUpdatingBatchNorm.*custom_bn"
    ):
        step(_data())


class Gated(keras.layers.Layer):
    """BN inside `tf.cond` (stochastic-depth style) and in a `tf.while_loop`."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        self.mode = mode
        self.norm = keras.layers.BatchNormalization(momentum=0.9)

    def build(self, shape):
        self.norm.build(shape)

    def call(self, x, training=None):
        if self.mode == "cond":
            use = tf.reduce_mean(x) > -100.0 if self.mode == "cond" else None
            return tf.cond(use, lambda: self.norm(x, training=training), lambda: x)
        if self.mode == "skip":
            return tf.cond(
                tf.reduce_mean(x) > 1e6,
                lambda: self.norm(x, training=training),
                lambda: x,
            )

        # "while": the same layer on x, x + 1, x + 2 (a recurrent cell's BN).
        def body(i, total):
            shifted = x + tf.cast(i, x.dtype)
            return i + 1, total + self.norm(shifted, training=training)

        _, total = tf.while_loop(lambda i, _: i < 3, body, [0, tf.zeros_like(x)])
        return total


def _gated(mode: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(4, name="d")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2)(Gated(mode, name="gated")(hidden)))


@pytest.mark.parametrize("mode", ["cond", "while", "skip"])
def test_bn_inside_control_flow_is_owned(mode, caplog):
    model = _gated(mode)
    layer = bn.layers(model)[0]
    step = tfloop.make_train_step(
        model, keras.optimizers.SGD(0.0), LOSS, bn_audit="error", bn_averaging="debias"
    )
    x, y = _data()
    with caplog.at_level(std_logging.WARNING):
        step((x, y))
    kernel, bias = (w.numpy() for w in model.get_layer("d").weights)
    h = (x @ kernel + bias).astype("float64")
    if mode == "skip":  # The branch never ran: nothing changes, nothing counts.
        np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(4))
        assert int(bn.state(model).counts[0].numpy()) == 0
        return
    inputs = h if mode == "cond" else np.concatenate([h, h + 1, h + 2])
    # Debiased after one step: exactly the batch moments, pooled over calls.
    np.testing.assert_allclose(layer.moving_mean.numpy(), inputs.mean(0), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), inputs.var(0), rtol=1e-4)
    assert int(bn.state(model).counts[0].numpy()) == 1
    assert "unchanged" not in caplog.text


@pytest.mark.parametrize("averaging", ["debias", "ramp", "plain"])
def test_restored_statistics_count_as_history(averaging, tmp_path):
    """Statistics from `model.fit`, restored by a checkpoint, are not thrown away."""
    x, y = _data(n=32, width=5, seed=1)
    x = x * 3.0 + 10.0
    stock = mlp(momentum=0.5)
    stock.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    stock.fit(x, y, batch_size=8, epochs=2, verbose=0)
    path = tf.train.Checkpoint(model=stock).write(str(tmp_path / "stock"))
    model = mlp(momentum=0.999)
    tf.train.Checkpoint(model=model).read(path).assert_existing_objects_matched()
    restored = [layer.moving_mean.numpy().copy() for layer in bn.layers(model)]
    assert np.abs(restored[0]).max() > 1.0
    step = tfloop.make_train_step(
        model, keras.optimizers.SGD(0.0), LOSS, bn_averaging=averaging
    )
    batch = x[:16]
    step((batch, y[:16]))
    h1 = numpy_bn_inputs(model, batch)[0]
    expected = 0.999 * restored[0] + 0.001 * h1.mean(0)
    np.testing.assert_allclose(
        bn.layers(model)[0].moving_mean.numpy(), expected, rtol=1e-5
    )
    assert all(s.initial_weight == 0.0 for s in bn.staleness(model, batch))


def test_fresh_statistics_are_still_debiased_from_the_initializer():
    model = mlp(momentum=0.999)
    x, y = _data(n=16, width=5)
    tfloop.make_train_step(model, keras.optimizers.SGD(0.0), LOSS)((x, y))
    h1 = numpy_bn_inputs(model, x)[0]
    np.testing.assert_allclose(
        bn.layers(model)[0].moving_mean.numpy(), h1.mean(0), rtol=1e-5
    )


def test_unfreeze_restores_exactly_what_freeze_found():
    backbone = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4), keras.layers.BatchNormalization()],
        name="backbone",
    )
    inputs = keras.Input((4,))
    head = keras.layers.BatchNormalization(name="head_bn")(backbone(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(head))
    backbone.trainable = False
    bn.freeze(model)
    assert not any(layer.trainable for layer in bn.layers(model))
    bn.unfreeze(model)
    assert {layer.name: layer.trainable for layer in bn.layers(model)} == {
        backbone.layers[1].name: False,
        "head_bn": True,
    }


def test_staleness_reports_how_the_updating_step_averages():
    model = mlp(momentum=0.9)
    x, y = _data(n=16, width=5)
    plain = tfloop.make_train_step(
        model, keras.optimizers.SGD(0.0), LOSS, bn_averaging="plain"
    )
    tfloop.make_train_step(model, keras.optimizers.SGD(0.0), LOSS, bn_decay=0.5)
    for _ in range(2):
        plain((x, y))
    assert bn.staleness(model, x)[0].initial_weight == pytest.approx(0.9**2)


def test_audit_error_keeps_its_type_inside_a_users_tf_function():
    step = tfloop.make_train_step(
        HardCodedInference(), keras.optimizers.SGD(0.1), LOSS, bn_audit="error"
    )

    @tf.function
    def user_loop(x, y):
        return step.replica_fn(x, y)

    with pytest.raises(bn.BatchNormAuditError, match="stuck"):
        user_loop(*_data())


def test_audit_warns_once_under_two_replicas(mirrored, caplog):
    with mirrored.scope():
        model = HardCodedInference()
        model(np.zeros((1, 4), "float32"))
        optimizer = keras.optimizers.SGD(0.1)
    step = tfloop.make_train_step(model, optimizer, LOSS)
    dataset = tf.data.Dataset.from_tensor_slices(_data()).batch(8)
    with caplog.at_level(std_logging.WARNING):
        step(next(iter(mirrored.experimental_distribute_dataset(dataset))))
    assert caplog.text.count("BatchNormalization layer(s) will keep") == 1


def test_strategy_is_taken_from_the_models_variables(mirrored):
    with mirrored.scope():
        model = mlp()
        optimizer = keras.optimizers.SGD(0.1)
    step = tfloop.make_train_step(model, optimizer, LOSS)  # Outside the scope.
    assert step.strategy is mirrored
    x, y = _data(n=8, width=5)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    step(next(iter(mirrored.experimental_distribute_dataset(dataset))))
    assert int(bn.state(model).counts[0].numpy()) == 1
