"""The README's usage snippet runs as written."""

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
