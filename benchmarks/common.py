"""What the benchmark scripts share: the machine's CPU model, and
benchmarks/sbn.py (its flags, data and models) as one module.

The scripts run as `python benchmarks/<script>.py`, so this folder is first on
`sys.path` and they import this module as `common`.
"""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model():
    """The CPU's model name from /proc/cpuinfo, or None where it says none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def sbn_benchmark():
    """benchmarks/sbn.py as module `sbn_benchmark`, loaded once per process: it
    imports examples/sbn.py as `sbn`, so it cannot be imported under its own
    name."""
    module = sys.modules.get("sbn_benchmark")
    if module is None:
        spec = importlib.util.spec_from_file_location(
            "sbn_benchmark", os.path.join(ROOT, "benchmarks", "sbn.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["sbn_benchmark"] = module
        spec.loader.exec_module(module)
    return module
