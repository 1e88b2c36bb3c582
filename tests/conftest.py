"""Shared pytest configuration for keras_bpq tests."""

import os

# Quiet TensorFlow's C++ logging; must run before anything imports TF.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
