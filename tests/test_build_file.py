"""Checks that the Bazel BUILD file is in sync with the source tree.

BUILD is Starlark, which is Python syntax, so it is parsed with ``ast``.
This test deliberately imports neither tensorflow nor keras_bpq so it is fast.
"""

import ast
import pathlib
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD_PATH = REPO_ROOT / "BUILD"
LIBRARY_NAME = "keras_bpq"


def _rel(path):
    return path.relative_to(REPO_ROOT).as_posix()


def _string_list(node, where):
    """Returns the strings of a list literal of string constants."""
    if not isinstance(node, (ast.List, ast.Tuple)):
        raise AssertionError(
            f"BUILD: {where} must be a literal list of strings "
            f"(got {ast.dump(node)[:80]}); glob() is not supported by this check"
        )
    values = []
    for elt in node.elts:
        if not (isinstance(elt, ast.Constant) and isinstance(elt.value, str)):
            raise AssertionError(f"BUILD: {where} must contain only string literals")
        values.append(elt.value)
    return values


def _targets():
    """Returns a list of (rule_name, {kwarg: ast node}) for top-level rule calls."""
    assert BUILD_PATH.is_file(), f"BUILD file missing at {BUILD_PATH}"
    tree = ast.parse(BUILD_PATH.read_text(), filename=str(BUILD_PATH))
    targets = []
    for stmt in tree.body:
        if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)):
            continue
        call = stmt.value
        if not isinstance(call.func, ast.Name):
            continue
        kwargs = {kw.arg: kw.value for kw in call.keywords if kw.arg}
        targets.append((call.func.id, kwargs))
    return targets


def _kwarg_str(kwargs, key, rule):
    node = kwargs.get(key)
    if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
        name = kwargs.get("name")
        label = name.value if isinstance(name, ast.Constant) else "?"
        raise AssertionError(f"BUILD: {rule}(name = {label!r}) needs a string `{key} = ...`")
    return node.value


def _rules(kind):
    return [kwargs for rule, kwargs in _targets() if rule == kind]


def _diff_message(kind, build_files, tree_files):
    missing = sorted(tree_files - build_files)
    stale = sorted(build_files - tree_files)
    lines = [f"BUILD is out of sync with the tree ({kind}):"]
    for f in missing:
        lines.append(f"  ADD to BUILD: {f!r} exists in the tree but is not in BUILD")
    for f in stale:
        lines.append(f"  REMOVE from BUILD: {f!r} is listed in BUILD but does not exist")
    return "\n".join(lines)


def test_build_parses():
    rules = {rule for rule, _ in _targets()}
    assert "py_library" in rules, "BUILD: no py_library rule found"


def test_library_srcs_match_package_files():
    libs = [
        kw for kw in _rules("py_library")
        if _kwarg_str(kw, "name", "py_library") == LIBRARY_NAME
    ]
    assert len(libs) == 1, (
        f"BUILD must contain exactly one py_library(name = {LIBRARY_NAME!r}), "
        f"found {len(libs)}"
    )
    srcs = _string_list(libs[0].get("srcs", ast.List(elts=[])), f"{LIBRARY_NAME} srcs")
    dupes = sorted({s for s in srcs if srcs.count(s) > 1})
    assert not dupes, f"BUILD: duplicate entries in {LIBRARY_NAME} srcs: {dupes}"
    build_files = set(srcs)
    tree_files = {
        _rel(p) for p in (REPO_ROOT / "keras_bpq").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert build_files == tree_files, _diff_message(
        f"srcs of py_library {LIBRARY_NAME!r} vs keras_bpq/**/*.py",
        build_files, tree_files,
    )


def test_every_test_file_has_py_test():
    mains = {}
    for kw in _rules("py_test"):
        name = _kwarg_str(kw, "name", "py_test")
        main = _kwarg_str(kw, "main", "py_test")
        srcs = _string_list(kw.get("srcs", ast.List(elts=[])), f"py_test {name!r} srcs")
        assert main in srcs, f"BUILD: py_test {name!r} must list its main {main!r} in srcs"
        expected_name = pathlib.PurePosixPath(main).stem
        assert name == expected_name, (
            f"BUILD: py_test for {main!r} should be named {expected_name!r}, not {name!r}"
        )
        assert main not in mains, f"BUILD: {main!r} is the main of two py_test targets"
        mains[main] = name
    build_files = set(mains)
    tree_files = {_rel(p) for p in (REPO_ROOT / "tests").glob("test_*.py")}
    assert build_files == tree_files, _diff_message(
        "py_test mains vs tests/test_*.py (add/remove a whole py_test target)",
        build_files, tree_files,
    )


def test_every_example_has_py_binary():
    build_files = set()
    for kw in _rules("py_binary"):
        name = _kwarg_str(kw, "name", "py_binary")
        if "main" in kw:
            build_files.add(_kwarg_str(kw, "main", "py_binary"))
        else:
            build_files.update(
                _string_list(kw.get("srcs", ast.List(elts=[])), f"py_binary {name!r} srcs")
            )
    build_examples = {f for f in build_files if f.startswith("examples/")}
    tree_files = {_rel(p) for p in (REPO_ROOT / "examples").glob("*.py")}
    assert build_examples == tree_files, _diff_message(
        "py_binary targets vs examples/*.py (add/remove a whole py_binary target)",
        build_examples, tree_files,
    )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
