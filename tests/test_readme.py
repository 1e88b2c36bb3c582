"""The README's usage and replay snippets run as written."""

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
