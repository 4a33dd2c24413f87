"""`model.fit` with tfloop: FitModel against the tfloop loop, PreciseBN in fit."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfloop

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
SIZE = 16


def _model(momentum=0.9, conv_bias=0.0):
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            keras.layers.Conv2D(
                6,
                3,
                bias_initializer=keras.initializers.Constant(conv_bias),
                name="conv",
            ),
            keras.layers.BatchNormalization(momentum=momentum, name="bn"),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4, name="logits"),
        ]
    )


def _data(split, count, batch_size):
    dataset, _ = tfloop.data.load(
        "shapes",
        split=split,
        data_dir=None,
        image_size=SIZE,
        batch_size=batch_size,
        seed=0,
        num_examples=count,
        augment=False,
    )
    return dataset.cache()


def _tfloop_loop(strategy, dataset, **options):
    """The reference: the same model trained by tfloop's own step and loop."""
    with strategy.scope():
        model = _model()
        step = tfloop.make_train_step(
            model, keras.optimizers.SGD(0.1), LOSS, strategy=strategy, **options
        )
    metrics = [step(e) for e in strategy.experimental_distribute_dataset(dataset)]
    return model, metrics


def _fit(strategy, dataset, val_data, **options):
    with strategy.scope():
        model = _model()
        fit_model = tfloop.keras.FitModel(model, loss_fn=LOSS, **options)
        fit_model.compile(optimizer=keras.optimizers.SGD(0.1))
    history = fit_model.fit(dataset, epochs=1, verbose=0, validation_data=val_data)
    return model, history.history


def _variables(model):
    # Paths without the model's name (sequential, sequential_1, ...).
    return {v.path.split("/", 1)[1]: np.array(v.numpy()) for v in model.variables}


@pytest.mark.parametrize(
    ("replicas", "sync_bn", "reference_replicas"),
    [(1, False, 1), (2, False, 2), (2, True, 1)],
    ids=["one device", "2 replicas", "2 replicas with sync_bn vs one device"],
)
def test_fit_model_trains_as_the_tfloop_loop(
    replicas, sync_bn, reference_replicas, mirrored
):
    def strategy(count):
        return mirrored if count == 2 else tf.distribute.get_strategy()

    train_data, val_data = _data("train", 64, 16), _data("validation", 40, 16)
    fitted, logs = _fit(strategy(replicas), train_data, val_data, sync_bn=sync_bn)
    # With sync_bn, 2 replicas normalize with the global batch's moments, so
    # the whole run (weights and statistics) equals the one-device run.
    reference, metrics = _tfloop_loop(
        strategy(reference_replicas), train_data, sync_bn=sync_bn
    )
    expected = _variables(reference)
    for path, value in _variables(fitted).items():
        np.testing.assert_allclose(value, expected[path], atol=2e-5, err_msg=path)
    assert not np.allclose(expected["bn/moving_mean"], 0.0)
    np.testing.assert_allclose(
        logs["loss"][0], np.mean([float(m["loss"]) for m in metrics]), rtol=1e-5
    )
    np.testing.assert_allclose(
        logs["top1"][0], np.mean([float(m["top1"]) for m in metrics]), rtol=1e-5
    )
    # Validation over all 40 examples (last batch partial), after training.
    evaluated = tfloop.evaluate(tfloop.make_eval_step(reference, LOSS), val_data)
    np.testing.assert_allclose(logs["val_loss"][0], evaluated["loss"], rtol=1e-4)
    np.testing.assert_allclose(logs["val_top1"][0], evaluated["top1"], rtol=1e-6)


def test_fit_model_passes_sample_weights_to_the_step():
    """`fit(..., sample_weight=...)` trains as the tfloop loop with the same weights."""
    images, labels = next(iter(_data("train", 16, 16)))
    weights = np.linspace(0.0, 2.0, 16).astype("float32")
    model = _model()
    fit_model = tfloop.keras.FitModel(model, loss_fn=LOSS)
    fit_model.compile(optimizer=keras.optimizers.SGD(0.1))
    fit_model.fit(
        images, labels, sample_weight=weights, batch_size=16, epochs=1, verbose=0
    )
    reference = _model()
    step = tfloop.make_train_step(reference, keras.optimizers.SGD(0.1), LOSS)
    step((images, labels, weights))
    expected = _variables(reference)
    for path, value in _variables(model).items():
        np.testing.assert_allclose(value, expected[path], atol=2e-5, err_msg=path)
    unweighted = _model()
    tfloop.make_train_step(unweighted, keras.optimizers.SGD(0.1), LOSS)(
        (images, labels)
    )
    assert not np.allclose(
        _variables(unweighted)["logits/kernel"], expected["logits/kernel"]
    )


def test_fit_model_refuses_a_compiled_loss():
    with pytest.raises(ValueError, match="loss="):
        tfloop.keras.FitModel(_model(), loss_fn=LOSS).compile(
            optimizer="sgd", loss="mse"
        )


def test_precise_bn_recalibrates_before_validation_in_fit(capsys):
    train_data, val_data = _data("train", 64, 16), _data("validation", 32, 16)
    calib = _data("train", 32, 16)
    # Stock Keras BN with a slow decay: the moving averages stay near 0 and 1,
    # far from the statistics of the conv outputs (mean about 3).
    model = _model(momentum=0.999, conv_bias=3.0)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, jit_compile=False)
    history = model.fit(
        train_data,
        epochs=1,
        verbose=0,
        validation_data=val_data,
        callbacks=[
            tfloop.keras.PreciseBN(calib, num_batches=2, validation_data=val_data)
        ],
    )
    # The statistics are the population ones of the BN layer's inputs over the
    # two calibration batches (numpy, float64).
    conv = keras.Model(model.inputs, model.get_layer("conv").output)
    inputs = np.concatenate([conv(x).numpy() for x, _ in calib]).astype(np.float64)
    bn = model.get_layer("bn")
    np.testing.assert_allclose(
        bn.moving_mean.numpy(), inputs.mean((0, 1, 2)), atol=1e-5
    )
    np.testing.assert_allclose(
        bn.moving_variance.numpy(), inputs.var((0, 1, 2)), rtol=1e-4
    )
    # `fit`'s validation ran with those statistics (nothing changed since).
    after = model.evaluate(val_data, verbose=0, return_dict=True)
    np.testing.assert_allclose(history.history["val_loss"][0], after["loss"], rtol=1e-5)
    stale = re.findall(
        r"^BN statistics were stale: val loss (\d+\.\d\d) with moving averages, "
        r"(\d+\.\d\d) after recalibration$",
        capsys.readouterr().out,
        re.MULTILINE,
    )
    assert len(stale) == 1
    moving, recalibrated = map(float, stale[0])
    assert recalibrated == round(after["loss"], 2) and moving > 1.2 * recalibrated


@pytest.mark.parametrize("tolerance", [-0.5, float("nan")])
def test_precise_bn_refuses_a_bad_tolerance(tolerance):
    with pytest.raises(ValueError, match="`tolerance`"):
        tfloop.keras.PreciseBN(
            tf.data.Dataset.range(1), num_batches=1, tolerance=tolerance
        )
