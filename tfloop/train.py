"""The `tfloop-train` binary: flags in, one training run (or the BN demo) out.

    tfloop-train --flagfile=flags/seed_inception_v1.flags
    python -m tfloop.train --model=resnet_v1_small --epochs=1

The run itself is `tfloop.runner.train`; this module only parses flags.
"""

from __future__ import annotations

import sys

from absl import app

from tfloop import demo, runner
from tfloop import eval as tfloop_eval
from tfloop import flags as tfloop_flags


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = tfloop_flags.config_from_flags()
    if tfloop_flags.flags.FLAGS.mode == "eval":
        tfloop_eval.evaluate_from_flags(config)  # Also its own binary: tfloop-eval.
    elif tfloop_flags.flags.FLAGS.compare_bn:
        demo.compare_bn(config)
    else:
        runner.train(config)


def run() -> None:
    """Console-script entry point (`tfloop-train`)."""
    app.run(main, argv=sys.argv)


if __name__ == "__main__":
    run()
