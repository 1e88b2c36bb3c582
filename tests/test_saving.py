"""`.keras` round trips, checkpoints, and exact resume after a crash."""

import dataclasses
import json
import os
import signal
import subprocess
import sys

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
        critics={"z1": keras.Sequential([keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])},
    )
    model.fit(data(), batch_size=6, epochs=1, shuffle=False, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)

    assert loaded.scg().node_names == model.scg().node_names
    options = dataclasses.replace(loaded._critic_options, models={})
    assert options == dataclasses.replace(model._critic_options, models={})
    assert isinstance(loaded._critic_options.models["z1"], keras.Sequential)
    assert {n: e.name for n, e in loaded._node_estimators.items()} == {"z1": "reinforce", "z2": "critic_cv"}
    assert loaded._node_estimators["z1"].decay == 0.9
    assert float(loaded.critic_optimizer.learning_rate) == pytest.approx(0.02)
    # Same values everywhere, the Adam moments of both optimizers included.
    assert [v.shape for v in loaded.variables] == [v.shape for v in model.variables]
    assert_same(state(loaded), state(model))
    assert int(loaded.critic_optimizer.iterations.numpy()) == 4
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
    model.compile(optimizer=keras.optimizers.Adam(0.05), critic_hidden_units=(8,))
    model.save(tmp_path / "fresh.keras")
    loaded = keras.saving.load_model(tmp_path / "fresh.keras")
    assert_same(state(loaded), state(model))

    model.fit(data(), batch_size=6, epochs=1, shuffle=False, verbose=0)
    model.save_weights(tmp_path / "trained.weights.h5")
    other, _ = graphs.chain()
    other.compile(optimizer=keras.optimizers.Adam(0.05), critic_hidden_units=(8,))
    other.load_weights(tmp_path / "trained.weights.h5")
    assert_same(state(other), state(model))
    assert sorted(os.listdir(tmp_path)) == ["fresh.keras", "trained.weights.h5"]  # no temporaries


class Oracle(critics_lib.Critic):
    heads = ("cost",)

    def q(self, context, values, target=True):
        return tf.zeros([tf.shape(values)[0], 1])


def test_unsavable_compile_options_are_named(tmp_path):
    model, _ = graphs.chain()
    model.compile(critics={"z1": Oracle()}, critic_hidden_units=(8,))
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
    model.compile(optimizer=keras.optimizers.Adam(0.05), critic_hidden_units=(8,))
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
        fresh.compile(optimizer=keras.optimizers.Adam(0.05), critic_hidden_units=(8,))
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
model.compile(optimizer=keras.optimizers.Adam(0.05), critic_hidden_units=(16,))
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
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

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
