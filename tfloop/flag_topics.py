"""`--helpfull` by topic: the binary's flags grouped as a user looks for them.

absl groups help by the module that defined each flag, so every tfloop flag
would appear under one long `tfloop.flags:` heading. `group_by_topic` files
them under `tfloop: <topic>` headings instead; the flags themselves (names,
defaults, validators) do not change. A flag no topic lists lands under
`tfloop: other`, so a new flag is never hidden.
"""

from __future__ import annotations

from absl import flags

TOPICS: dict[str, tuple[str, ...]] = {
    "model and data": (
        "model",
        "num_classes",
        "dataset",
        "data_dir",
        "image_size",
        "train_examples",
        "val_examples",
        "seed",
    ),
    "training": (
        "batch_size",
        "epochs",
        "steps_per_epoch",
        "max_number_of_steps",
        "optimizer",
        "momentum",
        "rmsprop_decay",
        "rmsprop_momentum",
        "opt_epsilon",
        "adam_beta1",
        "adam_beta2",
        "weight_decay",
        "label_smoothing",
        "moving_average_decay",
    ),
    "learning rate": (
        "learning_rate",
        "learning_rate_decay_type",
        "learning_rate_decay_factor",
        "num_epochs_per_decay",
        "end_learning_rate",
        "warmup_epochs",
    ),
    "fine-tuning from slim": (
        "checkpoint_path",
        "checkpoint_exclude_scopes",
        "trainable_scopes",
        "ignore_missing_vars",
    ),
    "evaluation": ("mode", "dataset_split_name", "max_num_batches"),
    "batch norm": (
        "bn_decay",
        "bn_averaging",
        "bn_recalibrate_batches",
        "bn_recalibrate_tolerance",
        "bn_stale_check_batches",
        "sync_bn",
        "compare_bn",
    ),
    "devices": ("strategy", "num_cpu_devices"),
    "output": ("model_dir", "log_every", "log_every_n_steps", "export_dir"),
    "runs that survive": ("checkpoint_every_steps", "deterministic", "on_nonfinite"),
    "speed": ("steps_per_loop", "jit_compile", "mixed_precision", "cache"),
}

_PREFIX = "tfloop: "


def group_by_topic(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Moves the flags defined in `tfloop.*` modules under topic headings."""
    topic_of = {name: topic for topic, names in TOPICS.items() for name in names}
    by_module = flag_values.flags_by_module_dict()
    for module in [m for m in by_module if m.startswith("tfloop.")]:
        for flag in by_module.pop(module):
            topic = topic_of.get(flag.name, "other")
            flag_values.register_flag_by_module(_PREFIX + topic, flag)
