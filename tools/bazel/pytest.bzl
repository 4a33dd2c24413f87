"""`pytest_test`: one Bazel test per pytest file, run by pytest (conftest included)."""

def pytest_test(name, src, size = "medium"):
    native.py_test(
        name = name,
        size = size,
        srcs = ["//:tests/pytest_main.py", src],
        main = "//:tests/pytest_main.py",
        args = ["$(location %s)" % src],
        data = native.glob(["tests/*.py"], exclude = [src]) + native.glob(["flags/*.flags"]) + ["//:README.md"],
        imports = ["tests"],
        deps = ["//:tfloop"],
    )
