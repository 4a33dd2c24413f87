"""Tests for `tfloop.compat.create_train_op` in `tf.compat.v1` graph mode.

Every test builds its own `tf.Graph` and `tf.compat.v1.Session`; eager
execution is never disabled globally, so other test modules are unaffected.
"""

from __future__ import annotations

import logging as py_logging
import types

import numpy as np
import pytest
import tensorflow as tf

from tfloop import compat

DECAY = 0.9
BATCH, FEATURES, OUTPUTS = 16, 3, 2
STEPS = 5
UPDATE_OPS = tf.compat.v1.GraphKeys.UPDATE_OPS


def _batches(steps: int = STEPS, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Input batches whose moments are far from BN's initial (0, 1)."""
    rng = np.random.default_rng(seed)
    loc, scale = np.array([1.0, -2.0, 3.0]), np.array([0.5, 2.0, 1.5])
    return [
        (
            rng.normal(loc, scale, (BATCH, FEATURES)).astype(np.float32),
            rng.normal(size=(BATCH, OUTPUTS)).astype(np.float32),
        )
        for _ in range(steps)
    ]


def _numpy_ema(batches: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """Moving mean/variance after the batches, computed independently of TF."""
    mean, var = np.zeros(FEATURES), np.ones(FEATURES)
    for x, _ in batches:
        mean = DECAY * mean + (1 - DECAY) * x.astype(np.float64).mean(axis=0)
        var = DECAY * var + (1 - DECAY) * x.astype(np.float64).var(axis=0)
    return mean, var


def _batch_norm(x: tf.Tensor, decay: float = DECAY) -> tuple[tf.Tensor, dict]:
    """Training-mode batch norm from v1 ops, TF1 style.

    Like the removed `tf.compat.v1.layers.batch_normalization`, it does not
    update the moving statistics itself: it puts the assign ops into
    `GraphKeys.UPDATE_OPS` for the training code to run.
    """
    dim = x.shape[-1]
    with tf.compat.v1.variable_scope("bn"):
        gamma = tf.compat.v1.get_variable(
            "gamma", [dim], initializer=tf.ones_initializer()
        )
        beta = tf.compat.v1.get_variable(
            "beta", [dim], initializer=tf.zeros_initializer()
        )
        moving_mean = tf.compat.v1.get_variable(
            "moving_mean", [dim], initializer=tf.zeros_initializer(), trainable=False
        )
        moving_variance = tf.compat.v1.get_variable(
            "moving_variance", [dim], initializer=tf.ones_initializer(), trainable=False
        )
    mean, variance = tf.nn.moments(x, axes=[0])
    for moving, batch in ((moving_mean, mean), (moving_variance, variance)):
        update = tf.compat.v1.assign(moving, moving * decay + batch * (1 - decay))
        tf.compat.v1.add_to_collection(UPDATE_OPS, update)
    y = tf.nn.batch_normalization(x, mean, variance, beta, gamma, 1e-3)
    variables = {
        "gamma": gamma,
        "beta": beta,
        "moving_mean": moving_mean,
        "moving_variance": moving_variance,
    }
    return y, variables


def _bn_model() -> types.SimpleNamespace:
    """x -> batch norm -> dense -> squared error, in the current default graph."""
    x = tf.compat.v1.placeholder(tf.float32, [None, FEATURES], name="x")
    t = tf.compat.v1.placeholder(tf.float32, [None, OUTPUTS], name="t")
    y, variables = _batch_norm(x)
    w = tf.compat.v1.get_variable(
        "w", [FEATURES, OUTPUTS], initializer=tf.constant_initializer(0.1)
    )
    loss = tf.reduce_mean(tf.square(tf.matmul(y, w) - t))
    return types.SimpleNamespace(x=x, t=t, loss=loss, w=w, **variables)


def _train(sess, train_op, model, batches) -> list[float]:
    sess.run(tf.compat.v1.global_variables_initializer())
    return [sess.run(train_op, {model.x: x, model.t: t}) for x, t in batches]


def _sgd(learning_rate: float = 0.1) -> tf.compat.v1.train.Optimizer:
    return tf.compat.v1.train.GradientDescentOptimizer(learning_rate)


def test_bare_minimize_never_updates_moving_statistics():
    """The original bug: `optimizer.minimize` ignores UPDATE_OPS."""
    batches = _batches()
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        model = _bn_model()
        train_op = _sgd().minimize(model.loss)
        assert len(tf.compat.v1.get_collection(UPDATE_OPS)) == 2
        sess.run(tf.compat.v1.global_variables_initializer())
        w0 = sess.run(model.w)
        _train(sess, train_op, model, batches)
        mean, var, w = sess.run([model.moving_mean, model.moving_variance, model.w])
    np.testing.assert_array_equal(mean, np.zeros(FEATURES))
    np.testing.assert_array_equal(var, np.ones(FEATURES))
    assert not np.allclose(w, w0)  # The weights did train.
    # Where the statistics should have been:
    assert np.abs(_numpy_ema(batches)[0]).max() > 0.5


def test_create_train_op_updates_moving_statistics_like_numpy_ema():
    batches = _batches()
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        model = _bn_model()
        train_op = compat.create_train_op(model.loss, _sgd())
        train_ops = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.TRAIN_OP)
        assert any(op is train_op for op in train_ops)
        sess.run(tf.compat.v1.global_variables_initializer())
        x, t = batches[0]
        loss_before = sess.run(model.loss, {model.x: x, model.t: t})
        losses = _train(sess, train_op, model, batches)
        mean, var = sess.run([model.moving_mean, model.moving_variance])
    want_mean, want_var = _numpy_ema(batches)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, want_var, rtol=1e-5, atol=1e-6)
    # The train op returns the step's loss, computed before the weights change.
    np.testing.assert_allclose(losses[0], loss_before, rtol=1e-6)
    assert losses[-1] < losses[0]


