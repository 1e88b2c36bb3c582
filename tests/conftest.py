"""Shared pytest configuration for keras_bpq tests."""

import importlib
import os
import pathlib
import sys

# Quiet TensorFlow's C++ logging; must run before anything imports TF.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# XLA's CPU backend compiles without LLVM's optimisation passes (XLA's own HLO
# passes, fusion among them, still run): the tests check what a compiled step
# computes, not how fast it runs, and most XLA tests spend their time
# compiling (tests/test_gradients.py's XLA tests: 57 s of CPU time against
# 71 s at the default level). Subprocesses the tests start inherit it;
# benchmarks and users keep the default level.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

from hypothesis import HealthCheck, settings  # noqa: E402
import pytest  # noqa: E402

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"

# Property-based tests (tests/test_properties.py). "ci", the default, keeps the
# file under a minute; run `pytest tests/test_properties.py
# --hypothesis-profile=long` by hand for a deeper search. Neither keeps an
# example database in the tree: a failure prints its falsifying example.
settings.register_profile(
    "ci",
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")


@pytest.fixture(scope="session")
def benchmark_script():
    """Imports a module of benchmarks/ by name as the scripts import it: their
    folder first on sys.path while it (and what it imports) loads."""
    def load(name):
        sys.path.insert(0, str(BENCHMARKS))
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(str(BENCHMARKS))
    return load
