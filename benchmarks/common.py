"""What the benchmark scripts share: paths and imports, machine info, data,
timing, the command line and writing results (their pages: `pages.py` and
`render.py`).

Importing: the scripts run as `python benchmarks/<script>.py`, so this folder
is first on `sys.path` and they `import common`. This module is the one place
that reaches outside the folder: `example(name)` loads `examples/<name>.py`,
`sbn_benchmark()` loads `benchmarks/sbn.py`, `test_graphs()` loads the small
graphs of `tests/graphs.py`, and importing it puts this checkout's
`keras_bpq` ahead of an installed one (`checkout_first`: an editable install
of another checkout would otherwise be the one timed, while the results
record this checkout's commit). No script edits `sys.path` or uses
`importlib` itself.

TensorFlow is imported inside the functions that need it, so a script can set
up its devices (e.g. `scaling.py`'s virtual CPUs) after importing this module.
"""

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
FASHION_DIR = "/usr/share/datasets/fashion-mnist"


# ----------------------------------------------------------------------------- imports
def _load(name, path):
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))
    sys.modules[name] = module
    module.__spec__.loader.exec_module(module)
    return module


def example(name):
    """`examples/<name>.py` as module `name` (the name the example has when
    run), loaded once per process."""
    module = sys.modules.get(name)
    if module is None:
        module = _load(name, os.path.join(EXAMPLES, f"{name}.py"))
    return module


def sbn_benchmark():
    """benchmarks/sbn.py as module `sbn_benchmark`, loaded once per process
    (its flags too): `examples/sbn.py` is module `sbn`."""
    module = sys.modules.get("sbn_benchmark")
    if module is None:
        module = _load("sbn_benchmark", os.path.join(ROOT, "benchmarks", "sbn.py"))
    return module


def test_graphs():
    """tests/graphs.py (the small graphs with exact enumeration) as module
    `graphs`, loaded once per process."""
    module = sys.modules.get("graphs")
    if module is None:
        module = _load("graphs", os.path.join(ROOT, "tests", "graphs.py"))
    return module


def checkout_first():
    """Puts this checkout ahead of an installed `keras_bpq` on `sys.path`, so a
    script times this checkout's package (done when this module is imported,
    before the scripts import keras_bpq)."""
    if sys.path[:2] != [sys.path[0], ROOT]:
        sys.path.insert(1, ROOT)


checkout_first()


# ----------------------------------------------------------------------------- machine
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