def test_global_step_increments_by_default():
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        model = _bn_model()
        train_op = compat.create_train_op(model.loss, _sgd())
        _train(sess, train_op, model, _batches())
        step = tf.compat.v1.train.get_global_step()
        assert sess.run(step) == STEPS


def test_explicit_and_disabled_global_step():
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        model = _bn_model()
        counter = tf.Variable(10, dtype=tf.int64, trainable=False, name="counter")
        train_op = compat.create_train_op(model.loss, _sgd(), global_step=counter)
        _train(sess, train_op, model, _batches())
        assert sess.run(counter) == 10 + STEPS
        assert tf.compat.v1.train.get_global_step() is None
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        model = _bn_model()
        train_op = compat.create_train_op(model.loss, _sgd(), global_step=None)
        _train(sess, train_op, model, _batches())
        assert tf.compat.v1.train.get_global_step() is None


def _clip(grad: np.ndarray, max_norm: float) -> np.ndarray:
    return grad * min(1.0, max_norm / np.linalg.norm(grad))


@pytest.mark.parametrize("clip", ["none", "between"])
def test_clip_gradient_norm_is_per_tensor_like_numpy(clip):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH, FEATURES)).astype(np.float32)
    t = rng.normal(size=(BATCH, OUTPUTS)).astype(np.float32)
    w0 = rng.normal(size=(FEATURES, OUTPUTS)).astype(np.float32)
    b0 = np.array([3.0, -1.0], np.float32)
    # Gradients of mean((x @ w + b - t) ** 2), in numpy.
    err = x.astype(np.float64) @ w0 + b0 - t
    grad_w = 2.0 * x.T @ err / err.size
    grad_b = 2.0 * err.sum(axis=0) / err.size
    norms = sorted([np.linalg.norm(grad_w), np.linalg.norm(grad_b)])
    max_norm = 0.0 if clip == "none" else float(np.sqrt(norms[0] * norms[1]))
    lr = 0.5
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        w = tf.compat.v1.get_variable("w", initializer=w0)
        b = tf.compat.v1.get_variable("b", initializer=b0)
        loss = tf.reduce_mean(tf.square(tf.matmul(x, w) + b - t))
        train_op = compat.create_train_op(
            loss, _sgd(lr), global_step=None, clip_gradient_norm=max_norm
        )
        sess.run(tf.compat.v1.global_variables_initializer())
        sess.run(train_op)
        w1, b1 = sess.run([w, b])
    if clip == "none":
        want_w, want_b = grad_w, grad_b
    else:
        assert norms[0] < max_norm < norms[1]  # Exactly one tensor is clipped.
        want_w, want_b = _clip(grad_w, max_norm), _clip(grad_b, max_norm)
        # Not a global-norm clip, which would scale both by the same factor.
        scale = max_norm / np.hypot(*norms)
        assert not np.allclose(w0 - lr * scale * grad_w, w0 - lr * want_w)
    np.testing.assert_allclose(w1, w0 - lr * want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b1, b0 - lr * want_b, rtol=1e-5, atol=1e-6)


def test_eager_call_raises_one_line_error():
    assert tf.executing_eagerly()
    with pytest.raises(RuntimeError, match="`total_loss`") as info:
        compat.create_train_op(tf.constant(1.0), _sgd())
    assert "\n" not in str(info.value)


def test_keras_optimizer_is_rejected():
    keras_sgd = tf.keras.optimizers.SGD()
    with tf.Graph().as_default():
        model = _bn_model()
        with pytest.raises(TypeError, match="`optimizer`"):
            compat.create_train_op(model.loss, keras_sgd)


def test_variables_to_train_restricts_updates():
    batches = _batches()
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        model = _bn_model()
        train_op = compat.create_train_op(
            model.loss, _sgd(), variables_to_train=[model.w]
        )
        sess.run(tf.compat.v1.global_variables_initializer())
        w0 = sess.run(model.w)
        _train(sess, train_op, model, batches)
        gamma, beta, w, mean = sess.run(
            [model.gamma, model.beta, model.w, model.moving_mean]
        )
    np.testing.assert_array_equal(gamma, np.ones(FEATURES))
    np.testing.assert_array_equal(beta, np.zeros(FEATURES))
    assert not np.allclose(w, w0)
    # Update ops still run even though BN's own parameters are frozen.
    np.testing.assert_allclose(mean, _numpy_ema(batches)[0], rtol=1e-5, atol=1e-6)


def test_non_trainable_variable_to_train_raises():
    with tf.Graph().as_default():
        model = _bn_model()
        with pytest.raises(ValueError, match="`variables_to_train`"):
            compat.create_train_op(
                model.loss, _sgd(), variables_to_train=[model.moving_mean]
            )


def test_update_ops_missing_collection_warns_and_skips(caplog):
    """As in slim: an explicit `update_ops` is obeyed, with a warning."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        model = _bn_model()
        with caplog.at_level(py_logging.WARNING):
            train_op = compat.create_train_op(model.loss, _sgd(), update_ops=[])
        _train(sess, train_op, model, _batches())
        mean = sess.run(model.moving_mean)
    assert "leaves out 2 of the 2 ops" in caplog.text
    np.testing.assert_array_equal(mean, np.zeros(FEATURES))
