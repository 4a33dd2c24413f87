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


# --- Nothing silently wrong: dtypes, labels, eager, weights ----------------


def _dense_bn(units=3):
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, name="d1"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(units, name="out"),
        ]
    )


def _tabular(n=16, seed=0, classes=3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype("float32"), rng.integers(0, classes, n)


@pytest.fixture
def policy():
    """Sets a global dtype policy for one test, and restores float32 after it."""
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy("float32")


def _one_step_delta(model, optimizer, element):
    before = [w.numpy().astype("float64") for w in model.trainable_weights]
    step = tfloop.make_train_step(model, optimizer, LOSS)
    step(element)
    after = [w.numpy().astype("float64") for w in model.trainable_weights]
    return step, [a - b for a, b in zip(after, before)]


@pytest.mark.parametrize(
    "name,wrap",
    [("mixed_float16", True), ("mixed_float16", False), ("mixed_bfloat16", False)],
)
def test_mixed_precision_update_equals_float32_update(policy, name, wrap):
    element = _tabular()
    reference = _dense_bn()
    weights = reference.get_weights()
    _, expected = _one_step_delta(reference, keras.optimizers.SGD(0.5), element)
    policy(name)
    model = _dense_bn()
    model.set_weights(weights)
    optimizer = keras.optimizers.SGD(0.5)
    if wrap:
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    step, delta = _one_step_delta(model, optimizer, element)
    if name == "mixed_float16":  # A plain optimizer is wrapped, as compile does.
        assert isinstance(step.optimizer, keras.mixed_precision.LossScaleOptimizer)
    tolerance = 2e-2 if name == "mixed_bfloat16" else 3e-3
    # (d1's bias gets no gradient through BN: its update is ~0 either way.)
    scale = max(np.abs(want).max() for want in expected)
    assert scale > 1e-2
    for got, want in zip(delta, expected):
        np.testing.assert_allclose(got, want, atol=tolerance * scale)


@pytest.mark.parametrize("shape", ["(B,)", "(B, 1)", "one-hot"])
def test_top1_is_true_for_every_label_shape(shape):
    model = _dense_bn(units=4)
    x, y = _tabular(classes=4)
    labels = {
        "(B,)": y,
        "(B, 1)": y[:, None],
        "one-hot": np.eye(4, dtype="float32")[y],
    }[shape]
    loss = (
        keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
        if shape == "one-hot"
        else LOSS
    )
    # Reference: predictions of the same weights in each mode, numpy argmax.
    train_hits = (model(x, training=True).numpy().argmax(1) == y).mean()
    eval_hits = (model(x, training=False).numpy().argmax(1) == y).mean()
    assert 0 < train_hits < 1 and train_hits != (y == 0).mean()
    step = tfloop.make_train_step(model, keras.optimizers.SGD(0.0), loss)
    assert float(step((x, labels))["top1"]) == pytest.approx(train_hits)
    result = tfloop.evaluate(
        tfloop.make_eval_step(model, loss),
        tf.data.Dataset.from_tensor_slices((x, labels)).batch(5),
    )
    assert result["top1"] == pytest.approx(eval_hits)


def test_labels_that_fit_no_layout_are_refused():
    model = _dense_bn(units=4)
    x, y = _tabular()
    step = tfloop.make_train_step(
        model,
        keras.optimizers.SGD(0.1),
        keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None),
    )
    with pytest.raises(ValueError, match="labels"):
        step((x, np.eye(3, dtype="float32")[y]))  # 3 one-hot columns, 4 logits.


def test_loss_fn_returning_a_scalar_is_refused():
    model = _dense_bn()
    scalar = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    step = tfloop.make_train_step(model, keras.optimizers.SGD(0.1), scalar)
    with pytest.raises(ValueError, match="per-example"):
        step(_tabular())


