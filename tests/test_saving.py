"""`.keras` round trips, checkpoints, and exact resume after a crash."""

import dataclasses
import functools
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import graphs
import keras_bpq
from keras_bpq import critics as critics_lib
from keras_bpq import estimators

TESTS = os.path.dirname(os.path.abspath(__file__))


@keras.saving.register_keras_serializable(package="tests")
def saving_logistic(params):  # a distinctive name: the registry is global
    return tfp.distributions.Logistic(loc=params, scale=1.0)


@keras.saving.register_keras_serializable(package="tests")
class Hops(keras_bpq.BackpropQModel):
    """Subclassed: node `late` built first but run second; one layer called twice."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.late = keras_bpq.Bernoulli(name="late", seed=1)
        self.early = keras_bpq.Bernoulli(name="early", seed=2)
        self.hop = keras_bpq.Categorical(name="hop", seed=3)
        self.d1, self.d2 = keras.layers.Dense(2), keras.layers.Dense(2)
        self.d3, self.d4 = keras.layers.Dense(3), keras.layers.Dense(3)

    def call(self, x, training=None):
        e = self.early(self.d1(x))
        late = self.late(self.d2(e))
        h2 = self.hop(self.d4(self.hop(self.d3(late))))
        keras_bpq.add_cost("first", keras.ops.sum(e, axis=-1))
        keras_bpq.add_cost("last", keras.ops.sum(h2 * x, axis=-1))
        return h2


def data(rows=24, seed=0):
    return np.random.RandomState(seed).normal(size=(rows, graphs.INPUT_DIM)).astype("float32")


def state(model):
    """Every value a checkpoint holds: the model's variables (weights, critics,
    target copies, estimator state, seed generators) and both optimizers'."""
    variables = model.variables + model.optimizer.variables + model.critic_optimizer.variables
    return [v.numpy() for v in variables]


def assert_same(a, b, exact=True):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        if exact or x.dtype.kind in "iu":
            np.testing.assert_array_equal(x, y, err_msg=f"value {i}")
        else:
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=f"value {i}")


# -- .keras round trips -------------------------------------------------------
def test_objects_round_trip_in_safe_mode():
    objects = [
        keras_bpq.Bernoulli(name="b", seed=4, estimator="reinforce"),
        keras_bpq.Categorical(name="c"),
        keras_bpq.Normal(name="n", scale=0.5),
        keras_bpq.StochasticNode(saving_logistic, name="s", seed=2),
        critics_lib.NodeCritic(("cost",), 5, hidden_units=(4,), name="q"),
    ]
    for obj in objects:
        config = keras.saving.serialize_keras_object(obj)
        json.dumps(config)
        again = keras.saving.deserialize_keras_object(config, safe_mode=True)
        assert type(again) is type(obj)
        assert keras.saving.serialize_keras_object(again) == config


def test_keras_file_round_trip_continues_training(tmp_path):
    keras.utils.set_random_seed(1)
    model, x = graphs.two_costs()
    model.compile(
        optimizer=keras.optimizers.Adam(0.03),
        estimator={"z1": estimators.Reinforce(decay=0.9), "z2": "critic_cv"},
        critic_optimizer=keras.optimizers.Adam(0.02),
        critic_target="lambda",
        tau=0.05,
        critic_hidden_units=(8,),
        critic_update_period=2,
        critics={"z1": keras.Sequential([keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])},
    )
    model.fit(data(), batch_size=6, epochs=1, shuffle=False, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)

    assert loaded.scg().node_names == model.scg().node_names
    options = dataclasses.replace(loaded.critic_options, models={})
    assert options == dataclasses.replace(model.critic_options, models={})
    assert isinstance(loaded.critic_options.models["z1"], keras.Sequential)
    assert {n: e.name for n, e in loaded.node_estimators.items()} == {"z1": "reinforce", "z2": "critic_cv"}
    assert loaded.node_estimators["z1"].decay == 0.9
    assert float(loaded.critic_optimizer.learning_rate) == pytest.approx(0.02)
    # Same values everywhere, the Adam moments of both optimizers included.
    assert [v.shape for v in loaded.variables] == [v.shape for v in model.variables]
    assert_same(state(loaded), state(model))
    assert loaded.critic_options.every == 2
    assert int(loaded.critic_optimizer.iterations.numpy()) == 2  # steps 0 and 2 of 4
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))

    # Both continue alike: same samples, same critic and baseline updates.
    for m in (model, loaded):
        m.fit(data(seed=1), batch_size=6, epochs=2, shuffle=False, verbose=0)
    assert_same(state(loaded), state(model), exact=False)


def test_subclassed_model_round_trip(tmp_path):
    keras.utils.set_random_seed(2)
    model = Hops()
    # reinforce keeps the trace small; critics are covered above.
    model.compile(optimizer=keras.optimizers.Adam(0.05), estimator="reinforce")
    model.fit(data(), batch_size=6, epochs=1, shuffle=False, verbose=0)
    model.save(tmp_path / "hops.keras")
    loaded = keras.saving.load_model(tmp_path / "hops.keras")
    assert loaded.scg().node_names == ("early", "late", "hop", "hop@2")
    assert_same(state(loaded), state(model))
    for m in (model, loaded):
        m.fit(data(seed=1), batch_size=6, epochs=1, shuffle=False, verbose=0)
    assert_same(state(loaded), state(model), exact=False)


