"""Tests for `tfloop.optimize.optimize_loss`: each knob against numpy.

The model is one Dense layer trained with SGD and the loss
0.5 * ||x W + b - y||^2 averaged over the batch, so one step is
`w - lr * transform(g)` with g computed by hand in float64.
"""

from __future__ import annotations

import functools
import glob
import random

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfloop import optimize

FEATURES, OUTPUTS, BATCH = 3, 2, 8
LR = 0.1
W0 = np.array([[0.5, -1.0], [0.25, 0.75], [-0.5, 1.5]])
B0 = np.array([0.1, -0.2])


def _model(strategy: tf.distribute.Strategy | None = None) -> keras.Model:
    with (strategy or tf.distribute.get_strategy()).scope():
        model = keras.Sequential(
            [keras.Input((FEATURES,)), keras.layers.Dense(OUTPUTS)]
        )
        model.layers[0].kernel.assign(W0)
        model.layers[0].bias.assign(B0)
    return model


def _loss(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    return 0.5 * tf.reduce_sum(tf.square(logits - labels), axis=-1)


def _batches(steps: int = 3, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batches with gradient norms well above the clip values used below."""
    rng = np.random.default_rng(seed)
    return [
        (
            rng.normal(0.0, 3.0, (BATCH, FEATURES)).astype(np.float32),
            rng.normal(0.0, 1.0, (BATCH, OUTPUTS)).astype(np.float32),
        )
        for _ in range(steps)
    ]


def _grads(w, b, x, y) -> list[np.ndarray]:
    x, y = x.astype(np.float64), y.astype(np.float64)
    residual = x @ w + b - y
    return [x.T @ residual / len(x), residual.sum(0) / len(x)]


def _numpy_sgd(batches, transform, lrs=None) -> list[np.ndarray]:
    """Weights after SGD on `batches`, gradients mapped by `transform(grads)`."""
    params = [W0.copy(), B0.copy()]
    for t, (x, y) in enumerate(batches):
        grads = transform(_grads(*params, x, y))
        lr = LR if lrs is None else lrs[t]
        params = [p - lr * g for p, g in zip(params, grads)]
    return params


def _train(step, batches) -> None:
    for x, y in batches:
        step((tf.constant(x), tf.constant(y)))


def _weights(model: keras.Model) -> list[np.ndarray]:
    return [v.numpy() for v in model.trainable_variables]


def _assert_weights(model, expected, rtol=1e-5):
    for got, want in zip(_weights(model), expected):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-6)


def _global_norm(grads) -> float:
    return float(np.sqrt(sum(np.sum(g**2) for g in grads)))


def _clip_global(grads, clip):
    return [g * clip / max(_global_norm(grads), clip) for g in grads]


def _clip_each(grads, clip):
    return [g * clip / max(np.linalg.norm(g), clip) for g in grads]


# --- Gradient knobs ----------------------------------------------------------


def test_global_norm_clipping_matches_numpy():
    batches = _batches()
    assert _global_norm(_grads(W0, B0, *batches[0])) > 2.0  # Clipping is active.
    model = _model()
    step = optimize.optimize_loss(
        model, _loss, learning_rate=LR, optimizer="SGD", clip_gradients=0.5
    )
    _train(step, batches)
    _assert_weights(model, _numpy_sgd(batches, lambda g: _clip_global(g, 0.5)))


def test_clip_gradients_callable_sees_pairs():
    batches = _batches()
    model = _model()
    halve = lambda pairs: [(g * 0.5, v) for g, v in pairs]
    step = optimize.optimize_loss(
        model, _loss, learning_rate=LR, optimizer="SGD", clip_gradients=halve
    )
    _train(step, batches)
    _assert_weights(model, _numpy_sgd(batches, lambda g: [x * 0.5 for x in g]))


def test_per_tensor_clipping_matches_numpy():
    batches = _batches()
    model = _model()
    step = optimize.optimize_loss(
        model, _loss, learning_rate=LR, optimizer="SGD", clip_gradient_norm=0.3
    )
    _train(step, batches)
    _assert_weights(model, _numpy_sgd(batches, lambda g: _clip_each(g, 0.3)))


@pytest.mark.parametrize("style", ["path_and_name", "pairs", "ref", "tf1_name"])
def test_gradient_multipliers(style):
    batches = _batches()
    model = _model()
    kernel, bias = model.layers[0].kernel, model.layers[0].bias
    multipliers = {
        "path_and_name": {kernel.path: 0.5, "bias": 3.0},
        "pairs": [(kernel, 0.5), (bias, 3.0)],
        "ref": {kernel.value.ref(): 0.5, bias.value.ref(): 3.0},
        "tf1_name": {kernel.path + ":0": 0.5, bias.path + ":0": 3.0},
    }[style]
    step = optimize.optimize_loss(
        model,
        _loss,
        learning_rate=LR,
        optimizer="SGD",
        gradient_multipliers=multipliers,
    )
    _train(step, batches)
    _assert_weights(model, _numpy_sgd(batches, lambda g: [g[0] * 0.5, g[1] * 3.0]))


def test_gradient_multiplier_keys_must_name_one_variable():
    model = keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.Dense(4), keras.layers.Dense(2)]
    )
    with pytest.raises(ValueError, match=r"`gradient_multipliers` key 'kernal'"):
        optimize.optimize_loss(
            model, _loss, learning_rate=LR, optimizer="SGD",
            gradient_multipliers={"kernal": 2.0},
        )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"names 2 variables .*; use the variable path"
    ):
        optimize.optimize_loss(
            model, _loss, learning_rate=LR, optimizer="SGD",
            gradient_multipliers={"kernel": 2.0},
        )  # fmt: skip


def test_gradient_noise_is_scaled_truncated_normal():
    batches = _batches(steps=1)
    model = _model()
    step = optimize.optimize_loss(
        model, _loss, learning_rate=LR, optimizer="SGD", gradient_noise_scale=0.5
    )
    _train(step, batches)
    noiseless = _numpy_sgd(batches, lambda g: g)
    noise = [(n - w) / (-LR * 0.5) for w, n in zip(_weights(model), noiseless)]
    flat = np.concatenate([n.ravel() for n in noise])
    assert np.all(np.abs(flat) <= 2.0 + 1e-4)  # Truncated at two std devs.
    assert np.all(np.abs(flat) > 0)


# --- Learning rate and optimizer -----------------------------------------------


def _rates_and_weights(step, model, batches):
    rates = []
    for x, y in batches:
        rates.append(float(step.optimizer.learning_rate))
        step((tf.constant(x), tf.constant(y)))
    return rates, _weights(model)


@pytest.mark.parametrize(
    "learning_rate, decay_fn, expected",
    [
        (LR, lambda lr, s: lr * 0.5 ** tf.cast(s, tf.float32), [0.1, 0.05, 0.025]),
        (
            LR,
            lambda lr, s: tf.compat.v1.train.exponential_decay(lr, s, 1, 0.5),
            [0.1, 0.05, 0.025],
        ),
        (
            keras.optimizers.schedules.ExponentialDecay(LR, 1, 0.5),
            None,
            [0.1, 0.05, 0.025],
        ),
        (
            keras.optimizers.schedules.ExponentialDecay(LR, 1, 0.5),
            lambda lr, s: 2.0 * lr,
            [0.2, 0.1, 0.05],
        ),
    ],
    ids=["decay_fn", "tf1_decay_fn", "schedule", "schedule_and_decay_fn"],
)
def test_learning_rate_decay(learning_rate, decay_fn, expected):
    batches = _batches()
    model = _model()
    step = optimize.optimize_loss(
        model,
        _loss,
        learning_rate=learning_rate,
        optimizer="SGD",
        learning_rate_decay_fn=decay_fn,
    )
    rates, weights = _rates_and_weights(step, model, batches)
    np.testing.assert_allclose(rates, expected, rtol=1e-6)
    for got, want in zip(weights, _numpy_sgd(batches, lambda g: g, lrs=expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert int(step.global_step) == 3


@pytest.mark.parametrize(
    "name, cls",
    [
        ("SGD", keras.optimizers.SGD),
        ("Momentum", keras.optimizers.SGD),
        ("Adam", keras.optimizers.Adam),
        ("AdamW", keras.optimizers.AdamW),
        ("RMSProp", keras.optimizers.RMSprop),
        ("Adagrad", keras.optimizers.Adagrad),
        ("Ftrl", keras.optimizers.Ftrl),
        ("adam", keras.optimizers.Adam),
    ],
)
def test_optimizer_names_map_to_keras_classes(name, cls):
    step = optimize.optimize_loss(_model(), _loss, learning_rate=0.25, optimizer=name)
    assert type(step.optimizer) is cls
    assert float(step.optimizer.learning_rate) == 0.25
    expected_momentum = {"SGD": 0.0, "Momentum": 0.9}.get(name)
    if expected_momentum is not None:
        assert step.optimizer.momentum == expected_momentum


def test_optimizer_class_factory_and_instance():
    by_class = optimize.optimize_loss(
        _model(), _loss, learning_rate=0.25, optimizer=keras.optimizers.Nadam
    )
    assert isinstance(by_class.optimizer, keras.optimizers.Nadam)
    by_factory = optimize.optimize_loss(
        _model(),
        _loss,
        learning_rate=0.25,
        optimizer=lambda lr: keras.optimizers.SGD(lr, momentum=0.5),
    )
    assert by_factory.optimizer.momentum == 0.5
    assert float(by_factory.optimizer.learning_rate) == 0.25
    instance = keras.optimizers.Adam(0.01)
    by_instance = optimize.optimize_loss(
        _model(), _loss, learning_rate=None, optimizer=instance
    )
    assert by_instance.optimizer is instance


@pytest.mark.parametrize(
    "kwargs, error, argument",
    [
        ({"learning_rate": LR, "optimizer": "Adamax"}, ValueError, "optimizer"),
        (
            {"learning_rate": LR, "optimizer": keras.optimizers.SGD(LR)},
            ValueError,
            "learning_rate",
        ),
        ({"learning_rate": None, "optimizer": "SGD"}, ValueError, "learning_rate"),
        ({"learning_rate": "fast", "optimizer": "SGD"}, TypeError, "learning_rate"),
        ({"learning_rate": -1.0, "optimizer": "SGD"}, ValueError, "learning_rate"),
        ({"learning_rate": LR, "optimizer": 42}, TypeError, "optimizer"),
        (
            {
                "learning_rate": None,
                "optimizer": keras.optimizers.SGD(LR),
                "learning_rate_decay_fn": lambda lr, s: lr,
            },
            ValueError,
            "learning_rate_decay_fn",
        ),
        (
            {"learning_rate": LR, "optimizer": "SGD", "clip_gradients": 0.0},
            ValueError,
            "clip_gradients",
        ),
        (
            {"learning_rate": LR, "optimizer": "SGD", "clip_gradient_norm": -1.0},
            ValueError,
            "clip_gradient_norm",
        ),
        (
            {"learning_rate": LR, "optimizer": "SGD", "gradient_noise_scale": -1.0},
            ValueError,
            "gradient_noise_scale",
        ),
        (
            {"learning_rate": LR, "optimizer": "SGD", "summaries": ["loss", "lr"]},
            ValueError,
            "summaries",
        ),
        (
            {"learning_rate": LR, "optimizer": "SGD", "summaries": "loss"},
            TypeError,
            "summaries",
        ),
        (
            {"learning_rate": LR, "optimizer": "SGD", "increment_global_step": False},
            ValueError,
            "increment_global_step",
        ),
        (
            {
                "learning_rate": LR,
                "optimizer": "SGD",
                "gradient_transform": lambda p: p,
            },
            ValueError,
            "gradient_transform",
        ),
        (
            {"learning_rate": LR, "optimizer": "SGD", "bn_decay": 1.5},
            ValueError,
            "bn_decay",
        ),
    ],
)
def test_errors_are_one_line_and_name_the_argument(kwargs, error, argument):
    with pytest.raises(error) as info:
        optimize.optimize_loss(_model(), _loss, **kwargs)
    message = str(info.value)
    assert f"`{argument}" in message
    assert "\n" not in message


# --- check_numerics --------------------------------------------------------------


def _nan_labels_batch():
    x, y = _batches(steps=1)[0]
    y = y.copy()
    y[0, 0] = np.nan
    return x, y


def test_check_numerics_raises_on_nan_loss_before_the_update():
    model = _model()
    step = optimize.optimize_loss(model, _loss, learning_rate=LR, optimizer="SGD")
    with pytest.raises(tf.errors.InvalidArgumentError, match="loss is inf or nan"):
        _train(step, [_nan_labels_batch()])
    _assert_weights(model, [W0, B0], rtol=0)


def test_check_numerics_guards_a_nan_loss_with_finite_gradients():
    """A NaN that reaches the loss but not the gradients still stops the step."""

    def nan_offset_loss(labels, logits):
        return _loss(labels, logits) + tf.stop_gradient(tf.constant(np.nan, tf.float32))

    model = _model()
    step = optimize.optimize_loss(
        model, nan_offset_loss, learning_rate=LR, optimizer="SGD"
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="loss is inf or nan"):
        _train(step, _batches(steps=1))
    _assert_weights(model, [W0, B0], rtol=0)


def test_check_numerics_checks_transformed_gradients():
    """sqrt(0) has a finite value but an infinite gradient."""

    def sqrt_loss(labels, logits):
        return tf.reduce_sum(tf.sqrt(tf.abs(logits - logits)), axis=-1)

    model = _model()
    step = optimize.optimize_loss(
        model, sqrt_loss, learning_rate=LR, optimizer="SGD", clip_gradients=1.0
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"gradient of `.*kernel`"):
        _train(step, _batches(steps=1))
    _assert_weights(model, [W0, B0], rtol=0)


def test_without_check_numerics_nan_reaches_the_weights():
    model = _model()
    step = optimize.optimize_loss(
        model, _loss, learning_rate=LR, optimizer="SGD", check_numerics=False
    )
    _train(step, [_nan_labels_batch()])
    assert np.isnan(_weights(model)[0]).any()


# --- Summaries -------------------------------------------------------------------


def _summary_values(logdir):
    """(step, summary value) pairs from every event file under `logdir`."""
    for path in glob.glob(f"{logdir}/events.out.tfevents*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                yield event.step, value


def _read_events(logdir) -> dict[str, dict[int, np.ndarray]]:
    """{tag: {step: value}} from every event file under `logdir`."""
    values: dict[str, dict[int, np.ndarray]] = {}
    for step, value in _summary_values(logdir):
        by_step = values.setdefault(value.tag, {})
        assert step not in by_step, f"{value.tag} written twice"
        by_step[step] = tf.make_ndarray(value.tensor)
    return values


def _plugins(logdir) -> dict[str, set[str]]:
    """{tag: TensorBoard plugin names in its metadata}: which dashboard shows it."""
    plugins: dict[str, set[str]] = {}
    for _, value in _summary_values(logdir):
        name = value.metadata.plugin_data.plugin_name
        plugins.setdefault(value.tag, set()).update([name] if name else [])
    return plugins


def _numpy_loss(w, b, x, y) -> float:
    return float(np.mean(0.5 * np.sum((x @ w + b - y) ** 2, axis=-1)))


def test_summaries_are_written_with_the_right_tags_and_values(tmp_path):
    batches = _batches(steps=2)
    model = _model()
    kernel_path = model.layers[0].kernel.path
    step = optimize.optimize_loss(
        model,
        _loss,
        learning_rate=LR,
        optimizer="SGD",
        clip_gradients=0.5,
        summaries=optimize.OPTIMIZER_SUMMARIES,
    )
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        _train(step, batches)
    writer.flush()
    events = _read_events(tmp_path)
    assert set(events) == {
        "loss",
        "learning_rate",
        "global_norm/gradient_norm",
        "global_norm/clipped_gradient_norm",
        f"gradient_norm/{kernel_path}",
        f"gradient_norm/{model.layers[0].bias.path}",
        f"gradients/{kernel_path}",
        f"gradients/{model.layers[0].bias.path}",
    }
    assert _plugins(tmp_path) == {
        tag: {"histograms" if tag.startswith("gradients/") else "scalars"}
        for tag in events
    }
    params = [W0.copy(), B0.copy()]
    for t, (x, y) in enumerate(batches):
        grads = _grads(*params, x, y)
        clipped = _clip_global(grads, 0.5)
        np.testing.assert_allclose(
            events["loss"][t], _numpy_loss(*params, x, y), rtol=1e-5
        )
        np.testing.assert_allclose(events["learning_rate"][t], LR, rtol=1e-6)
        np.testing.assert_allclose(
            events["global_norm/gradient_norm"][t], _global_norm(grads), rtol=1e-5
        )
        np.testing.assert_allclose(
            events["global_norm/clipped_gradient_norm"][t], 0.5, rtol=1e-5
        )
        np.testing.assert_allclose(
            events[f"gradient_norm/{kernel_path}"][t],
            np.linalg.norm(clipped[0]),
            rtol=1e-5,
        )
        # tf.summary.histogram's tensor: 30 rows of (left edge, right edge,
        # count), spanning [min, max] of the (clipped) gradient's entries.
        histogram = events[f"gradients/{kernel_path}"][t]
        assert histogram.shape == (30, 3)
        assert histogram[:, 2].sum() == clipped[0].size
        np.testing.assert_allclose(
            [histogram[0, 0], histogram[-1, 1]],
            [clipped[0].min(), clipped[0].max()],
            rtol=1e-5,
        )
        counts, edges = np.histogram(clipped[0], bins=30)
        np.testing.assert_array_equal(histogram[:, 2], counts)
        np.testing.assert_allclose(histogram[:, 0], edges[:-1], rtol=1e-5, atol=1e-7)
        params = [p - LR * g for p, g in zip(params, clipped)]


def test_no_summaries_without_a_writer_or_request(tmp_path):
    step = optimize.optimize_loss(_model(), _loss, learning_rate=LR, optimizer="SGD")
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        _train(step, _batches(steps=1))
    writer.flush()
    assert _read_events(tmp_path) == {}


# --- Distribution and batch norm ---------------------------------------------------


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


def test_step_owns_batch_norm_and_passes_bn_kwargs():
    """With a BN model the moving statistics learn (debiased: batch moments)."""
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(OUTPUTS),
        ]
    )
    step = optimize.optimize_loss(
        model,
        _loss,
        learning_rate=LR,
        optimizer="Momentum",
        clip_gradients=1.0,
        bn_decay=0.5,
        bn_audit="error",
    )
    x, y = _batches(steps=1)[0]
    _train(step, [(x, y)])
    bn = model.layers[0]
    np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), x.var(0), rtol=1e-4)