def test_step_runs_eagerly_on_numpy_like_the_traced_step():
    element = _tabular()
    traced, eager = _dense_bn(), _dense_bn()
    tfloop.make_train_step(traced, keras.optimizers.SGD(0.1), LOSS)(element)
    tf.config.run_functions_eagerly(True)
    try:
        tfloop.make_train_step(eager, keras.optimizers.SGD(0.1), LOSS)(element)
    finally:
        tf.config.run_functions_eagerly(False)
    for a, b in zip(eager.weights, traced.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


def test_float64_model_trains_with_float64_statistics(policy):
    keras.config.set_floatx("float64")
    policy("float64")
    try:
        model = _dense_bn()
        x, y = _tabular()
        x = x.astype("float64")
        step = tfloop.make_train_step(model, keras.optimizers.SGD(0.0), LOSS)
        step((x, y))
    finally:
        keras.config.set_floatx("float32")
    layer = bn.layers(model)[0]
    kernel, bias = (w.numpy() for w in model.get_layer("d1").weights)
    h = x @ kernel + bias  # float64 numpy: after one debiased step, the batch's.
    assert layer.moving_mean.dtype == "float64"
    np.testing.assert_allclose(layer.moving_mean.numpy(), h.mean(0), rtol=1e-12)
    np.testing.assert_allclose(layer.moving_variance.numpy(), h.var(0), rtol=1e-12)


def test_sample_weights_train_like_keras_fit():
    """Stock Keras `fit` with sample weights is the reference (no BN involved)."""
    x, y = _tabular(n=8)
    w = np.linspace(0.0, 2.0, 8).astype("float32")

    def model():
        keras.utils.set_random_seed(4)
        return keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])

    reference = model()
    reference.compile(
        keras.optimizers.SGD(0.5),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    reference.fit(
        x, y, sample_weight=w, batch_size=8, epochs=1, shuffle=False, verbose=0
    )
    ours = model()
    step = tfloop.make_train_step(ours, keras.optimizers.SGD(0.5), LOSS)
    metrics = step((x, y, w))
    for a, b in zip(ours.weights, reference.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
    logits = model()(x).numpy()
    hits = logits.argmax(1) == y
    assert float(metrics["top1"]) == pytest.approx((w * hits).sum() / w.sum())


def test_freezing_any_layer_after_tracing_retraces():
    model = _dense_bn()
    step = tfloop.make_train_step(model, keras.optimizers.SGD(0.5), LOSS)
    step(_tabular())
    assert not step.needs_retrace
    model.get_layer("d1").trainable = False
    assert step.needs_retrace
    frozen = [w.numpy() for w in model.get_layer("d1").weights]
    step(_tabular(seed=1))
    for w, before in zip(model.get_layer("d1").weights, frozen):
        np.testing.assert_array_equal(w.numpy(), before)
    assert not step.needs_retrace
    moved = model.get_layer("out").kernel.numpy()
    step(_tabular(seed=2))
    assert np.abs(model.get_layer("out").kernel.numpy() - moved).max() > 0


def test_jit_compiled_step_matches_the_plain_one(mirrored):
    x, y = _images(16)
    element = (x, y)
    steps = []
    for jit_compile in (False, True):
        keras.utils.set_random_seed(0)
        model = _sequential()
        steps.append(
            tfloop.make_train_step(
                model, keras.optimizers.SGD(0.1), LOSS, jit_compile=jit_compile
            )
        )
    for _ in range(2):
        plain, compiled = (step(element) for step in steps)
    np.testing.assert_allclose(float(compiled["loss"]), float(plain["loss"]), rtol=1e-5)
    for a, b in zip(steps[0].model.variables, steps[1].model.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)
    with mirrored.scope():
        model = _sequential()
    with pytest.raises(ValueError, match="`jit_compile=True`.*2 replicas"):
        tfloop.make_train_step(
            model, keras.optimizers.SGD(0.1), LOSS, strategy=mirrored, jit_compile=True
        )
