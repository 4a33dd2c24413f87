"""The model, data and numpy reference of the `tfloop.optimize` tests.

The model is one Dense layer trained with SGD and the loss
0.5 * ||x W + b - y||^2 averaged over the batch, so one step is
`w - lr * transform(g)` with g computed by hand in float64. Summaries are
read back from the event files.
"""

from __future__ import annotations

import glob

import keras
import numpy as np
import tensorflow as tf

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
