"""The README's Python example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_readme_example_runs():
    example = re.search(r"```python\n(.*?)```", README.read_text(), re.DOTALL).group(1)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102  Our own README.
    assert namespace["metrics"]["top1"] >= 0.0
