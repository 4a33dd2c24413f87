"""Test session setup: two logical CPU devices, so multi-replica code runs here.

Logical devices must be configured before TensorFlow initializes its runtime,
hence at import time of this conftest, before any test module runs an op.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)
