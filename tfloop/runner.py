"""The training run of `tfloop-train`: train a slim net, validate every epoch, checkpoint.

`train(config)` runs one `TrainConfig`; the binary (`tfloop.train`) and the
`--compare_bn` demo (`tfloop.demo`) both call it. It prints the lines of slim-era logs, exactly in these forms, so old and new
logs compare line by line::

    early Validation Step
    precision @ 1 = 0.2440 val loss = 1.39
    step 50, loss = 1.38, training_acc = 0.3250
    Validation Step
    precision @ 1 = 0.9121 val loss = 0.26

Validation recalibrates BN statistics first (`--bn_recalibrate_batches`), and
says so in one line when the moving averages were stale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Iterator

import keras
import tensorflow as tf
from absl import logging

from tfloop import bn, data, distribute, ema, losses, models, optimizers, steps, trust
from tfloop.config import TrainConfig
from tfloop.optimize import optimize_loss

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


@dataclasses.dataclass(frozen=True)
class Validation:
    """One validation: after recalibration, and with the moving averages."""

    epoch: int
    step: int
    loss: float
    top1: float
    # With the moving averages: on the whole validation set when the first
    # few batches looked stale, else on those (`tfloop.trust`).
    moving_loss: float
    moving_top1: float
    train_top1: float  # Mean training accuracy of the epoch (nan before training).


def _say(line: str) -> None:
    """Prints one of the fixed log lines (stdout, unbuffered)."""
    print(line, flush=True)


class _Run:
    """The objects of one training run, built from a `TrainConfig`."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.strategy = distribute.make_strategy(
            config.strategy, num_cpu_devices=config.num_cpu_devices
        )
        self.chief = distribute.is_chief(self.strategy)
        keras.utils.set_random_seed(config.seed)
        load = {
            "data_dir": config.data_dir,
            "image_size": config.image_size,
            "batch_size": config.batch_size,
            "seed": config.seed,
        }
        train_data, classes = data.load(
            config.dataset,
            split="train",
            num_examples=config.train_examples,
            cache=config.cache,
            **load,
        )
        val_data, _ = data.load(
            config.dataset, split="validation", num_examples=config.val_examples, **load
        )
        # Recalibration sees training images as validation sees its own:
        # central crop, no augmentation (the inference-time input distribution).
        calib_data, _ = data.load(
            config.dataset,
            split="train",
            num_examples=config.train_examples,
            augment=False,
            **load,
        )
        num_classes = config.num_classes or classes
        if num_classes < classes:
            raise ValueError(
                f"`num_classes`={num_classes} is less than the {classes} classes "
                f"of dataset `{config.dataset}`."
            )
        self.steps_per_epoch = config.steps_per_epoch or _count(train_data)
        self.train_iterator = iter(
            distribute.distribute(self.strategy, train_data.repeat())
        )
        self.val_data = distribute.distribute(self.strategy, val_data)
        self.val_head = distribute.distribute(
            self.strategy, val_data.take(trust.CHECK_BATCHES)
        )
        self.calib_data = distribute.distribute(self.strategy, calib_data)
        with self.strategy.scope(), _dtype_policy(config.mixed_precision):
            self.model = models.get(
                config.model,
                num_classes=num_classes,
                bn_decay=config.bn_decay,
                image_size=config.image_size,
                weight_decay=config.weight_decay,
            )
        models.set_trainable_scopes(self.model, _scopes(config.trainable_scopes))
        self.train_step = optimize_loss(
            self.model,
            losses.classification_loss(
                num_classes, label_smoothing=config.label_smoothing
            ),
            learning_rate=None,
            optimizer=optimizers.from_config(
                config, steps_per_epoch=self.steps_per_epoch, strategy=self.strategy
            ),
            strategy=self.strategy,
            # XLA has no summary ops: with `--jit_compile` only validation
            # writes summaries.
            summaries=() if config.jit_compile else ("loss", "learning_rate"),
            bn_averaging=config.bn_averaging,
            sync_bn=config.sync_bn,
            own_bn=not config.stock_bn,
            jit_compile=config.jit_compile,
        )
        self.eval_step = steps.make_eval_step(self.model, LOSS, strategy=self.strategy)
        self._scratch = None
        self.manager = None
        self.averaged_manager = None
        self.restored = False
        self.writer = tf.summary.create_noop_writer()
        if config.model_dir:
            self._open_model_dir(config.model_dir)
        if config.checkpoint_path and not self.restored:
            # Slim's fine-tuning start; a resumed run continues from its own.
            loaded = models.load_slim_checkpoint(
                self.model,
                config.checkpoint_path,
                exclude_scopes=_scopes(config.checkpoint_exclude_scopes),
                ignore_missing=config.ignore_missing_vars,
            )
            logging.info(
                "Fine-tuning from %s: %d tensors loaded, %d skipped",
                config.checkpoint_path,
                len(loaded.loaded),
                len(loaded.skipped),
            )

    def _open_model_dir(self, model_dir: str) -> None:
        """Restores the latest checkpoint, if any; opens checkpoints and summaries.

        Every worker restores from `MODEL_DIR/checkpoints`, so a resumed
        multi-worker run resumes everywhere. Under `MultiWorkerMirroredStrategy`
        every worker must also take part in a save: the chief writes to
        `MODEL_DIR`, the others to a private scratch directory they delete, so
        nothing but the chief's files lands where the chief reads.
        """
        items = {"model": self.model, "optimizer": self.train_step.optimizer}
        if not self.config.stock_bn:
            items["bn"] = bn.state(self.model)
        checkpoint = tf.train.Checkpoint(**items)
        directory = f"{model_dir}/checkpoints"
        latest = tf.train.latest_checkpoint(directory)
        if latest:
            checkpoint.restore(latest).assert_existing_objects_matched()
            logging.info("Restored %s", latest)
            self.restored = True
        averaged = f"{model_dir}/averaged"
        if not self.chief:
            self._scratch = directory = tempfile.mkdtemp(prefix="tfloop_worker_")
            averaged = f"{directory}/averaged"
        self.manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=3)
        if self.config.moving_average_decay:
            self.averaged_manager = tf.train.CheckpointManager(
                tf.train.Checkpoint(model=self.model), averaged, max_to_keep=1
            )
        if self.chief:
            self.writer = tf.summary.create_file_writer(f"{model_dir}/summaries")

    @property
    def global_step(self) -> int:
        return int(self.train_step.optimizer.iterations.numpy())

    def validate(self, epoch: int, train_top1: float = float("nan")) -> Validation:
        """Validation numbers you can trust: recalibrated BN, staleness reported."""
        batches = self.config.bn_recalibrate_batches
        if batches and not self.config.stock_bn and bn.layers(self.model):
            check = trust.validate(
                self.eval_step,
                self.val_data,
                self.val_head,
                lambda: self._recalibrate(batches),
            )
            result = {"loss": check.loss, "top1": check.top1}
            moving = {"loss": check.moving_loss, "top1": check.moving_top1}
            if check.stale:
                _say(
                    f"BN statistics were stale: val loss {moving['loss']:.2f} with "
                    f"moving averages, {result['loss']:.2f} after recalibration"
                )
        else:
            result = moving = steps.evaluate(self.eval_step, self.val_data)
        _say(f"precision @ 1 = {result['top1']:.4f} val loss = {result['loss']:.2f}")
        with self.writer.as_default(step=self.global_step):
            tf.summary.scalar("validation/loss", result["loss"])
            tf.summary.scalar("validation/top1", result["top1"])
        return Validation(
            epoch=epoch,
            step=self.global_step,
            loss=result["loss"],
            top1=result["top1"],
            moving_loss=moving["loss"],
            moving_top1=moving["top1"],
            train_top1=train_top1,
        )

    def _recalibrate(self, batches: int) -> None:
        start = time.perf_counter()
        used = bn.recalibrate(
            self.model, self.calib_data, num_batches=batches, strategy=self.strategy
        )
        logging.info(
            "recalibrated BN on %d batches in %.1f s", used, time.perf_counter() - start
        )

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """With --moving_average_decay: the block sees the averaged weights.

        Validation inside recalibrates BN for them; the averaged model is then
        exported to `MODEL_DIR/averaged`. Raw weights and training statistics
        come back on exit.
        """
        if not self.config.moving_average_decay:
            yield
            return
        with ema.averaged_weights(self.model, self.train_step.optimizer) as swapped:
            yield
            if swapped and self.averaged_manager is not None:
                self.averaged_manager.save(checkpoint_number=self.global_step)

    @property
    def finished(self) -> bool:
        """True once --max_number_of_steps is reached."""
        limit = self.config.max_number_of_steps
        return bool(limit) and self.global_step >= limit

    def train_epoch(self, epoch: int) -> float:
        """Runs one epoch (up to --max_number_of_steps); returns its mean accuracy."""
        start = time.perf_counter()
        top1_sum = 0.0
        first_step = self.global_step + 1  # Counted on the host: no sync per step.
        end = first_step + self.steps_per_epoch
        if self.config.max_number_of_steps:
            end = min(end, self.config.max_number_of_steps + 1)
        log_every = self.config.log_every
        with self.writer.as_default():
            for first, last in _loops(
                first_step,
                end - 1,
                steps_per_loop=self.config.steps_per_loop,
                log_every=log_every,
            ):
                if self.config.steps_per_loop == 1:
                    metrics = self.train_step(next(self.train_iterator))
                    top1_sum += metrics["top1"]  # A tensor until the epoch ends.
                else:
                    metrics = self.train_step.run(self.train_iterator, last - first + 1)
                    top1_sum += metrics["top1_sum"]
                if last % log_every == 0:
                    _say(
                        f"step {last}, loss = {float(metrics['loss']):.2f}, "
                        f"training_acc = {float(metrics['top1']):.4f}"
                    )
        seconds = time.perf_counter() - start
        num_steps = max(1, end - first_step)
        images = num_steps * self.config.batch_size
        logging.info(
            "epoch %d: %d steps, %.1f s, %.1f images/s",
            epoch,
            num_steps,
            seconds,
            images / seconds,
        )
        return float(top1_sum) / num_steps

    def save(self) -> None:
        if self.manager is not None:
            self.manager.save(checkpoint_number=self.global_step)

    def close(self) -> None:
        self.writer.close()
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)


