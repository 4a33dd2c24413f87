"""The examples in `examples/` run as written, at tiny size."""

import pathlib
import re
import sys

import binary

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"
TINY = ["--image_size=32", "--batch_size=16", "--num_examples=64"]
FINAL = re.compile(r"^precision @ 1 = [01]\.\d{4} val loss = \d+\.\d{2}$", re.MULTILINE)


def _run(name, *args):
    result = binary.run_command([sys.executable, str(EXAMPLES / name), *TINY, *args])
    assert len(FINAL.findall(result.stdout)) == 1, result.stdout
    return result.stdout


def test_plain_loop():
    out = _run("plain_loop.py", "--train_steps=3")
    assert "step 3, loss = " in out
    assert re.search(r"^stalest BN layer \S+: mean shift \d+\.\d\d$", out, re.MULTILINE)


def test_multi_step_function_runs_steps_in_the_graph():
    out = _run("multi_step_function.py", "--train_steps=4", "--steps_per_call=2")
    # Two calls of two steps each: the optimizer counted every step.
    assert re.findall(r"^step (\d+), ", out, re.MULTILINE) == ["2", "4"]


def test_orbit_trainer_with_steps_per_loop():
    out = _run(
        "orbit_trainer.py",
        "--train_steps=4",
        "--steps_per_loop=2",
        "--eval_interval=4",
    )
    assert "global step 4" in out


def test_keras_fit_under_mirrored_strategy():
    _run("keras_fit.py", "--epochs=1")
