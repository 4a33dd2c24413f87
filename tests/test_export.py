"""Export: the SavedModel and `.keras` file predict as the trained model did."""

import os
import re
import subprocess
import sys
import textwrap

import binary
import keras
import numpy as np
import pytest
import tensorflow as tf

import tfloop
from tfloop import data, export

SIZE = 32
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

# Runs in a fresh interpreter that never imports tfloop.
_SERVE = textwrap.dedent(
    """
    import sys
    import keras
    import numpy as np
    import tensorflow as tf

    export_dir, inputs, outputs = sys.argv[1:]
    arrays = np.load(inputs)
    served = tf.saved_model.load(export_dir + "/saved_model")
    uint8 = served.signatures["serving_default"](
        images=tf.constant(arrays["uint8"]))
    floats = served.signatures["serve_float"](
        images=tf.constant(arrays["uint8"].astype(np.float32) / 255.0))
    model = keras.saving.load_model(export_dir + "/model.keras")
    logits = model.predict(arrays["prepared"], verbose=0)
    assert "tfloop" not in sys.modules, "the server imported tfloop"
    np.savez(outputs, uint8=uint8["probabilities"].numpy(),
             classes=uint8["classes"].numpy(),
             float=floats["probabilities"].numpy(),
             keras=tf.nn.softmax(logits).numpy())
    """
)


def _raw_images(count):
    """uint8 images as the data source yields them (48 px), and their labels."""
    images, labels = zip(*data.shapes("validation", num_examples=count, seed=3))
    return np.stack(images), np.array(labels)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained, recalibrated model (BN statistics far from 0 and 1), exported."""
    keras.utils.set_random_seed(0)
    model = tfloop.models.get("resnet_v1_small", num_classes=4, image_size=SIZE)
    step = tfloop.make_train_step(model, keras.optimizers.Adam(1e-3), LOSS)
    train_data, _ = data.load(
        "shapes",
        split="train",
        data_dir=None,
        image_size=SIZE,
        batch_size=16,
        seed=0,
        num_examples=64,
    )
    for element in train_data:
        step(element)
    tfloop.bn.recalibrate(model, train_data, num_batches=2)
    export_dir = str(tmp_path_factory.mktemp("export") / "out")
    export.export(model, export_dir, image_size=SIZE)
    return model, export_dir


def test_fresh_process_without_tfloop_predicts_as_the_trained_model(trained, tmp_path):
    model, export_dir = trained
    images, _ = _raw_images(6)
    # The trained model's predictions, through the validation pipeline.
    prepared = next(
        iter(
            data.batches(
                tf.data.Dataset.from_tensor_slices((images, np.zeros(6, np.int32))),
                image_size=SIZE,
                batch_size=6,
                train=False,
                seed=0,
            )
        )
    )[0].numpy()
    expected = tf.nn.softmax(model(prepared, training=False)).numpy()
    inputs, outputs = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inputs, uint8=images, prepared=prepared)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", _SERVE, export_dir, str(inputs), str(outputs)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
        cwd=tmp_path,  # Not the repository: `import tfloop` would fail there.
    )
    assert result.returncode == 0, result.stderr
    served = np.load(outputs)
    for name in ("uint8", "float", "keras"):
        np.testing.assert_allclose(served[name], expected, atol=1e-4, err_msg=name)
    np.testing.assert_array_equal(served["classes"], expected.argmax(-1))


def test_saved_model_serves_raw_image_bytes_of_any_size(trained):
    model, export_dir = trained
    images, _ = _raw_images(2)
    small = tf.image.resize(images[1], [40, 40], method="nearest").numpy()
    encoded = [tf.io.encode_png(images[0]), tf.io.encode_jpeg(small, quality=95)]
    decoded = [images[0], tf.io.decode_jpeg(encoded[1]).numpy()]
    expected = np.concatenate(
        [
            tf.nn.softmax(
                model(
                    data.preprocess(image, image_size=SIZE, train=False)[None],
                    training=False,
                )
            ).numpy()
            for image in decoded
        ]
    )
    served = tf.saved_model.load(f"{export_dir}/saved_model")
    probabilities = served.signatures["serve_bytes"](images=tf.stack(encoded))[
        "probabilities"
    ].numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)


def test_export_refuses_a_non_empty_directory_and_keeps_it(trained, tmp_path):
    model, _ = trained
    (tmp_path / "old.txt").write_text("earlier export")
    with pytest.raises(ValueError, match=re.escape(repr(str(tmp_path)))):
        export.export(model, str(tmp_path), image_size=SIZE)
    assert [p.name for p in tmp_path.iterdir()] == ["old.txt"]
    assert (tmp_path / "old.txt").read_text() == "earlier export"


def test_binary_exports_the_model_it_validated_last(tmp_path):
    export_dir = tmp_path / "export"
    result = binary.run(val_examples=48, log_every=4, export_dir=export_dir)
    top1, loss = re.findall(r"precision @ 1 = (\S+) val loss = (\S+)", result.stdout)[
        -1
    ]
    # The binary's validation split, raw, through the served signature.
    images, labels = zip(*data.shapes("validation", num_examples=48, seed=0))
    served = tf.saved_model.load(str(export_dir / "saved_model"))
    probabilities = (
        served.signatures["serving_default"](images=tf.stack(images))["probabilities"]
        .numpy()
        .astype(np.float64)
    )
    labels = np.array(labels)
    assert f"{np.mean(probabilities.argmax(-1) == labels):.4f}" == top1
    served_loss = -np.mean(np.log(probabilities[np.arange(len(labels)), labels]))
    assert abs(served_loss - float(loss)) <= 0.005 + 1e-4
    # A second run refuses to overwrite the export, before training.
    again = binary.run_command(
        [sys.executable, "-m", "tfloop.train", f"--export_dir={export_dir}"],
        check=False,
        timeout=300,
    )
    assert again.returncode != 0
    assert repr(str(export_dir)) in again.stderr.strip().splitlines()[-1]
    assert "early Validation Step" not in again.stdout
