"""Install tfloop: `pip install -e '.[cpu]'` (CPU) or `pip install -e '.[and-cuda]'` (GPU)."""

import setuptools

setuptools.setup(
    name="tfloop",
    version="0.1.0",
    description=(
        "TensorFlow 2 training loops in which batch normalization cannot "
        "silently go wrong."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["tfloop", "tfloop.*"]),
    # TensorFlow itself comes from an extra: `tensorflow` and `tensorflow-cpu`
    # both install the `tensorflow` module and must not be installed together.
    install_requires=["absl-py>=1.0", "keras>=3.0", "numpy>=1.23", "tensorboard>=2.16"],
    extras_require={
        "cpu": ["tensorflow-cpu>=2.16"],
        "and-cuda": ["tensorflow[and-cuda]>=2.16"],
        "test": [
            "pytest>=7",
            "ruff>=0.4",
            "pillow>=9",
            "matplotlib>=3.5",
            "tf-slim==1.1.0",  # tests/test_slim_checkpoint.py: slim's real nets.
        ],
        "plot": ["matplotlib>=3.5"],
    },
    entry_points={
        "console_scripts": [
            "tfloop-train=tfloop.train:run",
            "tfloop-eval=tfloop.eval:run",
        ]
    },
)
