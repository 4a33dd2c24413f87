"""`--helpfull` lists every tfloop flag once, under a topic heading."""

import dataclasses
import re
import sys

import binary

from tfloop import flag_topics
from tfloop.config import TrainConfig


def test_helpfull_groups_every_flag_under_one_topic():
    result = binary.run_command(
        [sys.executable, "-m", "tfloop.train", "--helpfull"],
        check=False,  # absl exits 1.
        timeout=120,
    )
    sections = re.split(r"\n(?=\S[^\n]*:\n)", result.stdout)
    by_heading = {}
    for section in sections:
        heading, _, body = section.partition(":\n")
        by_heading[heading.strip()] = re.findall(
            r"^  --(?:\[no\])?(\w+)", body, re.MULTILINE
        )
    assert not any(h.startswith("tfloop.") for h in by_heading)  # Module headings.
    tfloop_flags = [
        name
        for heading, names in by_heading.items()
        if heading.startswith("tfloop: ")
        for name in names
    ]
    expected = {f.name for f in dataclasses.fields(TrainConfig)} - {"stock_bn"}
    # Flags that are not fields of the training run's config.
    expected |= {
        "compare_bn",
        "mode",
        "dataset_split_name",
        "max_num_batches",
        "log_every_n_steps",
    }
    assert sorted(tfloop_flags) == sorted(expected)  # Each exactly once.
    for topic, names in flag_topics.TOPICS.items():
        assert by_heading[f"tfloop: {topic}"] == sorted(names)
