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

from tfloop import (
    bn,
    data,
    distribute,
    ema,
    export,
    losses,
    models,
    optimizers,
    plots,
    progress,
    steps,
    summaries,
)
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
    moving_loss: float
    moving_top1: float
    train_top1: float  # Mean training accuracy of the epoch (nan before training).


_say = progress.say  # The fixed log lines; they wipe a terminal's progress bar.


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
            config.dataset, split="train", num_examples=config.train_examples, **load
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
        self.calib_data = distribute.distribute(self.strategy, calib_data)
        # One validation batch on which BN health (staleness) is measured.
        self.health_batch = next(iter(val_data))
        with self.strategy.scope():
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
            summaries=(
                ("loss", "learning_rate", "global_gradient_norm")
                if config.model_dir
                else ("loss", "learning_rate")
            ),
            bn_averaging=config.bn_averaging,
            sync_bn=config.sync_bn,
            own_bn=not config.stock_bn,
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
        moving = steps.evaluate(self.eval_step, self.val_data)
        if self.config.model_dir and self.chief and bn.layers(self.model):
            with self.writer.as_default(step=self.global_step):
                summaries.bn_health(bn.staleness(self.model, self.health_batch))
        result = moving
        batches = self.config.bn_recalibrate_batches
        if batches and not self.config.stock_bn and bn.layers(self.model):
            start = time.perf_counter()
            used = bn.recalibrate(
                self.model, self.calib_data, num_batches=batches, strategy=self.strategy
            )
            logging.info(
                "recalibrated BN on %d batches in %.1f s",
                used,
                time.perf_counter() - start,
            )
            result = steps.evaluate(self.eval_step, self.val_data)
            stale = progress.stale_line(moving["loss"], result["loss"])
            if stale:
                _say(stale)
        _say(f"precision @ 1 = {result['top1']:.4f} val loss = {result['loss']:.2f}")
        with self.writer.as_default(step=self.global_step):
            summaries.validation(moving=moving, recalibrated=result)
        return Validation(
            epoch=epoch,
            step=self.global_step,
            loss=result["loss"],
            top1=result["top1"],
            moving_loss=moving["loss"],
            moving_top1=moving["top1"],
            train_top1=train_top1,
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
        bar = progress.EpochBar(
            steps=end - first_step,
            batch_size=self.config.batch_size,
            title=f"Epoch {epoch}/{self.config.epochs}",
        )
        window = (first_step - 1, start)  # Step and time of the last step line.
        with self.writer.as_default():
            for step in range(first_step, end):
                metrics = self.train_step(next(self.train_iterator))
                top1_sum += metrics["top1"]  # Stays a tensor until the epoch ends.
                if step % self.config.log_every == 0:
                    _say(
                        f"step {step}, loss = {float(metrics['loss']):.2f}, "
                        f"training_acc = {float(metrics['top1']):.4f}"
                    )
                    now = time.perf_counter()
                    summaries.train(
                        step=step,
                        top1=float(metrics["top1"]),
                        images_per_second=(step - window[0])
                        * self.config.batch_size
                        / (now - window[1]),
                    )
                    window = (step, now)
                bar.update(step - first_step + 1, metrics)
        bar.close()
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

    def finish(self, results: list[Validation]) -> None:
        """After the last validation: the accuracy picture and the export."""
        if self.config.model_dir and self.chief:
            path = f"{self.config.model_dir}/{plots.ACCURACY_FILE}"
            plots.accuracy(results, path, title=self.config.model)
        if self.config.export_dir:
            # Every worker takes part in the save (as in checkpoints); only
            # the chief's lands in `--export_dir`.
            target = self.config.export_dir
            if not self.chief:
                target = tempfile.mkdtemp(prefix="tfloop_export_")
            export.export(self.model, target, image_size=self.config.image_size)
            if not self.chief:
                shutil.rmtree(target, ignore_errors=True)

    def close(self) -> None:
        self.writer.close()
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)


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
    if config.export_dir:
        export.check_dir(config.export_dir)  # Before hours of training.
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
        run.finish(results)
        return results
    finally:
        run.close()
