"""What does trust cost in the main command? And does memory grow per epoch?

Runs the binary's training run (`tfloop.runner`) from its flags, by default
the main command `--flagfile=flags/seed_inception_v1.flags` (Inception v1,
32 px, 128 steps an epoch, 3 epochs), and times per epoch:

- `train`: the epoch's training steps (`_Run.train_epoch`);
- `trust`: the validation phase after it (`_Run.validate`: BN
  recalibration, validation, and the check whether the moving averages were
  stale), as a fraction of `train`. Target: <= 5%.

and the process's resident memory after every epoch (and its peak), which
must not grow from epoch to epoch. At the end it times the pieces of a
validation phase on the trained model: one full validation
(`tfloop.evaluate`), one `tfloop.bn.recalibrate` call, and a train step.
Epochs and validation phases alternate, so the ratio of the two is measured
under the same machine load.

    python benchmarks/trust_cost.py --flagfile=flags/seed_inception_v1.flags
    python benchmarks/trust_cost.py --tiny      # seconds, for CI
"""

from __future__ import annotations

import itertools
import os
import resource
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

import tfloop
from tfloop import flags as tfloop_flags
from tfloop import runner

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


def _rss_mb() -> float:
    """Current resident set size of this process, in MB."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _timed(fn, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main(argv: list[str]) -> None:
    del argv
    if flags.FLAGS.tiny:
        for name, value in TINY.items():
            flags.FLAGS[name].value = value
    config = tfloop_flags.config_from_flags()
    run = runner._Run(config)
    try:
        _, first_validation = _timed(run.validate, epoch=0)
        rows = []
        for epoch in range(1, config.epochs + 1):
            top1, train = _timed(run.train_epoch, epoch)
            _, trust = _timed(run.validate, epoch, top1)
            rows.append((epoch, train, trust, _rss_mb()))
        _, evaluate = _timed(tfloop.evaluate, run.eval_step, run.val_data)
        _, recalibrate = _timed(
            tfloop.bn.recalibrate,
            run.model,
            run.calib_data,
            num_batches=config.bn_recalibrate_batches,
            strategy=run.strategy,
        )
        iterator = run.train_iterator
        _, step = _timed(lambda: float(run.train_step(next(iterator))["loss"]))
    finally:
        run.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(
        f"\n{config.model} {config.image_size}px, batch {config.batch_size}, "
        f"{run.steps_per_epoch} steps an epoch; first validation (traces) "
        f"{first_validation:.1f} s"
    )
    print("| epoch | train s | trust s | trust/train | RSS MB |")
    print("|------:|--------:|--------:|------------:|-------:|")
    for epoch, train, trust, rss in rows:
        print(
            f"| {epoch:5d} | {train:7.1f} | {trust:7.2f} | {trust / train:11.1%} "
            f"| {rss:6.0f} |"
        )
    print(
        f"pieces after training: validation {evaluate:.2f} s, recalibration "
        f"({config.bn_recalibrate_batches} batches) {recalibrate:.2f} s, "
        f"one train step {step:.3f} s"
    )
    fractions = [trust / train for _, train, trust, _ in rows]
    growth = [b[3] - a[3] for a, b in itertools.pairwise(rows)]
    print(
        f"\ntrust/train median {statistics.median(fractions):.1%} (max "
        f"{max(fractions):.1%}); peak RSS {peak:.0f} MB; RSS growth per epoch "
        f"{', '.join(f'{g:+.0f}' for g in growth) or 'n/a'} MB"
    )


if __name__ == "__main__":
    app.run(main)
