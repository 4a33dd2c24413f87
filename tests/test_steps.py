"""Train and eval steps with any keras.Model."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfloop
from tfloop import bn

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def _images(n, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, size, size, 3)).astype("float32"), rng.integers(0, 3, n)


def _sequential():
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(4, 3, kernel_regularizer=keras.regularizers.L2(1e-2)),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )


def _functional_nested():
    inner = keras.Sequential(
        [
            keras.layers.Conv2D(4, 3),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
        ]
    )
    inputs = keras.Input((16, 16, 3))
    x = inner(inputs)
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(x))
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(4, 3)
        self.norm = keras.layers.BatchNormalization()
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(3)

    def call(self, x, training=None):
        return self.head(self.pool(self.norm(self.conv(x), training=training)))


def _application():
    return keras.applications.MobileNetV2(
        input_shape=(32, 32, 3),
        alpha=0.35,
        weights=None,
        classes=3,
        classifier_activation=None,
    )


MODELS = {
    "sequential": _sequential,
    "functional_nested": _functional_nested,
    "subclassed": Subclassed,
    "application": _application,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_any_model_trains_owns_bn_and_eval_changes_nothing(name):
    keras.utils.set_random_seed(0)
    model = MODELS[name]()
    size = 32 if name == "application" else 16
    step = tfloop.make_train_step(
        model, keras.optimizers.SGD(0.05), LOSS, bn_audit="error"
    )
    x, y = _images(16, size)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=True)
    for element in dataset:
        step(element)
    traced = step.tracing_count  # 2 for models built lazily by the first trace.
    for element in dataset:  # A second epoch does not trace again.
        metrics = step(element)
    # Built models trace once; a subclassed model built by its first call
    # creates variables in that trace, which makes tf.function trace again.
    assert step.tracing_count == traced == (2 if name == "subclassed" else 1)
    assert set(metrics) >= {"loss", "top1"}
    assert np.isfinite(float(metrics["loss"]))
    assert [int(c.numpy()) for c in bn.state(model).counts] == [4] * len(
        bn.layers(model)
    )
    for layer in bn.layers(model):  # Moved away from the initial zeros.
        assert np.abs(layer.moving_mean.numpy()).max() > 0, layer.path

    snapshot = [v.numpy().copy() for v in model.variables]
    eval_step = tfloop.make_eval_step(model, LOSS)
    tfloop.evaluate(eval_step, tf.data.Dataset.from_tensor_slices((x, y)).batch(5))
    for variable, value in zip(model.variables, snapshot):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)


def test_evaluate_reduces_every_example_exactly():
    keras.utils.set_random_seed(0)
    model = _sequential()
    x, y = _images(23)
    logits = model(x, training=False).numpy()
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    expected_loss = -log_probs[np.arange(23), y].mean()
    expected_top1 = (logits.argmax(1) == y).mean()
    result = tfloop.evaluate(
        tfloop.make_eval_step(model, LOSS),
        tf.data.Dataset.from_tensor_slices((x, y)).batch(5),  # 5,5,5,5,3
    )
    np.testing.assert_allclose(result["loss"], expected_loss, rtol=1e-5)
    assert result["top1"] == pytest.approx(expected_top1)


def test_train_step_loss_is_global_mean_plus_regularization():
    keras.utils.set_random_seed(0)
    model = _sequential()
    x, y = _images(8)
    step = tfloop.make_train_step(model, keras.optimizers.SGD(0.0), LOSS)
    # Independent reference: the stock layer in training mode, outside a step.
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    logits = reference(x, training=True).numpy()
    shifted = logits - logits.max(1, keepdims=True)
    data_loss = -(shifted - np.log(np.exp(shifted).sum(1, keepdims=True)))[
        np.arange(8), y
    ].mean()
    kernel = model.layers[0].kernel.numpy()
    metrics = step((x, y))
    np.testing.assert_allclose(float(metrics["data_loss"]), data_loss, rtol=1e-5)
    np.testing.assert_allclose(
        float(metrics["loss"]), data_loss + 1e-2 * (kernel**2).sum(), rtol=1e-5
    )


def test_bad_arguments_name_themselves():
    model = _sequential()
    with pytest.raises(ValueError, match="`bn_averaging`"):
        tfloop.make_train_step(
            model, keras.optimizers.SGD(0.1), LOSS, bn_averaging="fast"
        )
    with pytest.raises(ValueError, match="`bn_decay`"):
        tfloop.make_train_step(model, keras.optimizers.SGD(0.1), LOSS, bn_decay=1.5)
    with pytest.raises(ValueError, match="`bn_audit`"):
        tfloop.make_train_step(model, keras.optimizers.SGD(0.1), LOSS, bn_audit="loud")


def _two_copies(strategy):
    """Two identical models with their own train steps (Adam: it has slots)."""
    with strategy.scope():
        keras.utils.set_random_seed(0)
        first = _functional_nested()
        second = keras.models.clone_model(first)
        second.set_weights(first.get_weights())
        return [
            tfloop.make_train_step(
                model, keras.optimizers.Adam(0.01), LOSS, strategy=strategy
            )
            for model in (first, second)
        ]


@pytest.mark.parametrize("replicas", [1, 2])
def test_run_is_bit_identical_to_single_steps(replicas, mirrored):
    strategy = mirrored if replicas == 2 else tf.distribute.get_strategy()
    single, looped = _two_copies(strategy)
    x, y = _images(7 * 8)
    # Static batch shape, as in training: a single step is traced for its
    # element's shapes, the loop for the iterator's (they must agree).
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=True)
    iterators = [
        iter(strategy.experimental_distribute_dataset(dataset)) for _ in range(2)
    ]
    expected_top1 = []
    for _ in range(7):
        metrics = single(next(iterators[0]))
        expected_top1.append(float(metrics["top1"]))
    # Chunks of different lengths: one trace serves them all.
    for num_steps in (3, 1, 3):
        looped_metrics = looped.run(iterators[1], num_steps)
    assert looped._functions["loop"][1].experimental_get_tracing_count() == 1
    for key in ("loss", "data_loss", "top1"):
        assert float(looped_metrics[key]) == float(metrics[key]), key
    np.testing.assert_allclose(
        float(looped_metrics["top1_sum"]), sum(expected_top1[4:]), rtol=1e-6
    )
    models = [single.model, looped.model]
    assert int(looped.optimizer.iterations.numpy()) == 7
    for a, b in zip(models[0].variables, models[1].variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    for a, b in zip(*(bn.state(m).counts for m in models)):
        assert int(a.numpy()) == int(b.numpy()) == 7


def test_run_rejects_a_bad_number_of_steps():
    step = tfloop.make_train_step(_sequential(), keras.optimizers.SGD(0.1), LOSS)
    iterator = iter(tf.data.Dataset.from_tensors(_images(4)).repeat())
    for bad in (0, -2, 2.0, True):
        with pytest.raises((ValueError, TypeError), match=f"`num_steps`.*{bad!r}"):
            step.run(iterator, bad)
