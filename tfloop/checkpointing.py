"""Checkpoints of a training run: what they hold, when they are written, and resume.

Why this module exists: a run on a shared or preemptible machine must lose at
most the steps since its last checkpoint and come back bit-identical. So a
checkpoint holds everything the rest of the run depends on: the model, the
optimizer (slots and `iterations`), tfloop's BN update counts, the position of
the train-data iterator (tf.data saves it, shuffle buffer included; each
worker's own when workers read their own files), the
state of the model's Keras seed generators (dropout) and the count of skipped
non-finite steps. Checkpoints are written by `tf.train.CheckpointManager`
(complete or absent: the `checkpoint` state file moves to a new checkpoint
only after all of its files are in place), every `--checkpoint_every_steps`
steps and at every epoch end.

SIGTERM is handled by TensorFlow's `PreemptionCheckpointHandler` (which also
agrees on the step to save at across the workers of a
`MultiWorkerMirroredStrategy` cluster): the run saves at the next step
boundary and raises `tfloop.errors.Preempted`.

A model directory remembers which run wrote it (`checkpoints/tfloop_run.json`:
model, number of classes, input size); a run with other values is refused
before it changes anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfloop import nonfinite
from tfloop.errors import InputError, NonFiniteError, Preempted

METADATA_FILENAME = "tfloop_run.json"
"""Beside the checkpoints: the flags a resumed run must share with the first."""

_MAX_TO_KEEP = 3


def _flag_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_compatible(model_dir: str, metadata: Mapping[str, object]) -> None:
    """Refuses a `model_dir` written by a run with other `metadata` (reads only).

    Raises:
      InputError: naming the first flag whose value differs, or an unreadable
        metadata file.
    """
    path = os.path.join(model_dir, "checkpoints", METADATA_FILENAME)
    if not tf.io.gfile.exists(path):
        return
    try:
        with tf.io.gfile.GFile(path) as f:
            saved = json.load(f)
    except (ValueError, tf.errors.OpError) as error:
        raise InputError(f"cannot read `{path}`: {error}") from None
    for key, value in metadata.items():
        if key in saved and saved[key] != value:
            raise InputError(
                f"`--model_dir`={model_dir} holds a run with "
                f"--{key}={_flag_value(saved[key])}, not --{key}={_flag_value(value)}; "
                "use another --model_dir"
            )


def _write_metadata(directory: str, metadata: Mapping[str, object]) -> None:
    """Writes the metadata file atomically (a temporary file, then a rename)."""
    tf.io.gfile.makedirs(directory)
    path = os.path.join(directory, METADATA_FILENAME)
    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
        json.dump(dict(metadata), f, indent=1, sort_keys=True)
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def seed_states(model: keras.Model) -> list:
    """State variables of the Keras seed generators in `model` (dropout RNG).

    Keras tracks them as model variables but `tf.train.Checkpoint` does not
    save them with the model, so a resumed run would draw other dropout masks.
    """
    return [
        value.state
        for layer in model._flatten_layers(include_self=True, recursive=True)
        for value in vars(layer).values()
        if isinstance(value, keras.random.SeedGenerator)
    ]


class Checkpoints:
    """The checkpoints of one run in `MODEL_DIR/checkpoints`; restores the latest.

    Every worker restores from `MODEL_DIR/checkpoints`, so a restarted
    multi-worker run resumes everywhere. Under `MultiWorkerMirroredStrategy`
    every worker also takes part in each save: the chief writes to
    `MODEL_DIR`, the others to a scratch directory deleted by `close`.

    Args:
      model_dir: the run's directory.
      items: what to checkpoint (trackables by name).
      metadata: what a resumed run must share (see `check_compatible`).
      strategy: the run's strategy (its cluster resolver, if any, is handed
        to `PreemptionCheckpointHandler`).
      chief: whether this worker writes to `model_dir`.
      guarded: variables that must be finite in every checkpoint.
      worker_items: what is this worker's own rather than the run's: the
        position of its input when each worker reads its own files. Every
        worker writes them to `MODEL_DIR/checkpoints/worker-<i>-of-<n>/`
        (`worker=(i, n)`) under the number of the shared checkpoint, before
        that one, and restores them with it; a run resumed with another
        number of workers finds none and is refused.
      worker: `(index, count)` of this worker, for `worker_items`.
    """

    def __init__(
        self,
        *,
        model_dir: str,
        items: Mapping[str, object],
        metadata: Mapping[str, object],
        strategy: tf.distribute.Strategy,
        chief: bool,
        guarded: Sequence,
        worker_items: Mapping[str, object] | None = None,
        worker: tuple[int, int] = (0, 1),
    ):
        check_compatible(model_dir, metadata)
        self._metadata = dict(metadata)
        self._guarded = list(guarded)
        self._chief = chief
        self.directory = os.path.join(model_dir, "checkpoints")
        self.checkpoint = tf.train.Checkpoint(**items)
        self._worker = worker
        self._worker_manager = None
        if worker_items:
            index, count = worker
            self._worker_manager = tf.train.CheckpointManager(
                tf.train.Checkpoint(**worker_items),
                os.path.join(self.directory, f"worker-{index}-of-{count}"),
                max_to_keep=_MAX_TO_KEEP,
            )
        self.restored = tf.train.latest_checkpoint(self.directory)
        if self.restored:
            self._restore(self.checkpoint, self.restored)
            if self._worker_manager is not None:
                self._restore_worker(self.restored)
        self._scratch = None
        directory = self.directory
        if not chief:
            self._scratch = directory = tempfile.mkdtemp(prefix="tfloop_worker_")
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, directory, max_to_keep=_MAX_TO_KEEP
        )
        self.last_saved = self.restored
        # Created after the restore: the handler's own step counter joins the
        # checkpoint now and is restored from it (deferred restoration), on
        # every worker alike, so that all agree on the step to save at.
        self._handler = tf.distribute.experimental.PreemptionCheckpointHandler(
            getattr(strategy, "cluster_resolver", None),
            self.manager,
            termination_config=tf.distribute.experimental.TerminationConfig(
                exit_fn=self._preempted, save_fn=self._save_preempted, grace_period=0
            ),
        )
        self._step = 0
        self._check: Callable[[], None] | None = None

    def _restore_worker(self, path: str) -> None:
        """Restores this worker's items saved with shared checkpoint `path`."""
        own = os.path.join(self._worker_manager.directory, os.path.basename(path))
        if not tf.io.gfile.exists(own + ".index"):
            index, count = self._worker
            raise InputError(
                f"checkpoint `{path}` holds no input position of worker {index} "
                f"of {count} (no `{own}`): resume with the workers that wrote it"
            )
        self._restore(self._worker_manager.checkpoint, own)

    @staticmethod
    def _restore(checkpoint: tf.train.Checkpoint, path: str) -> None:
        try:
            checkpoint.restore(path).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as error:
            first_line = str(error).strip().splitlines()[0]
            raise InputError(
                f"checkpoint `{path}` does not fit this run: {first_line}"
            ) from None

    def save(self, step: int) -> str:
        """Writes checkpoint `step` (after checking every guarded tensor)."""
        bad = nonfinite.nonfinite_variables(self._guarded)
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise NonFiniteError(
                f"step {step}: not writing a checkpoint: non-finite values in "
                f"{', '.join(bad[:3])}{more} (the latest checkpoint is the last "
                "good one)"
            )
        if self._chief and not tf.io.gfile.exists(
            os.path.join(self.directory, METADATA_FILENAME)
        ):
            _write_metadata(self.directory, self._metadata)
        # This worker's part first: a shared checkpoint never lacks it.
        if self._worker_manager is not None:
            self._worker_manager.save(checkpoint_number=step)
        self.last_saved = self.manager.save(checkpoint_number=step)
        return self.last_saved

    def after_step(self, step: int, *, check: Callable[[], None] | None = None) -> None:
        """Call after every train step: saves and exits if SIGTERM arrived.

        `check` runs before that checkpoint is written and may raise instead:
        a run that reads its state only now and then (the non-finite check
        of `--on_nonfinite=stop`) must not checkpoint past a step that
        should have stopped it.
        """
        self._step = step
        self._check = check
        self._handler.save_checkpoint_if_preempted()

    def _save_preempted(self) -> None:
        if self._check is not None:
            self._check()
        self.save(self._step)

    def _preempted(self) -> None:
        raise Preempted(
            f"preempted (SIGTERM): saved `{self.last_saved}` after step "
            f"{self._step}; run the same command to resume"
        )

    def close(self) -> None:
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)


@contextlib.contextmanager
def unchanged(variables: Sequence) -> Iterator[None]:
    """Puts `variables` back as they were when the block ends.

    A resumed run validates (and so recalibrates BN) before it continues a
    half-done epoch; the interrupted run did not, so the statistics it
    continues from must stay those of the checkpoint.
    """
    saved = [np.array(v.numpy()) for v in variables]
    try:
        yield
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)
