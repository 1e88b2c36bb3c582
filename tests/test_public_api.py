"""The package's public face: the Keras/TensorFlow version gate and the
model's read-only accessors."""

import ast
import os
import pathlib
import subprocess
import sys
import types

import keras
import pytest
import tensorflow as tf

import graphs
from keras_bpq import _keras_compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_installed_versions_are_the_supported_ones():
    _keras_compat.check_versions({"keras": keras.__version__, "tensorflow": tf.__version__})
    _keras_compat.check_versions({"keras": "3.15.0rc1", "tensorflow": "2.21.7"})


@pytest.mark.parametrize(
    "installed, found",
    [
        ({"keras": "3.16.0", "tensorflow": "2.21.0"}, "keras 3.16.0"),
        ({"keras": "3.15.1", "tensorflow": "2.22.0"}, "tensorflow 2.22.0"),
        ({"keras": "3.14.2", "tensorflow": "2.20.0"}, "keras 3.14.2, tensorflow 2.20.0"),
        ({"keras": "unknown", "tensorflow": "2.21.0"}, "keras unknown"),
    ],
)
def test_other_versions_fail_naming_what_to_install(installed, found):
    with pytest.raises(ImportError) as error:
        _keras_compat.check_versions(installed)
    message = str(error.value)
    assert f"found {found}." in message
    assert "pip install 'keras>=3.15,<3.16' 'tensorflow>=2.21,<2.22'" in message


def test_importing_the_package_checks_the_keras_version():
    code = "import keras; keras.__version__ = '3.16.0'; import keras_bpq"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode != 0
    assert "ImportError: keras_bpq needs keras 3.15.x and tensorflow 2.21.x" in result.stderr


def test_accessors_read_without_side_effects():
    model, x = graphs.chain()
    assert model.known_scg is None and model.node_estimators is None
    assert model.known_scg is None  # reading it discovered nothing
    model.compile(optimizer="adam")  # a functional model's SCG is found here
    scg = model.scg(x)
    num_weights = len(model.weights)
    assert model.known_scg is scg
    estimators = model.node_estimators
    assert isinstance(estimators, types.MappingProxyType)
    assert set(estimators) == set(scg.node_names)
    with pytest.raises(TypeError):
        estimators["z1"] = None
    layer = model.node_layer(scg.nodes[0])
    assert layer.name == scg.nodes[0].layer_name
    assert len(model.weights) == num_weights  # reading them created no critic or state


# NamedTuple's own API (`_fields`, `_asdict`, ...) is public despite its underscore.
_NAMEDTUPLE_API = {"_fields", "_field_defaults", "_asdict", "_replace", "_make"}

# The dunder names Python itself gives objects, classes, functions and modules
# (`__name__`, `__class__`, `__init__`, `__spec__`, ...), plus the module and
# wrapper attributes it sets on import and by `functools.wraps`/binding. Any
# other dunder (`tf.__internal__`) is a library's private API, and `__dict__`
# is an object's private state, read on `self` alone.
_PYTHON_DUNDERS = (
    set(dir(object)) | set(dir(type)) | set(dir(types.FunctionType)) | set(dir(types.ModuleType("m")))
    | {"__file__", "__version__", "__wrapped__", "__self__", "__func__"}
) - {"__dict__"}

# Keras' and TensorFlow's implementation packages, as modules and as attributes.
_INTERNAL_PACKAGES = ("keras.src", "tensorflow.python")
_INTERNAL_ATTRIBUTES = {("keras", "src"), ("tf", "python"), ("tensorflow", "python")}


def _private(name):
    if name.startswith("__") and name.endswith("__"):
        return name not in _PYTHON_DUNDERS
    return name.startswith("_") and name not in _NAMEDTUPLE_API


def _owner_is_own(node):
    """`self._x`, `cls._x` or `super()._x`: a member of the object's own class."""
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def _internal_module(name):
    return any(name == package or name.startswith(package + ".") for package in _INTERNAL_PACKAGES)