def _loops(
    first: int, last: int, *, steps_per_loop: int, log_every: int
) -> list[tuple[int, int]]:
    """Splits steps `first..last` into calls of at most `steps_per_loop` steps.

    A call ends at every multiple of `log_every`, so the step lines print at
    the same step numbers whatever `steps_per_loop` is.
    """
    loops = []
    while first <= last:
        next_log = -(-first // log_every) * log_every  # First multiple >= first.
        end = min(first + steps_per_loop - 1, last, next_log)
        loops.append((first, end))
        first = end + 1
    return loops


@contextlib.contextmanager
def _dtype_policy(name: str):
    """Builds layers under Keras dtype policy `name`; restores the global one.

    Layers keep the policy they were built with, so the process-wide policy
    is set only while the model is built (other runs in the process, e.g.
    `--compare_bn`'s variants, are not affected).
    """
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _scopes(value: str | None) -> list[str]:
    """A comma-separated flag value as a list (slim's scope flags)."""
    return [scope.strip() for scope in (value or "").split(",") if scope.strip()]


def _count(dataset: tf.data.Dataset) -> int:
    """Batches in one pass of `dataset` (counted once if tf.data cannot tell)."""
    cardinality = int(dataset.cardinality())
    if cardinality >= 0:
        return cardinality
    return int(dataset.reduce(0, lambda count, _: count + 1))


def train(config: TrainConfig) -> list[Validation]:
    """Runs `config`: validation before training and after every epoch."""
    run = _Run(config)
    try:
        # `epochs` counts from the start of training, resumed runs included.
        done = run.global_step // run.steps_per_epoch
        _say("early Validation Step")
        with run.averaged():
            results = [run.validate(epoch=done)]
        for epoch in range(done + 1, config.epochs + 1):
            if run.finished:
                break
            train_top1 = run.train_epoch(epoch)
            _say("Validation Step")
            with run.averaged():
                results.append(run.validate(epoch, train_top1))
            run.save()  # After recalibration: checkpoints hold precise statistics.
        return results
    finally:
        run.close()
