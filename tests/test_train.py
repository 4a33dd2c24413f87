"""The `tfloop-train` binary, end to end in a subprocess."""

import re
import sys

import binary

TINY = [
    "--model=resnet_v1_small",
    "--image_size=32",
    "--batch_size=16",
    "--train_examples=128",
    "--val_examples=64",
    "--steps_per_epoch=4",
    "--log_every=2",
    "--bn_recalibrate_batches=2",
]
PRECISION = r"precision @ 1 = [01]\.\d{4} val loss = \d+\.\d{2}"


def _run(*args, expect_success=True):
    argv = [sys.executable, "-m", "tfloop.train", *TINY, *args]
    return binary.run_command(argv, check=expect_success, timeout=300)


def _fixed_lines(stdout):
    """The slim-era log lines, in order, without anything else."""
    pattern = re.compile(
        rf"^(early Validation Step|Validation Step|{PRECISION}|"
        r"step \d+, loss = \d+\.\d{2}, training_acc = [01]\.\d{4})$"
    )
    return [line for line in stdout.splitlines() if pattern.match(line)]


def test_binary_prints_slim_lines_checkpoints_and_resumes(tmp_path):
    model_dir = tmp_path / "model"
    first = _run("--epochs=2", f"--model_dir={model_dir}")
    lines = _fixed_lines(first.stdout)
    kinds = [re.sub(r"\d", "#", line) for line in lines]
    precision = re.sub(r"\d", "#", "precision @ 1 = 0.0000 val loss = 0.00")
    assert kinds[:2] == ["early Validation Step", precision]
    assert lines[2:5] == [lines[2], lines[3], "Validation Step"]
    assert lines[2].startswith("step 2, loss = ") and lines[3].startswith("step 4, ")
    assert lines.count("Validation Step") == 2 and len(lines) == 10
    assert (model_dir / "checkpoints" / "checkpoint").exists()
    assert list((model_dir / "summaries").iterdir())
    # `--epochs` is the total: a second run resumes with epoch 3, step 9.
    second = _fixed_lines(_run("--epochs=3", f"--model_dir={model_dir}").stdout)
    assert second.count("Validation Step") == 1
    assert next(line for line in second if line.startswith("step ")).startswith(
        "step 10, "
    )


def test_bad_flag_fails_naming_the_value(tmp_path):
    result = _run("--batch_size=0", expect_success=False)
    assert result.returncode != 0
    assert "--batch_size=0" in result.stderr


def test_compare_bn_writes_table_and_picture(tmp_path):
    # Four runs in one process: the tiny model (not the point here) traces fast.
    binary.run(epochs=1, compare_bn=True, model_dir=tmp_path)
    table = (tmp_path / "compare_bn.md").read_text()
    for name in ("naive", "decay 0.99", "debiased", "tfloop"):
        assert f"{name} loss" in table
    assert len(table.strip().splitlines()) == 4  # Header, rule, epochs 0 and 1.
    assert (tmp_path / "compare_bn.png").read_bytes()[:4] == b"\x89PNG"