def _internal_import(node):
    """`import keras.src...`, `from tensorflow.python... import x`, `from keras import src`."""
    if isinstance(node, ast.Import):
        return any(_internal_module(alias.name) for alias in node.names)
    module = node.module or ""
    return _internal_module(module) or any(_internal_module(f"{module}.{alias.name}") for alias in node.names)


def _reaches_private(node):
    """`obj._x`, `obj.__internal__`, `keras.src`, `obj.__dict__` (obj not `self`,
    `cls` or `super()`) and `getattr`/`setattr`/`hasattr`/`delattr(obj, "_x")`."""
    if isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and (node.value.id, node.attr) in _INTERNAL_ATTRIBUTES:
            return True
        return _private(node.attr) and not _owner_is_own(node.value)
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        return False
    if node.func.id == "vars":
        return len(node.args) == 1 and not _owner_is_own(node.args[0])
    return (
        node.func.id in ("getattr", "setattr", "hasattr", "delattr")
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
        and _private(node.args[1].value)
        and not _owner_is_own(node.args[0])
    )


def private_accesses(path):
    """`["path:line: expression"]`: every private member that `path` reaches in
    another object or module: `obj._x` and dunders Python does not define
    (`tf.__internal__`), `obj.__dict__` and `vars(obj)`, the same through
    `getattr`/`setattr`/`hasattr`/`delattr`, all with obj not `self`, `cls` or
    `super()`; `from module import _x`; and Keras' and TensorFlow's
    implementation packages (`keras.src`, `tensorflow.python`), imported or
    reached as attributes."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if _reaches_private(node):
            found.append(node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and _internal_import(node):
            found.append(node)
        elif isinstance(node, ast.ImportFrom) and any(_private(a.name) for a in node.names):
            if node.module == "keras_bpq" and [a.name for a in node.names] == ["_keras_compat"]:
                continue  # the one gate to Keras' internals, its own public functions only
            found.append(node)
    return [f"{path}:{n.lineno}: {ast.unparse(n)}" for n in found]


@pytest.mark.parametrize(
    "line, flagged",
    [
        ('cache = agent.__dict__.setdefault("_beam_functions", {})', True),
        ("state = vars(agent)", True),
        ('state = getattr(agent, "__dict__")', True),
        ("value = agent._cache", True),
        ("function = tf.__internal__.function", True),
        ("import keras.src.backend", True),
        ("from keras.src import ops", True),
        ("from keras import src", True),
        ("from tensorflow.python.ops import control_flow_util", True),
        ("ops = keras.src.ops", True),
        ("from keras_bpq.model import _helper", True),
        ("state = self.__dict__", False),
        ("state = vars(self)", False),
        ("value = self._cache", False),
        ("name = type(agent).__name__", False),
        ("version = tf.__version__", False),
        ("super().__init__()", False),
        ("from __future__ import annotations", False),
        ("from keras_bpq import _keras_compat", False),
        ("fields = record._asdict()", False),
    ],
)
def test_the_scan_flags_what_reaches_into_another_object(tmp_path, line, flagged):
    path = tmp_path / "snippet.py"
    path.write_text(line + "\n")
    assert bool(private_accesses(path)) is flagged


def test_no_private_member_is_reached_across_objects():
    """Users, diagnostics, benchmarks, examples and tests read the package's
    public members only. Keras' and TensorFlow's private API (`keras.src`,
    `tensorflow.python`, `tf.__internal__`) is read in
    `keras_bpq/_keras_compat.py` alone, which this scan leaves out."""
    root = pathlib.Path(ROOT)
    paths = [
        p
        for folder in ("keras_bpq", "tests", "benchmarks", "examples")
        for p in sorted((root / folder).rglob("*.py"))
        if p != root / "keras_bpq" / "_keras_compat.py"
    ]
    assert len(paths) > 40
    found = [access for path in paths for access in private_accesses(path)]
    assert not found, "\n".join(found)
