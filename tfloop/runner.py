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
import math
import shutil
import tempfile
import time
from collections.abc import Iterator

import keras
import tensorflow as tf
from absl import logging

from tfloop import (
    bn,
    checkpointing,
    checks,
    data,
    distribute,
    ema,
    export,
    losses,
    models,
    nonfinite,
    optimizers,
    plots,
    progress,
    steps,
    summaries,
)
from tfloop.config import TrainConfig
from tfloop.errors import NonFiniteError
from tfloop.optimize import optimize_loss

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


@dataclasses.dataclass(frozen=True)
class Validation:
    """One validation: after recalibration, and with the moving averages."""

    epoch: int
    step: int
    loss: float
    top1: float
    # With the moving averages, on the first `bn_stale_check_batches` batches.
    moving_loss: float
    moving_top1: float
    train_top1: float  # Mean training accuracy of the epoch (nan before training).


_say = progress.say  # The fixed log lines; they wipe a terminal's progress bar.


class _Run:
    """The objects of one training run, built from a `TrainConfig`."""

    def __init__(self, config: TrainConfig):
        self.config = config
        checks.check_environment(
            strategy=config.strategy,
            data_dir=config.data_dir if config.dataset != "shapes" else None,
            model_dir=config.model_dir,
        )
        if config.deterministic:
            tf.config.experimental.enable_op_determinism()
        self.strategy = distribute.make_strategy(
            config.strategy, num_cpu_devices=config.num_cpu_devices
        )
        self.chief = distribute.is_chief(self.strategy)
        keras.utils.set_random_seed(config.seed)
        load = {
            "data_dir": config.data_dir,
            "image_size": config.image_size,
            "seed": config.seed,
        }
        with checks.input_errors():
            # (index, count) of this worker when it reads only its own files.
            self.shard = _file_shard(config, self.strategy)
            workers = self.shard[1] if self.shard else 1
            train_data, classes = data.load(
                config.dataset,
                split="train",
                num_examples=config.train_examples,
                cache=config.cache,
                batch_size=config.batch_size // workers,
                shard=self.shard,
                **load,
            )
            val_data, _ = data.load(
                config.dataset,
                split="validation",
                num_examples=config.val_examples,
                batch_size=config.batch_size,
                **load,
            )
            # Recalibration sees training images as validation sees its own:
            # central crop, no augmentation (the inference-time input distribution).
            calib_data, _ = data.load(
                config.dataset,
                split="train",
                num_examples=config.train_examples,
                augment=False,
                batch_size=config.batch_size,
                **load,
            )
            if self.shard:
                train_batches = _sharded_batches(config, self.strategy, self.shard)
        num_classes = checks.check_num_classes(
            config.num_classes, classes, config.dataset
        )
        if not self.shard:
            train_batches = int(train_data.cardinality())
            if not config.steps_per_epoch and train_batches < 0:
                train_batches = _count(train_data)
        checks.check_batch(
            config.batch_size,
            num_replicas=self.strategy.num_replicas_in_sync,
            train_batches=train_batches,
        )
        self.steps_per_epoch = config.steps_per_epoch or train_batches
        # A plain iterator of batches, split over the replicas per step:
        # `tf.train.Checkpoint` saves its position (it cannot save the
        # iterator of a distributed dataset). Global batches, or with
        # `self.shard` this worker's share of them from its own files.
        self.train_iterator = iter(train_data.repeat())
        # Read at every validation: decoded and preprocessed once, if small.
        val_data = data.in_memory(val_data, batch_size=config.batch_size)
        if config.bn_recalibrate_batches:
            calib_data = data.in_memory(
                calib_data,
                batch_size=config.batch_size,
                max_batches=config.bn_recalibrate_batches,
            )
        self.val_data = distribute.distribute(self.strategy, val_data)
        self.calib_data = distribute.distribute(self.strategy, calib_data)
        # One validation batch on which BN health (staleness) is measured.
        self.health_batch = next(iter(val_data))
        with (
            self.strategy.scope(),
            checks.input_errors(),
            _dtype_policy(config.mixed_precision),
        ):
            self.model = models.get(
                config.model,
                num_classes=num_classes,
                bn_decay=config.bn_decay,
                image_size=config.image_size,
                weight_decay=config.weight_decay,
            )
            # Steps skipped as non-finite (`--on_nonfinite=skip`): with
            # `optimizer.iterations` they give the position in the run.
            self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False)
            # Counted on the device; read at step lines, checkpoints, epoch ends.
            self.nonfinite = nonfinite.Tally(
                self.skipped,
                capacity=_calls_between_reads(config, self.steps_per_epoch),
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
            summaries=_train_summaries(config),
            bn_averaging=config.bn_averaging,
            sync_bn=config.sync_bn,
            own_bn=not config.stock_bn,
            jit_compile=config.jit_compile,
            worker_batches=self.shard is not None,
            # Non-finite steps are never applied (see `tfloop.nonfinite`).
            check_numerics=False,
            on_nonfinite=config.on_nonfinite,
        )
        self.eval_step = steps.make_eval_step(self.model, LOSS, strategy=self.strategy)
        self.checkpoints = None
        self.averaged_manager = None
        self._writer = None
        self._summary_dir = None
        if config.model_dir:
            self._open_model_dir(config.model_dir)
        restored = self.checkpoints is not None and self.checkpoints.restored
        if config.checkpoint_path and not restored:
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
        """Restores the latest checkpoint, if any; opens checkpoints and summaries."""
        optimizer = self.train_step.optimizer
        items = {
            "model": self.model,
            "optimizer": optimizer,
            "rng": checkpointing.seed_states(self.model),
            "nonfinite_steps": self.skipped,
        }
        # Each worker's own position when it reads its own files.
        worker_items = {"train_data": self.train_iterator} if self.shard else None
        if not self.shard:
            items["train_data"] = self.train_iterator
        if not self.config.stock_bn:
            items["bn"] = bn.state(self.model)
        self.checkpoints = checkpointing.Checkpoints(
            model_dir=model_dir,
            items=items,
            metadata={
                "model": self.config.model,
                "num_classes": self.model.output_shape[-1],
                "image_size": self.config.image_size,
            },
            strategy=self.strategy,
            chief=self.chief,
            guarded=self.model.variables + optimizer.variables,
            worker_items=worker_items,
            worker=self.shard or (0, 1),
        )
        if self.checkpoints.restored:
            logging.info("Restored %s", self.checkpoints.restored)
        if self.config.moving_average_decay:
            # Beside the chief's checkpoints; in its scratch dir on other workers.
            averaged = (
                f"{model_dir}/averaged"
                if self.chief
                else f"{self.checkpoints.manager.directory}/averaged"
            )
            self.averaged_manager = tf.train.CheckpointManager(
                tf.train.Checkpoint(model=self.model), averaged, max_to_keep=1
            )
        if self.chief:
            self._summary_dir = f"{model_dir}/summaries"

    @property
    def writer(self) -> tf.summary.SummaryWriter:
        """Opened at the first summary, so that a run refused earlier writes nothing."""
        if self._writer is None:
            self._writer = (
                tf.summary.create_file_writer(self._summary_dir)
                if self._summary_dir
                else tf.summary.create_noop_writer()
            )
        return self._writer

    @property
    def global_step(self) -> int:
        """Steps taken: applied (`optimizer.iterations`) and skipped."""
        iterations = self.train_step.optimizer.iterations.numpy()
        return int(iterations + self.skipped.numpy())

    def validate(self, epoch: int, train_top1: float = float("nan")) -> Validation:
        """Validation numbers you can trust: recalibrated BN, staleness reported.

        The moving averages are evaluated on the first
        `--bn_stale_check_batches` validation batches only (all if 0): they
        serve the `stale` line, which compares them with the recalibrated
        statistics on the same batches.
        """
        check = self._moving_batches() or None
        moving = steps.evaluate(self.eval_step, self.val_data, num_batches=check)
        if self.config.model_dir and self.chief and bn.layers(self.model):
            with self.writer.as_default(step=self.global_step):
                summaries.bn_health(bn.staleness(self.model, self.health_batch))
        result = moving
        if self._recalibrates():
            self._recalibrate(self.config.bn_recalibrate_batches)
            head, result = steps.evaluation._evaluate_head_and_whole(
                self.eval_step, self.val_data, head_batches=check
            )
            _check_finite_validation(self.model, result["loss"], self.global_step)
            stale = progress.stale_line(moving["loss"], head["loss"])
            if stale:
                _say(stale)
        _check_finite_validation(self.model, result["loss"], self.global_step)
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

    def _recalibrates(self) -> bool:
        """Whether validation recalibrates BN first."""
        return bool(
            self.config.bn_recalibrate_batches
            and not self.config.stock_bn
            and bn.layers(self.model)
        )

    def _moving_batches(self) -> int:
        """Validation batches the moving averages are evaluated on; 0: all."""
        return self.config.bn_stale_check_batches if self._recalibrates() else 0

    def _recalibrate(self, batches: int) -> None:
        start = time.perf_counter()
        used = bn.recalibrate(
            self.model,
            self.calib_data,
            num_batches=batches,
            strategy=self.strategy,
            tolerance=self.config.bn_recalibrate_tolerance,
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
        """Runs (the rest of) one epoch, up to --max_number_of_steps; returns its mean accuracy.

        With `--steps_per_loop` > 1 several steps run in one call
        (`TrainStep.run`); a call ends at every `--log_every` and
        `--checkpoint_every_steps` step, so lines and checkpoints fall on the
        same steps either way. Non-finite steps are read on the host only
        there and at the end of the epoch (`_check_nonfinite`), not per step.
        """
        start = time.perf_counter()
        top1_sum = 0.0
        skipped_before = int(self.skipped.numpy())
        first_step = self.global_step + 1  # Counted on the host: no sync per step.
        last_step = epoch * self.steps_per_epoch
        if self.config.max_number_of_steps:
            last_step = min(last_step, self.config.max_number_of_steps)
        every = self.config.checkpoint_every_steps
        bar = progress.EpochBar(
            steps=last_step - first_step + 1,
            batch_size=self.config.batch_size,
            title=f"Epoch {epoch}/{self.config.epochs}",
        )
        window = (first_step - 1, start)  # Step and time of the last step line.
        with self.writer.as_default():
            for first, last in _loops(
                first_step,
                last_step,
                steps_per_loop=self.config.steps_per_loop,
                boundaries=(self.config.log_every, every),
            ):
                metrics = self._train_steps(last - first + 1)
                self.nonfinite.record(first, last, metrics)
                top1_sum += metrics["top1_sum"]  # A tensor until the epoch ends.
                logged = last % self.config.log_every == 0
                saved = bool(every) and last % every == 0
                if logged or saved or last == last_step:
                    self._check_nonfinite()
                if logged:
                    _say(
                        f"step {last}, loss = {float(metrics['loss']):.2f}, "
                        f"training_acc = {float(metrics['top1']):.4f}"
                    )
                    now = time.perf_counter()
                    summaries.train(
                        step=last,
                        top1=float(metrics["top1"]),
                        images_per_second=(last - window[0])
                        * self.config.batch_size
                        / (now - window[1]),
                    )
                    window = (last, now)
                bar.update(last - first_step + 1, metrics)
                if self.checkpoints is not None:
                    self.checkpoints.after_step(last, check=self._check_nonfinite)
                    if every and last % every == 0 and last != last_step:
                        self.checkpoints.save(last)
        bar.close()
        steps_run = last_step - first_step + 1
        applied = steps_run - (int(self.skipped.numpy()) - skipped_before)
        seconds = time.perf_counter() - start
        logging.info(
            "epoch %d: %d steps, %.1f s, %.1f images/s",
            epoch,
            steps_run,
            seconds,
            steps_run * self.config.batch_size / seconds,
        )
        return float(top1_sum) / max(applied, 1)

    def _train_steps(self, count: int) -> dict:
        """`count` steps on the next batches: metrics as `TrainStep.run` gives them."""
        if count > 1:
            return self.train_step.run(self.train_iterator, count)
        return _as_loop(self.train_step(next(self.train_iterator)))

    def _check_nonfinite(self) -> None:
        """Stops at the first non-finite step (`stop`), or reports each call's.

        One host read for all the calls since the previous one
        (`nonfinite.Tally`): the steps after a non-finite one ran while the
        host did not look, but the non-finite one changed nothing, and the
        lines are those a check after every call would have printed.
        """
        calls, total = self.nonfinite.read()
        so_far = total - sum(call.steps for call in calls)
        for call in calls:
            call.check(self.config.on_nonfinite)  # Raises in `stop` mode.
            so_far += call.steps
            self._skipped_steps(call, so_far)

    def _skipped_steps(self, call: nonfinite.Call, so_far: int) -> None:
        """`--on_nonfinite=skip`: counts the steps, in the log and TensorBoard."""
        where = (
            f"step {call.last}"
            if call.first == call.last
            else f"{call.steps} of steps {call.first}-{call.last}"
        )
        logging.warning(
            "%s skipped: non-finite %s (%d skipped so far)",
            where,
            nonfinite.describe(call.flags),
            so_far,
        )
        tf.summary.scalar("nonfinite_steps", so_far, step=call.last)

    def save(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.save(self.global_step)

    def finish(self, results: list[Validation]) -> None:
        """After the last validation: the accuracy picture and the export."""
        if self.config.model_dir and self.chief:
            path = f"{self.config.model_dir}/{plots.ACCURACY_FILE}"
            plots.accuracy(
                results,
                path,
                title=self.config.model,
                moving_batches=self._moving_batches(),
            )
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
        if self._writer is not None:
            self._writer.close()
        if self.checkpoints is not None:
            self.checkpoints.close()


def _train_summaries(config: TrainConfig) -> tuple[str, ...]:
    """The train step's summaries: none under XLA (it has no summary ops)."""
    if config.jit_compile:
        return ()
    if config.model_dir:
        return ("loss", "learning_rate", "global_gradient_norm")
    return ("loss", "learning_rate")


def _calls_between_reads(config: TrainConfig, steps_per_epoch: int) -> int:
    """At most how many calls `train_epoch` makes between two non-finite checks."""
    points = (config.log_every, config.checkpoint_every_steps, steps_per_epoch)
    return max(1, min(p for p in points if p))


@tf.function
def _as_loop(metrics: dict) -> dict:
    """One step's metrics in the form of `TrainStep.run`'s, on the device."""
    bad = nonfinite.is_nonfinite(metrics)
    return {
        **metrics,
        "top1_sum": (1.0 - bad) * metrics["top1"],
        "nonfinite_steps": bad,
        "nonfinite_first": tf.cast(bad, tf.int32),
    }


def _loops(
    first: int, last: int, *, steps_per_loop: int, boundaries: tuple[int, ...]
) -> list[tuple[int, int]]:
    """Splits steps `first..last` into calls of at most `steps_per_loop` steps.

    A call ends at every multiple of each of `boundaries` (0: none), so step
    lines and checkpoints fall on the same steps whatever `steps_per_loop` is.
    """
    loops = []
    while first <= last:
        end = min(first + steps_per_loop - 1, last)
        for every in boundaries:
            if every:
                end = min(end, -(-first // every) * every)  # First multiple >= first.
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


def _file_shard(
    config: TrainConfig, strategy: tf.distribute.Strategy
) -> tuple[int, int] | None:
    """`(index, count)` of this worker if it reads only its own training files, or None.

    With many workers, every worker reading every global batch (and keeping
    its replicas' share) reads the whole split per worker. With at least one
    training file per worker, worker i reads files `i, i + n, ...` of
    `data.files` instead (file sharding, done on the file list so that the
    plain iterator stays checkpointable). Otherwise one line says why not.
    """
    index, count = distribute.input_worker(strategy)
    if count == 1:
        return None
    files = data.files(config.dataset, data_dir=config.data_dir, split="train")
    if len(files) >= count:
        return index, count
    why = (
        f"{len(files)} file(s) for {count} workers (file sharding needs one each)"
        if files
        else "it is generated, not read from files"
    )
    logging.info(
        "Every worker reads all of `--dataset`=%s's train split and keeps its "
        "share of each batch: %s",
        config.dataset,
        why,
    )
    return None


def _sharded_batches(
    config: TrainConfig, strategy: tf.distribute.Strategy, shard: tuple[int, int]
) -> int:
    """Steps of an epoch when each worker reads its own files (see `_file_shard`).

    All workers must take the same number of steps (the others would wait
    for a worker that stopped, forever), though their files may hold
    different numbers of examples. So an epoch is what it is without file
    sharding, the global number of examples over the global batch, and each
    worker's stream repeats: a worker whose files hold fewer examples starts
    its next pass earlier (its examples are seen slightly more often).
    Workers count their own examples (without decoding) and exchange the
    counts; one whose files hold less than its batch is refused.
    """
    own = data.count_examples(
        config.dataset, data_dir=config.data_dir, split="train", shard=shard
    )
    examples = distribute.worker_values(strategy, own)
    checks.check_worker_files(config.batch_size, examples)
    logging.info(
        "Each of %d workers reads only its own training files; their examples: %s",
        len(examples),
        examples,
    )
    return sum(examples) // config.batch_size


def _count(dataset: tf.data.Dataset) -> int:
    """Batches in one pass of `dataset` (counted once if tf.data cannot tell)."""
    cardinality = int(dataset.cardinality())
    if cardinality >= 0:
        return cardinality
    return int(dataset.reduce(0, lambda count, _: count + 1))


def _bn_statistics(model: keras.Model) -> list:
    """Moving means and variances of every BN layer of `model`."""
    return [
        variable
        for layer in bn.layers(model)
        for variable in (layer.moving_mean, layer.moving_variance)
    ]


def _check_finite_validation(model: keras.Model, loss: float, step: int) -> None:
    """Validation is non-finite if its loss or any BN statistic is."""
    bad = nonfinite.nonfinite_variables(_bn_statistics(model))
    if bad or not math.isfinite(loss):
        what = f"BN statistics ({bad[0]})" if bad else f"val loss ({loss})"
        raise NonFiniteError(f"validation after step {step}: non-finite {what}")


def train(config: TrainConfig) -> list[Validation]:
    """Runs `config`: validation before training and after every epoch."""
    if config.export_dir:
        export.check_dir(config.export_dir)  # Before hours of training.
    run = None
    try:
        run = _Run(config)  # Reads a first validation batch: input errors too.
        return _train(run)
    except StopIteration:  # The train split yields no batch at all.
        checks.raise_empty_train(config.batch_size)
    except tf.errors.OpError as error:
        input_error = checks.data_error(
            error,
            images=lambda: data.encoded_images(
                config.dataset, data_dir=config.data_dir, splits=("train", "validation")
            ),
        )
        if input_error is None:
            raise
        raise input_error from None
    finally:
        if run is not None:
            run.close()


def _train(run: _Run) -> list[Validation]:
    config = run.config
    # `epochs` counts from the start of training, resumed runs included.
    done, into_epoch = divmod(run.global_step, run.steps_per_epoch)
    _say("early Validation Step")
    # A run resumed mid-epoch continues from the checkpoint's BN statistics,
    # as the interrupted run did: its early validation leaves them alone.
    keep = []
    if into_epoch:
        keep = _bn_statistics(run.model)
        keep += [] if config.stock_bn else bn.state(run.model).counts
    with checkpointing.unchanged(keep), run.averaged():
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