def test_untrained_model_and_weights_files(tmp_path):
    """A model saved before training, and weights loaded into a fresh model."""
    keras.utils.set_random_seed(3)
    model, _ = graphs.chain()
    model.compile(estimator="critic_cv", optimizer=keras.optimizers.Adam(0.05), critic_hidden_units=(8,))
    model.save(tmp_path / "fresh.keras")
    loaded = keras.saving.load_model(tmp_path / "fresh.keras")
    assert_same(state(loaded), state(model))

    model.fit(data(), batch_size=6, epochs=1, shuffle=False, verbose=0)
    model.save_weights(tmp_path / "trained.weights.h5")
    other, _ = graphs.chain()
    other.compile(estimator="critic_cv", optimizer=keras.optimizers.Adam(0.05), critic_hidden_units=(8,))
    other.load_weights(tmp_path / "trained.weights.h5")
    assert_same(state(other), state(model))
    assert sorted(os.listdir(tmp_path)) == ["fresh.keras", "trained.weights.h5"]  # no temporaries


class Oracle(critics_lib.Critic):
    heads = ("cost",)

    def q(self, context, values, target=True):
        return tf.zeros([tf.shape(values)[0], 1])


def test_unsavable_compile_options_are_named(tmp_path):
    model, _ = graphs.chain()
    model.compile(estimator="critic_cv", critics={"z1": Oracle()}, critic_hidden_units=(8,))
    with pytest.raises(ValueError, match=r"critics=\{'z1': Oracle\}"):
        model.save(tmp_path / "oracle.keras")
    assert not os.listdir(tmp_path)


# -- checkpoints ---------------------------------------------------------------
def log_model():
    """`log_cost` is NaN or inf on rows whose first input is <= 0."""
    x = keras.Input((3,))
    z = keras_bpq.Bernoulli(name="bits", seed=1)(keras.layers.Dense(2, name="enc")(x))
    h = keras.layers.Dense(3, name="dec")(z)
    recon = keras.ops.sum(keras.ops.square(h - x), axis=-1)
    bad = -keras.ops.log(x[:, 0] * (1.0 + keras.ops.sum(z, axis=-1)))
    return keras_bpq.BackpropQModel(
        inputs=x, outputs=h, costs={"recon": recon, "log_cost": bad}, name="logm"
    )


