"""What does trust cost in the main command? And does memory grow per epoch?

Runs the binary's training run (`tfloop.runner`) from its flags, by default
the main command `--flagfile=flags/seed_inception_v1.flags` (Inception v1,
32 px, 128 steps an epoch, 3 epochs), and times per epoch:

- `train`: the epoch's training steps (`_Run.train_epoch`);
- `trust`: the validation phase after it (`_Run.validate`: BN
  recalibration, validation, and the check whether the moving averages were
  stale), as a fraction of `train`. Target: <= 5%.

The validation phase runs twice per epoch, in rotating order, from the same
BN statistics (restored in between): once as the flags say (`flags`) and
once as landed main ran it (`before`: `--bn_recalibrate_tolerance=0
--bn_stale_check_batches=0`, i.e. all 50 calibration batches and the moving
averages on the whole validation set, from datasets decoded and
preprocessed at every pass rather than kept in memory), so both see the
same machine load and the same model; their recalibrated top-1 must agree
within 0.005. It also reports the process's resident memory after every
epoch, which must not grow from epoch to epoch, and at the end the pieces
of a validation phase on the trained model, per image, against a training
image: what a phase must cost at the least.

    python benchmarks/trust_cost.py --flagfile=flags/seed_inception_v1.flags
    python benchmarks/trust_cost.py --tiny      # seconds, for CI
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import resource
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

import tfloop
from tfloop import data, distribute, runner
from tfloop import flags as tfloop_flags

flags.DEFINE_bool("tiny", False, "A tiny run (resnet_v1_small, 2 steps an epoch).")

TINY = {
    "model": "resnet_v1_small",
    "train_examples": 64,
    "val_examples": 32,
    "batch_size": 16,
    "steps_per_epoch": 2,
    "epochs": 1,
    "bn_recalibrate_batches": 2,
}

# The validation phase of landed main before the early stops.
BEFORE = {"bn_recalibrate_tolerance": 0.0, "bn_stale_check_batches": 0}


def _rss_mb() -> float:
    """Current resident set size of this process, in MB."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _timed(fn, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def _bn_statistics(model) -> list:
    """Every BN variable recalibration changes, to restore between phases."""
    state = tfloop.bn.state(model)
    return [
        variable
        for layer in tfloop.bn.layers(model)
        for variable in (layer.moving_mean, layer.moving_variance)
    ] + list(state.counts)


def _streamed(config) -> tuple:
    """Validation and calibration data as landed main read them: every pass."""
    load = {
        "data_dir": config.data_dir,
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "seed": config.seed,
    }
    val_data, _ = data.load(
        config.dataset, split="validation", num_examples=config.val_examples, **load
    )
    calib_data, _ = data.load(
        config.dataset,
        split="train",
        num_examples=config.train_examples,
        augment=False,
        **load,
    )
    return val_data, calib_data


def _phases(run: runner._Run, epoch: int, top1: float, streamed) -> dict:
    """Both validation phases from the same statistics: (seconds, Validation)."""
    variables = _bn_statistics(run.model)
    saved = [v.numpy() for v in variables]
    variants = {
        "flags": (run.config, run.val_data, run.calib_data),
        "before": (dataclasses.replace(run.config, **BEFORE), *streamed),
    }
    names = list(variants)[epoch % 2 :] + list(variants)[: epoch % 2]
    results = {}
    for name in names + (["flags"] if names[-1] != "flags" else []):
        for variable, value in zip(variables, saved):
            variable.assign(value)
        run.config, run.val_data, run.calib_data = variants[name]
        if name not in results:  # The last run only leaves the flags' state.
            results[name] = _timed(run.validate, epoch, top1)[::-1]
        else:
            run.validate(epoch, top1)
    return results


def main(argv: list[str]) -> None:
    del argv
    if flags.FLAGS.tiny:
        for name, value in TINY.items():
            flags.FLAGS[name].value = value
    config = tfloop_flags.config_from_flags()
    run = runner._Run(config)
    streamed = tuple(distribute.distribute(run.strategy, d) for d in _streamed(config))
    try:
        _, first_validation = _timed(run.validate, epoch=0)
        rows = []
        for epoch in range(1, config.epochs + 1):
            top1, train = _timed(run.train_epoch, epoch)
            phases = _phases(run, epoch, top1, streamed)
            rows.append((epoch, train, phases, _rss_mb()))
        pieces = _pieces(run)
    finally:
        run.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    _report(config, run, first_validation, rows, pieces, peak)


def _pieces(run: runner._Run) -> dict[str, float]:
    """Seconds per image of each piece of a validation phase, and of training."""
    config = run.config
    batch = config.batch_size
    totals, evaluate = _timed(
        tfloop.steps.evaluation._totals, run.eval_step, run.val_data
    )
    used, recalibrate = _timed(
        tfloop.bn.recalibrate,
        run.model,
        run.calib_data,
        num_batches=config.bn_recalibrate_batches,
        strategy=run.strategy,
    )
    iterator = run.train_iterator
    steps = 4
    _, train = _timed(
        lambda: [float(run.train_step(next(iterator))["loss"]) for _ in range(steps)]
    )
    return {
        "forward": evaluate / totals["count"],
        "calibration": recalibrate / (used * batch),
        "train": train / (steps * batch),
        "val_images": totals["count"],
    }


def _report(config, run, first_validation, rows, pieces, peak) -> None:
    print(
        f"\n{config.model} {config.image_size}px, batch {config.batch_size}, "
        f"{run.steps_per_epoch} steps an epoch; first validation (traces) "
        f"{first_validation:.1f} s"
    )
    print(
        "| epoch | train s | trust s (flags) | trust s (before) | trust/train (flags) "
        "| trust/train (before) | top-1 flags / before | RSS MB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for epoch, train, phases, rss in rows:
        (now, now_v), (before, before_v) = phases["flags"], phases["before"]
        print(
            f"| {epoch} | {train:.1f} | {now:.2f} | {before:.2f} | {now / train:.1%} "
            f"| {before / train:.1%} | {now_v.top1:.4f} / {before_v.top1:.4f} "
            f"| {rss:.0f} |"
        )
    ms = {k: 1e3 * v for k, v in pieces.items() if k != "val_images"}
    images = config.batch_size * run.steps_per_epoch
    floor = pieces["val_images"] * pieces["forward"] / (images * pieces["train"])
    print(
        f"pieces after training, ms per image: forward (validation) "
        f"{ms['forward']:.2f}, calibration {ms['calibration']:.2f}, train step "
        f"{ms['train']:.2f}; one validation alone is {floor:.1%} of the epoch"
    )
    now = [p["flags"][0] / train for _, train, p, _ in rows]
    before = [p["before"][0] / train for _, train, p, _ in rows]
    worst = max(abs(p["flags"][1].top1 - p["before"][1].top1) for *_, p, _ in rows)
    growth = [b[3] - a[3] for a, b in itertools.pairwise(rows)]
    print(
        f"\ntrust/train median {statistics.median(now):.1%} (before "
        f"{statistics.median(before):.1%}); top-1 differs by at most {worst:.4f}; "
        f"peak RSS {peak:.0f} MB; RSS growth per epoch "
        f"{', '.join(f'{g:+.0f}' for g in growth) or 'n/a'} MB"
    )


if __name__ == "__main__":
    app.run(main)
