"""The README's usage and replay snippets run as written, and the tests its
Guarantees section names exist."""

import ast
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_usage_snippet_runs():
    text = README.read_text()
    usage = text.split("## Usage", 1)[1]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    data = (np.random.RandomState(0).rand(20, 64) > 0.5).astype("float32")
    namespace = {"data": data, "print": lambda *a, **k: None}
    code = code.replace("epochs=10", "epochs=1, verbose=0")
    exec(compile(code, "README.md", "exec"), namespace)
    history = namespace["model"].history.history
    assert "recon" in history and np.isfinite(history["loss"][-1])


def test_replay_snippet_runs():
    text = README.read_text()
    section = text.split("## Replay for the critics", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    data = (np.random.RandomState(0).rand(20, 64) > 0.5).astype("float32")
    code = "import keras\nimport keras_bpq\n" + code.replace("epochs=10", "epochs=2, verbose=0")
    namespace = {"data": data}
    exec(compile(code, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert int(model.training_state.replay_buffer.count.numpy()) == 40
    assert np.isfinite(model.history.history["loss"][-1])


def guarantees():
    return README.read_text().split("## Guarantees", 1)[1].split("\n## ", 1)[0]


def guarantee_tests():
    """`[(file, test)]`: the tests README.md's Guarantees section names, as
    `file.py::test` or, after one, `::test` (same file)."""
    section = guarantees()
    named, current = [], None
    for file, test in re.findall(r"`(test_\w+\.py)?::(test_\w+)`", section):
        current = file or current
        assert current is not None, f"README.md's Guarantees names `::{test}` before any test file"
        named.append((current, test))
    return named


def test_every_test_the_guarantees_name_exists():
    tests = README.parent / "tests"
    named = guarantee_tests()
    assert len(named) > 20  # the parse found the section's lists
    defined = {}
    for file in {file for file, _ in named}:
        path = tests / file
        tree = ast.parse(path.read_text(), str(path)) if path.exists() else ast.Module(body=[], type_ignores=[])
        defined[file] = {
            node.name for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")
        }
    missing = [f"{file}::{test}" for file, test in named if test not in defined[file]]
    missing += [file for file in re.findall(r"`(test_\w+\.py)`", guarantees()) if not (tests / file).exists()]
    assert not missing, f"README.md's Guarantees names tests that tests/ does not define: {missing}"