class Snapshots(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.states = []

    def on_train_batch_end(self, batch, logs=None):
        self.states.append(state(self.model))


def test_checkpoints_around_a_failed_step_hold_the_last_good_state(tmp_path):
    model = log_model()
    model.compile(estimator="critic_cv", optimizer=keras.optimizers.Adam(0.05), critic_hidden_units=(8,))
    x = np.abs(data(16)) + 0.5
    x[9, 0] = -1.0  # batch 2 (of 4): a NaN cost
    snapshots = Snapshots()
    backup = tmp_path / "backup"
    callbacks = [
        keras.callbacks.BackupAndRestore(backup, save_freq=1),
        keras.callbacks.ModelCheckpoint(tmp_path / "ckpt.weights.h5", save_weights_only=True, save_freq=1),
        snapshots,
    ]
    with pytest.raises(FloatingPointError, match=r"'logm': cost 'log_cost' was not finite"):
        model.fit(x, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
    assert len(snapshots.states) == 2  # the failed batch reached no later callback
    last_good = snapshots.states[-1]
    current = state(model)
    for before, now in zip(last_good, current):
        if before.dtype.kind == "f":  # seed generators moved on; weights did not
            np.testing.assert_array_equal(before, now)
    for path in (backup / "latest.weights.h5", tmp_path / "ckpt.weights.h5"):
        fresh = log_model()
        fresh.compile(estimator="critic_cv", optimizer=keras.optimizers.Adam(0.05), critic_hidden_units=(8,))
        fresh.load_weights(path)
        restored = state(fresh)
        assert all(np.all(np.isfinite(v)) for v in restored)
        assert_same(restored, last_good)
    assert sorted(p.name for p in backup.iterdir()) == ["latest.weights.h5", "training_metadata.json"]

    # A checkpoint is never written with a non-finite value, nor half-written.
    before = (tmp_path / "ckpt.weights.h5").read_bytes()
    kernel = model.get_layer("dec").kernel
    good = kernel.numpy()
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    with pytest.raises(ValueError, match=r"dec/kernel.*NaN or inf"):
        model.save_weights(tmp_path / "ckpt.weights.h5")
    kernel.assign(good)

    def interrupted(self, filepath, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    original = keras.Model.save_weights
    keras.Model.save_weights = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            model.save_weights(tmp_path / "ckpt.weights.h5")
    finally:
        keras.Model.save_weights = original
    assert (tmp_path / "ckpt.weights.h5").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup", "ckpt.weights.h5"]


# -- resume ----------------------------------------------------------------------
def test_interrupted_fit_resumes_mid_epoch(tmp_path):
    """In-process: an exception mid-epoch, a corrupted metadata file, two steps
    per execution; the restarted fit ends where an uninterrupted one does."""

    def run(backup, stop_at=None):
        keras.utils.set_random_seed(4)
        model, _ = graphs.chain()
        model.compile(optimizer=keras.optimizers.Adam(0.05), steps_per_execution=2,
                      estimator={"z1": "reinforce", "z2": "reinforce"}, critic_hidden_units=(8,))

        class Stop(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch

            def on_train_batch_end(self, batch, logs=None):
                if (self.epoch, batch) == stop_at:
                    raise RuntimeError("interrupted")

        callbacks = [keras.callbacks.BackupAndRestore(backup, save_freq=4), Stop()]
        model.fit(data(), batch_size=3, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
        return model

    reference = state(run(tmp_path / "straight"))
    # 8 batches an epoch, run 2 at a time, a backup every 4: the last backup
    # before the interruption (after batch 5 of epoch 1) is after batch 3.
    with pytest.raises(RuntimeError, match="interrupted"):
        run(tmp_path / "backup", stop_at=(1, 5))
    (tmp_path / "backup" / "training_metadata.json").write_text('{"epoch": 1, "ba')  # killed mid-write
    model = run(tmp_path / "backup")
    assert_same(state(model), reference, exact=False)
    assert not (tmp_path / "backup").exists()  # finished: the backup is removed


CHILD = r'''
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import keras
import numpy as np
import graphs

backup, out, kill_epoch, kill_batch = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
keras.utils.set_random_seed(0)
model, _ = graphs.two_costs()
model.compile(estimator="critic_cv", optimizer=keras.optimizers.Adam(0.05), critic_hidden_units=(16,))
x = np.random.RandomState(0).normal(size=(24, graphs.INPUT_DIM)).astype("float32")


class Kill(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == (kill_epoch, kill_batch):
            os.kill(os.getpid(), signal.SIGKILL)


model.fit(x, batch_size=4, epochs=3, shuffle=False, verbose=0,
          callbacks=[keras.callbacks.BackupAndRestore(backup, save_freq=4), Kill()])
values = model.variables + model.optimizer.variables + model.critic_optimizer.variables
np.savez(out, *[v.numpy() for v in values])
'''


def test_sigkill_mid_epoch_then_restart_matches_a_straight_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(CHILD)
    env = child_env()

    def start(backup, out, kill=(-1, -1)):
        args = [sys.executable, str(script), TESTS, str(tmp_path / backup), str(tmp_path / out)]
        return subprocess.Popen(args + [str(k) for k in kill], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # 6 batches an epoch, a backup every 4 batches: the last one before the
    # kill is after batch 1 of epoch 1 (the 8th); the kill comes after batch 4.
    straight = start("straight", "straight.npz")
    killed = start("backup", "unused.npz", kill=(1, 4))
    _, err = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, err[-3000:]
    metadata = json.loads((tmp_path / "backup" / "training_metadata.json").read_text())
    assert metadata == {"epoch": 1, "batch": 1}
    resumed = start("backup", "resumed.npz")
    for proc in (straight, resumed):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    a, b = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "resumed.npz")
    assert a.files == b.files
    assert_same([b[k] for k in b.files], [a[k] for k in a.files], exact=False)
    assert not (tmp_path / "backup").exists()


# -- files on disk: Keras' semantics, atomic, no temporaries left -----------------
def marked_model(mark):
    """A small BackpropQModel whose weights carry `mark` (a float)."""
    model, _ = graphs.chain()
    model.compile(optimizer=keras.optimizers.Adam(0.05), estimator="reinforce")
    model.build_training_state()
    set_mark(model, mark)
    return model


def set_mark(model, mark):
    kernel = model.get_layer("d1").kernel
    kernel.assign(np.full(kernel.shape, mark, "float32"))


_READER = []


def read_mark(path):
    """The mark of the model saved in `path` (a `.keras` or `.weights.h5`)."""
    if not _READER:
        _READER.append(marked_model(0.0))
    _READER[0].load_weights(path)
    return float(_READER[0].get_layer("d1").kernel.numpy()[0, 0])


def child_env():
    """The environment for a child Python: it imports the keras_bpq under test."""
    paths = [os.path.dirname(TESTS), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.pathsep.join(p for p in paths if p))


SEMANTICS = r'''
import json, os, stat, sys
sys.path.insert(0, sys.argv[1])
import keras
import numpy as np
import test_saving as ts

root = sys.argv[2]
probe = os.path.join(root, "probe")
open(probe, "w").close()
os.chmod(probe, 0o444)
try:
    open(probe, "w").close()
    sys.exit(99)  # file permissions do not apply to this process
except PermissionError:
    os.remove(probe)
model = ts.marked_model(1.0)


def setup(folder, scenario, plain, suffix):
    """Lays out `scenario` in `folder` (with plain Keras, mark 1); returns the path to save to."""
    os.makedirs(folder)
    f = os.path.join(folder, "f" + suffix)
    if scenario == "missing parent folder":
        return os.path.join(folder, "missing", "f" + suffix)
    if scenario == "path is a folder":
        os.makedirs(f)
        return f
    if scenario == "read-only folder, new file":
        os.chmod(folder, 0o555)
        return f
    plain(model, f)
    if scenario == "read-only file":
        os.chmod(f, 0o444)
    elif scenario == "file mode 0600":
        os.chmod(f, 0o600)
    elif scenario == "read-only folder, existing file":
        os.chmod(folder, 0o555)
    elif scenario == "symlink":
        os.makedirs(os.path.join(folder, "real"))
        os.rename(f, os.path.join(folder, "real", "target" + suffix))
        os.symlink(os.path.join("real", "target" + suffix), f)
    elif scenario == "symlink chain":
        os.rename(f, os.path.join(folder, "end" + suffix))
        os.symlink("end" + suffix, os.path.join(folder, "middle" + suffix))
        os.symlink("middle" + suffix, f)
    elif scenario == "dangling symlink":
        os.remove(f)
        os.symlink("nowhere" + suffix, f)
    elif scenario == "hard link":
        os.link(f, os.path.join(folder, "g" + suffix))
    return f


def state(folder):
    """Every entry under `folder`: links, files (permission bits, mark), folders."""
    entries = []
    for directory, folders, files in os.walk(folder):
        for name in sorted(folders + files):
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                entries.append([rel, "link", os.readlink(path)])
            elif os.path.isdir(path):
                entries.append([rel, "folder", oct(stat.S_IMODE(os.stat(path).st_mode))])
            else:
                entries.append([rel, "file", oct(stat.S_IMODE(os.stat(path).st_mode)), ts.read_mark(path)])
    return entries


def outcome(scenario, suffix, who, save, plain):
    folder = os.path.join(root, who + suffix, scenario.replace(" ", "_").replace(",", ""))
    path = setup(folder, scenario, plain, suffix)
    ts.set_mark(model, 2.0)
    try:
        save(model, path)
        result = "saved"
    except Exception as error:
        result = type(error).__name__
    ts.set_mark(model, 1.0)
    for directory, _, _ in os.walk(folder):
        os.chmod(directory, 0o755)  # so that the files can be read back and removed
    return [result, state(folder)]


results = {}
for suffix, plain, ours in (
    (".keras", keras.Model.save, type(model).save),
    (".weights.h5", keras.Model.save_weights, type(model).save_weights),
):
    for scenario in json.loads(sys.argv[3]):
        results[f"{suffix}: {scenario}"] = {
            who: outcome(scenario, suffix, who, save, plain)
            for who, save in (("keras", plain), ("keras_bpq", ours))
        }
print("RESULTS " + json.dumps(results))
'''

SCENARIOS = [
    "read-only file",
    "read-only folder, existing file",
    "read-only folder, new file",
    "file mode 0600",
    "symlink",
    "symlink chain",
    "dangling symlink",
    "hard link",
    "path is a folder",
    "missing parent folder",
]


# Runs a Python command line with the capabilities that let root ignore file
# permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) dropped, so that they
# apply to it as to any user. (The child checks that they do.)
UNPRIVILEGED = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "for capability in (1, 2):\n"
    "    libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n"
)


def test_saving_keeps_keras_file_semantics(tmp_path):
    """Each save (`.keras` and `.weights.h5`) has the outcome that
    `keras.Model.save` / `save_weights`, which write in place, have: symlinks
    written through, read-only files and folders refused with the same error,
    permission bits and hard links kept, nothing else left behind; while the
    file is still replaced atomically (see the SIGKILL test below). Run
    without the right to ignore file permissions, even as root."""
    script = tmp_path / "semantics.py"
    script.write_text(SEMANTICS)
    (tmp_path / "out").mkdir()
    os.chmod(tmp_path, 0o755)
    command = [str(script), TESTS, str(tmp_path / "out"), json.dumps(SCENARIOS)]
    if os.geteuid() == 0:
        command = ["-c", UNPRIVILEGED] + command
    proc = subprocess.run([sys.executable] + command, env=child_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode == 99:
        pytest.skip("file permissions do not apply here (root that cannot drop CAP_DAC_OVERRIDE)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")][-1]
    results = json.loads(line[len("RESULTS "):])
    for suffix in (".keras", ".weights.h5"):
        # The cases that matter, as plain Keras has them (checked, not assumed).
        keras_outcome = {k.split(": ", 1)[1]: v["keras"] for k, v in results.items() if k.startswith(suffix)}
        assert keras_outcome["read-only file"][0] == "PermissionError"
        assert keras_outcome["read-only folder, new file"][0] == "PermissionError"
        assert keras_outcome["read-only folder, existing file"][0] == "saved"
        assert keras_outcome["symlink"][1][0][1:] == ["link", os.path.join("real", "target" + suffix)]
        for scenario in SCENARIOS:
            key = f"{suffix}: {scenario}"
            assert results[key]["keras_bpq"] == results[key]["keras"], key


KILLED = r'''
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import keras
import test_saving as ts

path, mode = sys.argv[2], sys.argv[3]
model = ts.marked_model(2.0)
save = model.save if path.endswith(".keras") else model.save_weights
if mode == "once":
    # Killed while Keras writes the temporary file.
    def dying(self, filepath, *args, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"half")
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(keras.Model, save.__name__, dying)
    save(path)
elif mode == "mark 3":  # one save, mark 3
    ts.set_mark(model, 3.0)
    save(path)
else:  # saves again and again, marks 2 and 3, until killed
    for i in range(10**6):
        ts.set_mark(model, 2.0 + i % 2)
        save(path)
        print(i, flush=True)
'''


def start_killed(tmp_path, path, mode):
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    return subprocess.Popen([sys.executable, str(script), TESTS, str(path), mode], env=child_env(),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("name", ["model.keras", "model.weights.h5"])
def test_killed_save_leftovers_are_removed_by_the_next_save_and_nothing_else(tmp_path, name):
    import fcntl

    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / name
    model = marked_model(1.0)
    (model.save if name.endswith(".keras") else model.save_weights)(path)
    killed = start_killed(tmp_path, path, "once")
    _, err = killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL, err[-3000:]
    assert read_mark(path) == 1.0  # the file is untouched
    leftovers = set(os.listdir(folder)) - {name}
    assert leftovers  # what the kill left

    # Not ours to remove: another file's temporary folder, a save in progress
    # (its lock held), names that only look like ours.
    others = [f".tmp-keras_bpq-1-0123abcd-other{name}", f".tmp-keras_bpq-2-89abcdef-{name}"]
    for other in others:
        (folder / other).mkdir()
        (folder / other / "lock").write_text("")
    (folder / f".tmp-keras_bpq-3-deadbeef-{name}").write_text("a file")
    (folder / f".tmp-keras_bpq-4-cafebabe-{name}").mkdir()
    (folder / f".tmp-keras_bpq-4-cafebabe-{name}" / "notes.txt").write_text("a user's")
    (folder / ".tmp-notes").write_text("a user's")
    in_progress = os.open(folder / others[1] / "lock", os.O_RDWR)
    fcntl.flock(in_progress, fcntl.LOCK_EX)
    kept = sorted(os.listdir(folder))
    try:
        set_mark(model, 3.0)
        (model.save if name.endswith(".keras") else model.save_weights)(path)
    finally:
        os.close(in_progress)  # the save in progress "ends"
    assert read_mark(path) == 3.0
    assert sorted(os.listdir(folder)) == sorted(set(kept) - leftovers)
    assert (folder / f".tmp-keras_bpq-4-cafebabe-{name}" / "notes.txt").read_text() == "a user's"
    # Its lock released, the folder of the save that was in progress is a leftover too.
    (model.save if name.endswith(".keras") else model.save_weights)(path)
    assert others[1] not in os.listdir(folder)


@pytest.mark.parametrize(
    "scenario, name", [("hard link", "model.weights.h5"), ("read-only folder", "model.keras")]
)
def test_killed_in_place_save_leftovers_are_removed_by_the_next_save(tmp_path, scenario, name, monkeypatch):
    """A save that cannot rename over the file (it has another hard link, or
    its folder is read-only) writes it whole first, beside it or in the
    system's temporary folder, then copies it in place: a kill while it
    writes leaves the file untouched, and the next save removes what the kill
    left, wherever it is. Run without the right to ignore file permissions."""
    folder, temporaries = tmp_path / "models", tmp_path / "tmp"
    folder.mkdir()
    temporaries.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporaries))  # this process's gettempdir()
    path = folder / name
    model = marked_model(1.0)
    (model.save if name.endswith(".keras") else model.save_weights)(path)
    if scenario == "hard link":
        os.link(path, folder / ("g" + name))
    else:
        os.chmod(folder, 0o555)
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    prefix = ["-c", UNPRIVILEGED] if os.geteuid() == 0 else []
    env = dict(child_env(), TMPDIR=str(temporaries))

    def child(mode, *code):
        args = [sys.executable] + prefix + (list(code) or [str(script), TESTS, str(path), mode])
        return subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    try:
        if scenario == "read-only folder":
            probe = child(None, "-c", f"open({str(folder / 'probe')!r}, 'w')")
            if probe.returncode == 0:
                pytest.skip("file permissions do not apply here (root that cannot drop CAP_DAC_OVERRIDE)")
        killed = child("once")
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        assert read_mark(path) == 1.0  # the file is untouched
        left = set(os.listdir(folder)) | set(os.listdir(temporaries))
        assert left - {name, "g" + name}  # what the kill left
        again = child("mark 3")
        assert again.returncode == 0, again.stderr[-3000:]
    finally:
        os.chmod(folder, 0o755)
    assert read_mark(path) == 3.0
    assert os.listdir(temporaries) == []
    if scenario == "hard link":
        assert sorted(os.listdir(folder)) == sorted([name, "g" + name])
        assert os.stat(path).st_nlink == 2 and read_mark(folder / ("g" + name)) == 3.0
    else:
        assert os.listdir(folder) == [name]


KILLED_EXPORT = r'''
import os, signal, sys
from keras_bpq import saving

path, mode = sys.argv[1], sys.argv[2]
if mode == "between renames":  # killed once the old folder is moved aside
    rename = os.rename

    def dying(source, destination):
        rename(source, destination)
        os.kill(os.getpid(), signal.SIGKILL)

    os.rename = dying
with saving.atomic_directory(path) as folder:
    with open(os.path.join(folder, "version.txt"), "w") as f:
        f.write("second")
    if mode == "writing":
        os.kill(os.getpid(), signal.SIGKILL)
'''


def _write_version(folder, text):
    pathlib.Path(folder, "version.txt").write_text(text)


@pytest.mark.parametrize("mode", ["writing", "between renames"])
def test_killed_export_leftovers_are_cleared_by_the_next_export_and_nothing_else(tmp_path, mode):
    import fcntl

    from keras_bpq import saving

    base = tmp_path / "serving"
    path = base / "1"
    with saving.atomic_directory(path) as folder:
        _write_version(folder, "first")
    script = tmp_path / "killed_export.py"
    script.write_text(KILLED_EXPORT)
    killed = subprocess.run([sys.executable, str(script), str(path), mode], env=child_env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    leftovers = {p.name for p in base.iterdir()} - {"1"}
    roles = sorted(name.split("-")[2] for name in leftovers)
    assert roles == (["folder", "lock"] if mode == "writing" else ["folder", "lock", "old"])
    assert path.exists() == (mode == "writing")  # killed between the renames: the one moment `path` is missing

    # Not ours to clear: an export in progress (its lock held), another
    # version's leftovers, a folder named as ours without a lock.
    in_progress = {role: base / f".tmp-keras_bpq-{role}-7-0123abcd-1" for role in ("folder", "lock")}
    other = {role: base / f".tmp-keras_bpq-{role}-8-89abcdef-2" for role in ("folder", "lock")}
    unlocked = base / ".tmp-keras_bpq-folder-9-deadbeef-1"
    for folder in (in_progress["folder"], other["folder"], unlocked):
        folder.mkdir()
        _write_version(folder, "not ours")
    for lock in (in_progress["lock"], other["lock"]):
        lock.write_text("")
    held = os.open(in_progress["lock"], os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    kept = {p.name for p in base.iterdir()} - leftovers - {"1"}
    try:
        with saving.atomic_directory(path) as folder:
            # Cleared before the export writes: the killed one's new folder in
            # place where it was killed between its renames, the old one kept
            # where it was killed while writing.
            expected = "first" if mode == "writing" else "second"
            assert (path / "version.txt").read_text() == expected
            own = pathlib.Path(folder).name
            assert {p.name for p in base.iterdir()} - kept == {"1", own, own.replace("-folder-", "-lock-", 1)}
            _write_version(folder, "third")
    finally:
        os.close(held)  # the export in progress "ends"
    assert (path / "version.txt").read_text() == "third"
    assert {p.name for p in base.iterdir()} == kept | {"1"}
    assert (unlocked / "version.txt").read_text() == "not ours"
    # Its lock released, the export that was in progress left leftovers too.
    with saving.atomic_directory(path) as folder:
        _write_version(folder, "fourth")
    assert {p.name for p in base.iterdir()} == {"1", unlocked.name, other["folder"].name, other["lock"].name}


def _export_with_failing_renames(path, monkeypatch, failing):
    """Exports "first" to `path`, then "second" with every `os.rename` whose
    1-based number `failing(n)` names raising OSError (the first moves the
    old folder aside, the second puts the new one in place, a third puts the
    old one back), which the export raises; returns the renames' destinations."""
    from keras_bpq import saving

    with saving.atomic_directory(path) as folder:
        _write_version(folder, "first")
    rename, calls = os.rename, []

    def renamed(source, destination):
        calls.append(destination)
        if failing(len(calls)):
            raise OSError(18, "Invalid cross-device link", destination)
        rename(source, destination)

    monkeypatch.setattr(os, "rename", renamed)
    with pytest.raises(OSError, match="cross-device"):
        with saving.atomic_directory(path) as folder:
            _write_version(folder, "second")
    monkeypatch.setattr(os, "rename", rename)
    return calls


def test_an_export_whose_last_rename_fails_leaves_the_old_folder_and_nothing_hidden(tmp_path, monkeypatch):
    path = tmp_path / "1"
    calls = _export_with_failing_renames(path, monkeypatch, lambda n: n == 2)
    assert len(calls) == 3  # the old folder moved aside, the failed rename, the old folder put back
    assert (path / "version.txt").read_text() == "first"
    assert os.listdir(tmp_path) == ["1"]


def test_an_export_that_cannot_put_the_old_folder_back_leaves_both_for_the_next_export(tmp_path, monkeypatch):
    from keras_bpq import saving

    path = tmp_path / "1"
    _export_with_failing_renames(path, monkeypatch, lambda n: n > 1)
    assert not path.exists()
    assert sorted(name.split("-")[2] for name in os.listdir(tmp_path)) == ["folder", "lock", "old"]
    with saving.atomic_directory(path) as folder:
        # The next export first put the newest whole folder in place.
        assert (path / "version.txt").read_text() == "second"
        _write_version(folder, "third")
    assert (path / "version.txt").read_text() == "third"
    assert os.listdir(tmp_path) == ["1"]


def test_sigkill_during_repeated_saves_always_leaves_a_loadable_file(tmp_path):
    """A process saving `.keras` files again and again, killed at random
    moments: the file always loads and holds one of the saved states, and the
    next save removes what the kills left."""
    rng = np.random.RandomState(0)
    path = tmp_path / "models" / "model.keras"
    path.parent.mkdir()
    marked_model(1.0).save(path)
    for _ in range(3):
        proc = start_killed(tmp_path, path, "loop")
        for _ in range(1 + rng.randint(3)):  # some saves done, then a kill at a random moment
            assert proc.stdout.readline(), proc.communicate()[1][-3000:]
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.communicate(timeout=60)
        assert read_mark(path) in (1.0, 2.0, 3.0)
    marked_model(4.0).save(path)
    assert os.listdir(path.parent) == ["model.keras"]
    assert read_mark(path) == 4.0


# -- loading errors that say what is wrong ------------------------------------------
def test_truncated_or_corrupt_keras_file_is_named(tmp_path):
    import zipfile

    path = tmp_path / "model.keras"
    model = marked_model(1.0)
    model.save(path)
    data = path.read_bytes()
    offset = data.index(b'"class_name"')  # stored uncompressed: a byte of config.json
    with zipfile.ZipFile(path) as archive:
        without_config = {n: archive.read(n) for n in archive.namelist() if n != "config.json"}
    variants = {
        "empty": b"",
        "cut": data[:100],
        "half": data[: len(data) // 2],
        "last_byte_missing": data[:-1],
        "flipped": data[:offset] + b"X" + data[offset + 1:],
        "text": b"not a model\n",
    }
    for name, content in variants.items():
        (tmp_path / f"{name}.keras").write_bytes(content)
    with zipfile.ZipFile(tmp_path / "no_config.keras", "w") as archive:
        for member, content in without_config.items():
            archive.writestr(member, content)
    for name in list(variants) + ["no_config"]:
        bad = str(tmp_path / f"{name}.keras")
        pattern = rf"{re.escape(repr(bad))} is not a (valid|complete|valid or complete) \.keras archive"
        with pytest.raises(ValueError, match=pattern):
            keras_bpq.saving.load_model(bad)
        with pytest.raises(ValueError, match=pattern):
            model.load_weights(bad)
    assert read_mark(path) == 1.0 and keras_bpq.saving.load_model(path).name == model.name

    # A weights file cut short: still an OSError (BackupAndRestore falls back
    # to its previous copy on one), naming the file.
    model.save_weights(tmp_path / "model.weights.h5")
    weights = (tmp_path / "model.weights.h5").read_bytes()
    (tmp_path / "cut.weights.h5").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(OSError, match=r"cut\.weights\.h5' is not a valid or complete weights file"):
        model.load_weights(tmp_path / "cut.weights.h5")


def test_the_documented_loader_names_a_truncated_keras_file(tmp_path):
    """Every loader that the README and the docs show (`<module>.load_model(`)
    says that a `.keras` file cut short is not a complete archive and names
    it: Keras' own `keras.saving.load_model` says "File not found" there."""
    root = pathlib.Path(TESTS).parent
    pages = [root / "README.md"] + sorted((root / "docs").rglob("*.md"))
    shown = sorted({call for page in pages for call in re.findall(r"((?:\w+\.)+load_model)\(", page.read_text())})
    assert shown, "the docs show no loader"
    model = marked_model(6.0)
    model.save(tmp_path / "model.keras")
    data = (tmp_path / "model.keras").read_bytes()
    cut = str(tmp_path / "cut.keras")
    pathlib.Path(cut).write_bytes(data[: len(data) // 2])
    modules = {"keras": keras, "keras_bpq": keras_bpq}
    for call in shown:
        package, *names = call.split(".")
        load = functools.reduce(getattr, names, modules[package])
        with pytest.raises(ValueError, match=rf"{re.escape(repr(cut))} is not a valid or complete \.keras archive"):
            load(cut)
        assert load(str(tmp_path / "model.keras")).name == model.name, call


class Scale(keras.layers.Layer):
    """Not registered: a `.keras` file holding it needs custom_objects."""

    def call(self, x):
        return 2.0 * x


def unregistered_distribution(params):
    return tfp.distributions.Bernoulli(logits=params, dtype=tf.float32)


class Unregistered(keras_bpq.BackpropQModel):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.node = keras_bpq.Bernoulli(name="bits", seed=1)
        self.dense = keras.layers.Dense(2)

    def call(self, x, training=None):
        bits = self.node(self.dense(x))
        keras_bpq.add_cost("cost", keras.ops.sum(bits, axis=-1))
        return bits


def test_unknown_class_in_a_keras_file_is_named(tmp_path):
    x = keras.Input((graphs.INPUT_DIM,))
    z = keras_bpq.Bernoulli(name="z", seed=1)(keras.layers.Dense(2)(Scale(name="scale")(x)))
    s = keras_bpq.StochasticNode(unregistered_distribution, name="s", seed=2)(keras.layers.Dense(2)(z))
    network = keras_bpq.BackpropQModel(inputs=x, outputs=s, costs={"c": keras.ops.sum(z + s, axis=-1)})
    subclassed = Unregistered()
    subclassed(data(2))
    for model in (network, subclassed):
        model.compile(estimator="reinforce")
        model.fit(data(), batch_size=6, verbose=0)
    network.save(tmp_path / "network.keras")
    subclassed.save(tmp_path / "subclassed.keras")

    network_names = ["Scale", "unregistered_distribution"]
    for load in (keras.saving.load_model, keras_bpq.saving.load_model):
        with pytest.raises(ValueError) as error:
            load(tmp_path / "network.keras")
        message = str(error.value)
        assert len(message) < 1000
        assert str(network_names) in message
        assert "custom_objects=" in message and "register_keras_serializable" in message
    with pytest.raises(ValueError, match=r"\['Unregistered'\].*custom_objects=\{'Unregistered': Unregistered\}"):
        keras_bpq.saving.load_model(tmp_path / "subclassed.keras")

    objects = {"Scale": Scale, "unregistered_distribution": unregistered_distribution}
    loaded = keras.saving.load_model(tmp_path / "network.keras", custom_objects=objects)
    assert_same(state(loaded), state(network))
    with keras.saving.custom_object_scope(objects):
        keras_bpq.saving.load_model(tmp_path / "network.keras")
    loaded = keras_bpq.saving.load_model(tmp_path / "subclassed.keras", custom_objects={"Unregistered": Unregistered})
    assert_same(state(loaded), state(subclassed))


def test_stale_backup_from_another_model_says_so(tmp_path):
    backup = tmp_path / "backup"

    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                raise RuntimeError("interrupted")

    def chain(**options):
        model, _ = graphs.chain()
        model.compile(**{"optimizer": keras.optimizers.Adam(0.05), "critic_hidden_units": (8,), "estimator": "critic_cv", **options})
        return model

    with pytest.raises(RuntimeError, match="interrupted"):
        chain().fit(data(), batch_size=6, epochs=2, verbose=0,
                    callbacks=[keras.callbacks.BackupAndRestore(backup, save_freq=1), Stop()])
    written = sorted(os.listdir(backup))
    tree, _ = graphs.tree()
    tree.compile(critic_hidden_units=(8,))
    others = {
        "other layers": tree,
        "other critic widths": chain(critic_hidden_units=(16,)),
        "other estimators": chain(estimator="reinforce"),
        "other optimizer": chain(optimizer=keras.optimizers.SGD(0.05)),  # Keras only warns
    }
    for what, model in others.items():
        with pytest.raises(ValueError) as error:
            model.fit(data(), batch_size=6, verbose=0, callbacks=[keras.callbacks.BackupAndRestore(backup)])
        message = str(error.value)
        assert f"The backup in {str(backup)!r}" in message, what
        assert f"written by a different model than {model.name!r}" in message, what
        assert f"Delete {str(backup)!r}" in message and "another backup_dir" in message, what
        assert len(message) < 1200, what
        assert sorted(os.listdir(backup)) == written  # nothing removed
    # The same model resumes from it.
    chain().fit(data(), batch_size=6, epochs=2, verbose=0, callbacks=[keras.callbacks.BackupAndRestore(backup)])
    assert not backup.exists()

    # A weights file that is not a backup: said plainly too.
    chain().save_weights(tmp_path / "chain.weights.h5")
    with pytest.raises(ValueError, match=r"The weights in .*chain\.weights\.h5' do not fit model 'tree'"):
        tree.load_weights(tmp_path / "chain.weights.h5")
    other_critic_optimizer = chain(critic_optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match=r"do not fit model 'chain'.*Skipping variable loading for optimizer"):
        other_critic_optimizer.load_weights(tmp_path / "chain.weights.h5")
    with pytest.warns(UserWarning, match="Skipping variable loading for optimizer"):
        other_critic_optimizer.load_weights(tmp_path / "chain.weights.h5", skip_mismatch=True)


# -- safe_mode ------------------------------------------------------------------------
def test_safe_mode_refuses_code_execution_payloads(tmp_path):
    """A `.keras` file that would run code when loaded (a Python lambda, a
    reference to a function that runs commands) is refused in safe mode
    (the default), by Keras' loader and by `keras_bpq.saving.load_model`,
    and runs nothing."""
    import zipfile

    sentinel = tmp_path / "pwned"
    payload = f"open({str(sentinel)!r}, 'w').write('ran')"
    x = keras.Input((graphs.INPUT_DIM,))
    h = keras.layers.Lambda(lambda t: (eval(payload), t)[1], name="payload")(x)  # noqa: S307
    z = keras_bpq.Bernoulli(name="z", seed=1)(keras.layers.Dense(2, name="d")(h))
    model = keras_bpq.BackpropQModel(inputs=x, outputs=z, costs={"c": keras.ops.sum(z, axis=-1)})
    model.compile(estimator="reinforce")
    model.save(tmp_path / "lambda.keras")
    sentinel.unlink()  # building the model ran it once

    # Crafted: the Dense layer's activation replaced by os.system / builtins.exec.
    safe, _ = graphs.chain()
    safe.compile(estimator="reinforce")
    safe.save(tmp_path / "safe.keras")
    with zipfile.ZipFile(tmp_path / "safe.keras") as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    config = members["config.json"].decode()
    assert '"activation": "linear"' in config
    crafted = {
        "os_system": {"module": "os", "class_name": "function", "config": "system", "registered_name": "function"},
        "exec": {"module": "builtins", "class_name": "function", "config": "exec", "registered_name": "function"},
        "os_class": {"module": "os", "class_name": "system", "config": {}, "registered_name": "system"},
    }
    for name, activation in crafted.items():
        with zipfile.ZipFile(tmp_path / f"{name}.keras", "w") as archive:
            for member, content in members.items():
                if member == "config.json":
                    content = config.replace('"activation": "linear"', '"activation": ' + json.dumps(activation))
                archive.writestr(member, content)

    for load in (keras.saving.load_model, keras_bpq.saving.load_model):
        with pytest.raises(ValueError, match="safe_mode"):
            load(tmp_path / "lambda.keras")
        for name in crafted:
            with pytest.raises((TypeError, ValueError)):
                load(tmp_path / f"{name}.keras")
    assert not sentinel.exists()