def load_average():
    """The 1-, 5- and 15-minute load averages now, as `os.getloadavg()` reads
    them; None where the platform has none."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def rounded_load(load):
    """A `load_average()` rounded to 2 decimals (None stays None)."""
    return None if load is None else [round(x, 2) for x in load]


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args):
    """What `git <args>` in this checkout prints."""
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def sources_digest():
    """SHA-256 of the imported keras_bpq's *.py files (names and contents)."""
    import keras_bpq

    digest = hashlib.sha256()
    package = os.path.dirname(keras_bpq.__file__)
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            with open(os.path.join(package, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()


def machine_info():
    """The machine, the library versions and the checkout a run used.

    One dict for every script (the keys the scripts wrote before they shared
    it; results written earlier hold a subset): platform, CPU (`cpu`,
    `cpu_model`, `processor`, `machine`), cores (`cores`, `cpu_count`), GPUs,
    the load average at start (`load_average` as read, `load_average_at_start`
    rounded), Python and package versions, the commit (`commit`, short, marked
    when the tree is modified; `git_commit`, full), whether keras_bpq differs
    from it (`keras_bpq_dirty`, and `keras_bpq_diff_sha1` of `git diff HEAD`
    where the diff is not empty) and the digest of its sources."""
    import keras
    import tensorflow as tf

    import keras_bpq

    cpu = cpu_model()
    load = load_average()
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu": cpu or platform.processor(),
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "load_average": load,
        "load_average_at_start": rounded_load(load),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tfp": _version("tensorflow-probability"),
        "tensorflow_probability": _version("tensorflow-probability"),
        "keras_bpq": keras_bpq.__version__,
        "numpy": np.__version__,
        "scikit_learn": _version("scikit-learn"),
        "torch": _version("torch"),
        "pyro": _version("pyro-ppl"),
        "storchastic": _version("storchastic"),
        "keras_bpq_sources_sha256": sources_digest(),
    }
    try:
        commit = _git("rev-parse", "HEAD").strip()
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no").strip())
        info["git_commit"] = commit
        info["commit"] = commit[:10] + (" (working tree modified)" if dirty else "")
        info["keras_bpq_dirty"] = bool(_git("status", "--porcelain", "--", "keras_bpq").strip())
        diff = _git("diff", "HEAD", "--", "keras_bpq")
        if diff:
            info["keras_bpq_diff_sha1"] = hashlib.sha1(diff.encode()).hexdigest()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


# ----------------------------------------------------------------------------- data
def read_idx(path):
    """The images of a gzipped IDX file, `[count, rows * cols]` uint8."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    count, rows, cols = np.frombuffer(raw[4:16], ">u4")
    return np.frombuffer(raw, np.uint8, offset=16).reshape(count, rows * cols)


def load_data(dataset, seed):
    """`(train, test)` pixel probabilities in [0, 1] of `"digits"` (examples/sbn.py's
    split: 1500 train / 297 test) or `"fashion_mnist"`."""
    if dataset == "digits":
        return example("sbn").load_digits(seed)
    files = [os.path.join(FASHION_DIR, f"{s}-images-idx3-ubyte.gz") for s in ("train", "t10k")]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        sys.exit(
            f"Fashion-MNIST not found ({', '.join(missing)}). Install the Debian package:\n"
            "    sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist\n"
            f"(IDX files under {FASHION_DIR}/)."
        )
    train, test = (read_idx(f).astype("float32") / 255.0 for f in files)
    return train, test


def without_autotuning(ds):
    """`ds` with tf.data autotuning off.

    With autotuning on, the end of every `fit` (the teardown of its tf.data
    iterator) waited for the autotuning thread's next wake-up, and that thread
    wakes 10 ms, 20 ms, 40 ms, ... apart from the iterator's creation: a fit's
    wall time was rounded up to 10 ms x (2^k - 1), so fits of a fixed number
    of steps read the same few steps/s whatever the model
    (benchmarks/results/sbn.md, the notes on the throughput ceiling, has the
    measured fits). The batches are the same either way (stateless seeds,
    ordered map)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def binarised(images, batch_size, seed):
    """Shuffled, repeated batches, each binarised afresh with seed `(seed, index)`.

    examples/sbn.py's pipeline with a static batch size (drop_remainder) and
    tf.data autotuning off (`without_autotuning`: it distorted the timings)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(images)
    ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.batch(batch_size, drop_remainder=True).enumerate()

    def binarise(index, p):
        noise = tf.random.stateless_uniform(tf.shape(p), seed=tf.stack([tf.cast(seed, tf.int64), index]))
        return tf.cast(noise < p, tf.float32)

    ds = ds.map(binarise, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    return without_autotuning(ds)


def fixed_binarisation(images, seed):
    """`images` binarised once with a NumPy seed."""
    return (np.random.RandomState(seed).uniform(size=images.shape) < images).astype("float32")


# ----------------------------------------------------------------------------- timing
def seconds_of(fn):
    """The wall seconds one call of `fn()` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def round_seconds(fn, rounds):
    """The wall seconds of each of `rounds` calls of `fn()`, in order."""
    return [seconds_of(fn) for _ in range(rounds)]


def best_of(fn, rounds):
    """The fewest seconds one call of `fn()` took over `rounds` calls."""
    return min(round_seconds(fn, rounds), default=float("inf"))


def median(values):
    """The median of the values that are not None (None if none are)."""
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def fit_seconds_per_step(model, data, steps):
    """Wall seconds per step of one `model.fit` of `steps` steps over `data`
    repeated, tf.data autotuning off (`without_autotuning`)."""
    import tensorflow as tf

    ds = without_autotuning(tf.data.Dataset.from_tensor_slices(data).repeat())
    start = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)
    return (time.perf_counter() - start) / steps


# ----------------------------------------------------------------------------- output
def command_line():
    """The command this process runs, as a page shows it:
    `python benchmarks/<script>.py --flag=value ...` (the script relative to
    the checkout, arguments shell-quoted)."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return "python " + shlex.join([script, *sys.argv[1:]])


def listed(value):
    """`value` as a list: a JSON field that holds one entry or, once runs are
    combined, a list of them (`command`/`commands`, `machine`)."""
    return list(value) if isinstance(value, list) else [value]


def commands(report):
    """Every command a results JSON records: its `commands` (runs combined or
    resumed) or its one `command`."""
    return listed(report.get("commands") or report["command"])


def changed_settings(before, after):
    """The keys, sorted, whose values differ between two runs' `settings`
    (a key one of them lacks counts as changed)."""
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def resumed(report, settings, command, machine):
    """The results `report` of an earlier, cut-off or shorter run, resumed by
    this one: its runs kept (the script skips those it holds), every run's
    command in `commands` and machine in `machine`, `settings` this run's.

    Raises ValueError where the report's runs were made with other settings:
    runs of two budgets on one page would be medians of neither."""
    before = report.get("settings", settings)
    changed = changed_settings(before, settings)
    if changed:
        raise ValueError(f"the results to resume were run with other settings ({', '.join(changed)}: "
                         f"{[before.get(k) for k in changed]}, this run {[settings.get(k) for k in changed]}); "
                         "pass the same flags or another --out_dir.")
    kept = {k: v for k, v in report.items() if k not in ("command", "commands", "machine")}
    return {**kept, "settings": settings,
            "commands": commands(report) + [command],
            "machine": listed(report["machine"]) + [machine]}


def write_atomically(path, text):
    """Writes `text` to `path` (its folder made if missing) through a temporary
    file renamed over it, so an interrupted run never leaves a half-written page."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path, report, indent=1):
    """`report` as JSON at `path`, written atomically."""
    write_atomically(path, json.dumps(report, indent=indent))
