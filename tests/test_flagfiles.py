"""Every flagfile in `flags/` parses into a run whose model builds."""

import pathlib

import pytest
from absl import flags

from tfloop import flags as tfloop_flags
from tfloop import models

FLAGFILES = sorted((pathlib.Path(__file__).parent.parent / "flags").glob("*.flags"))


def test_a_flagfile_per_model_and_source():
    names = {path.stem for path in FLAGFILES}
    for model in models.NAMES:
        assert {f"{model}_shapes", f"{model}_folder"} <= names


@pytest.mark.parametrize("path", FLAGFILES, ids=lambda p: p.stem)
def test_flagfile_parses_and_builds(path, tmp_path):
    argv = ["tfloop-train", f"--flagfile={path}"]
    if path.stem.endswith("_folder"):
        argv.append(f"--data_dir={tmp_path}")
    try:
        flags.FLAGS(argv)
        config = tfloop_flags.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()
    assert config.model in path.stem
    assert config.dataset == ("folder" if path.stem.endswith("_folder") else "shapes")
    # Builds at its image size (below a model's minimum this raises).
    models.get(
        config.model,
        num_classes=4,
        image_size=config.image_size,
        bn_decay=config.bn_decay,
    )
