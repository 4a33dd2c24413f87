"""`python -m tfloop.train` with one more `--model`: `tiny_bn_cnn` (`binary.tiny_bn_cnn`).

    python tests/tiny_train.py --model=tiny_bn_cnn --model_dir=... [any binary flag]

For the tests of the binary where the model is not the point (kill, resume,
preemption, multi-worker clusters): every other part of the run is the
binary's own, run as `python -m` runs it. The model is registered before
`tfloop.flags` is imported, whose `--model` lists the models' names, and
given a slim scope (for `--trainable_scopes`, which every run applies).
"""

import runpy

import binary

from tfloop import models
from tfloop.models import slim_checkpoint

models._BUILDERS["tiny_bn_cnn"] = binary.tiny_bn_cnn
models.NAMES = (*models.NAMES, "tiny_bn_cnn")
slim_checkpoint._SCOPES["tiny_bn_cnn"] = "tiny_bn_cnn"

if __name__ == "__main__":
    runpy.run_module("tfloop.train", run_name="__main__", alter_sys=True)
