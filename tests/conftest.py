"""Test session setup: two logical CPU devices, so multi-replica code runs here.

Logical devices must be configured before TensorFlow initializes its runtime,
hence at import time of this conftest, before any test module runs an op.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest
import tensorflow as tf

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)


@pytest.fixture(scope="session")
def mirrored() -> tf.distribute.MirroredStrategy:
    """The one MirroredStrategy over both logical CPUs that all tests share.

    Two default MirroredStrategies in one process can abort each other
    (tensorflow#62790). The cross-device ops are explicit so that the
    reductions do not depend on what the machine offers.
    """
    return tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
