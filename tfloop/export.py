"""Export a trained model for serving: a SavedModel and a `.keras` file.

`export(model, export_dir, image_size=...)` writes

- `EXPORT_DIR/saved_model/`: a SavedModel whose signatures take images as they
  come and return class probabilities, with tfloop's evaluation preprocessing
  (central crop, resize, scale to [-1, 1]) inside, so a server needs neither
  tfloop nor its input pipeline:

  | signature           | input                                          |
  |---------------------|------------------------------------------------|
  | `serving_default`   | `images`: uint8 [batch, height, width, 3]      |
  | `serve_float`       | `images`: float32 in [0, 1], [batch, h, w, 3]  |
  | `serve_bytes`       | `images`: string [batch], encoded JPEG/PNG/... |

  Each returns `probabilities` float32 [batch, classes] and `classes` int64
  [batch].
- `EXPORT_DIR/model.keras`: the Keras model (float images in [-1, 1] in,
  logits out), loadable with plain `keras.saving.load_model`.

Export after the final BN recalibration: the exported statistics are what
serving uses.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from tfloop import data

SAVED_MODEL = "saved_model"
KERAS_FILE = "model.keras"


class _Serving(tf.Module):
    """The model behind its serving signatures, with preprocessing inside."""

    def __init__(self, model: keras.Model, image_size: int):
        super().__init__(name="tfloop_serving")
        self.model = model
        self._image_size = image_size

    def _classify(self, images, to_image) -> dict[str, tf.Tensor]:
        """Probabilities and classes of `images`, each made an image by `to_image`.

        One image at a time through tfloop's evaluation preprocessing:
        exactly the pipeline validation used, for inputs of any size.
        """
        prepared = tf.map_fn(
            lambda x: data.preprocess(
                to_image(x), image_size=self._image_size, train=False
            ),
            images,
            fn_output_signature=tf.float32,
        )
        probabilities = tf.nn.softmax(
            tf.cast(self.model(prepared, training=False), tf.float32)
        )
        return {
            "probabilities": probabilities,
            "classes": tf.argmax(probabilities, axis=-1),
        }

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    def serve_uint8(self, images):
        return self._classify(images, tf.identity)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def serve_float(self, images):
        return self._classify(images, lambda image: image * 255.0)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def serve_bytes(self, images):
        return self._classify(
            images,
            lambda encoded: tf.io.decode_image(
                encoded, channels=3, expand_animations=False
            ),
        )


def check_dir(export_dir: str) -> None:
    """Raises ValueError unless `export_dir` is a new or an empty directory."""
    if tf.io.gfile.exists(export_dir) and (
        not tf.io.gfile.isdir(export_dir) or tf.io.gfile.listdir(export_dir)
    ):
        raise ValueError(
            f"`export_dir` {export_dir!r} is not a new or empty directory; "
            "an earlier export is never overwritten."
        )


def export(model: keras.Model, export_dir: str, *, image_size: int) -> dict[str, str]:
    """Writes `model` as a SavedModel and a `.keras` file under `export_dir`.

    Refuses to overwrite an earlier export (a server may be reading it): a
    non-empty `export_dir` raises ValueError and nothing is written.

    Args:
      model: a model from float NHWC images in [-1, 1] to logits.
      export_dir: a new or empty directory.
      image_size: the height and width the model was trained at.

    Returns:
      The paths written: `saved_model` and `keras`.
    """
    if image_size < 1:
        raise ValueError(f"`image_size` must be at least 1, got {image_size!r}.")
    check_dir(export_dir)
    tf.io.gfile.makedirs(export_dir)
    paths = {
        "saved_model": os.path.join(export_dir, SAVED_MODEL),
        "keras": os.path.join(export_dir, KERAS_FILE),
    }
    serving = _Serving(model, image_size)
    tf.saved_model.save(
        serving,
        paths["saved_model"],
        signatures={
            "serving_default": serving.serve_uint8,
            "serve_float": serving.serve_float,
            "serve_bytes": serving.serve_bytes,
        },
    )
    model.save(paths["keras"])
    return paths
