"""Replay for the critics (`compile(replay=keras_bpq.Replay(...))`): options, the
ring buffer, critics-only updates, off-policy corrections, XLA, saving."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import graphs
import keras_bpq
from keras_bpq import replay as replay_lib
from keras_bpq import targets as targets_lib
from test_critics import learned_vs_exact
from test_gradients import assert_unbiased
from test_saving import assert_same
from test_saving import state

TESTS = pathlib.Path(__file__).resolve().parent


def rows_data(rows=24):
    """Distinct rows: row `i` starts with `i`, so a stored row names itself."""
    data = np.random.RandomState(0).normal(size=(rows, graphs.INPUT_DIM)).astype("float32")
    data[:, 0] = np.arange(rows)
    return data


def compiled_chain(replay=None, **kwargs):
    """The chain with learned critics (`critic_cv`: `auto` serves its heads by
    common noise, leaving replay nothing to train)."""
    model, x = graphs.chain()
    options = dict(optimizer=keras.optimizers.Adam(0.02), critic_optimizer=keras.optimizers.Adam(0.01),
                   critic_hidden_units=(8,), estimator="critic_cv")
    options.update(kwargs)
    model.compile(replay=replay, **options)
    return model, x


def changed(before, variables):
    return any(not np.array_equal(b, v.numpy()) for b, v in zip(before, variables))


# -- options ----------------------------------------------------------------------
@pytest.mark.parametrize("arguments, message", [
    (dict(capacity=0), r"Replay\(capacity=...\) must be a positive int"),
    (dict(capacity=2.5), r"Replay\(capacity=...\) must be a positive int"),
    (dict(capacity=True), r"Replay\(capacity=...\) must be a positive int"),
    (dict(capacity=8, updates_per_step=0), r"Replay\(updates_per_step=...\) must be a positive int"),
    (dict(capacity=8, batch_size=-1), r"Replay\(batch_size=...\) must be a positive int"),
    (dict(capacity=8, correction="importance"), r"correction=...\) must be one of \['expected', 'retrace', 'none'\]"),
])
def test_replay_arguments_are_validated(arguments, message):
    with pytest.raises(ValueError, match=message):
        keras_bpq.Replay(**arguments)


def test_compile_checks_the_replay_option_against_the_model():
    model, _ = graphs.chain()
    with pytest.raises(TypeError, match=r"compile\(replay=...\) takes keras_bpq.Replay"):
        model.compile(replay={"capacity": 8})
    with pytest.raises(ValueError, match="no learned critic for replay to train"):
        model.compile(estimator="reinforce", replay=keras_bpq.Replay(8))
    with pytest.raises(ValueError, match="no learned critic for replay to train.*common-noise heads"):
        model.compile(replay=keras_bpq.Replay(8))  # auto: every head common-noise or exact
    model.compile(estimator="critic_cv", replay=keras_bpq.Replay(8))
    model.build_training_state()
    with pytest.raises(ValueError, match="cannot add, remove or resize the replay buffer"):
        model.compile(estimator="critic_cv", replay=keras_bpq.Replay(16))
    with pytest.raises(ValueError, match="cannot add, remove or resize the replay buffer"):
        model.compile(estimator="critic_cv")
    model.compile(estimator="critic_cv", replay=keras_bpq.Replay(8, updates_per_step=3, correction="none"))
    assert model.replay_options == keras_bpq.Replay(8, updates_per_step=3, correction="none")


@pytest.mark.parametrize("spec, message", [
    (tf.TensorSpec([None, 2], tf.string), "input 'words' has dtype string"),
    (tf.RaggedTensorSpec([None, None], tf.int32), "input 'words' is a RaggedTensorSpec"),
    (tf.TensorSpec([None, None], tf.float32), "input 'words' has shape .* with an unknown size"),
])
def test_inputs_the_buffer_cannot_store_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        replay_lib.check_storable({"words": spec, "ids": tf.TensorSpec([None, 3], tf.int32)}, "input")


# -- the buffer ---------------------------------------------------------------------
def handmade_buffer(capacity):
    layout = replay_lib.ReplayLayout(
        inputs={"a": tf.TensorSpec([None, 2], tf.float32), "b": (tf.TensorSpec([None], tf.int32),)},
        targets=None,
        samples={"z": (1,), "k@2": (3,)},
        costs=("c",),
    )
    return replay_lib.ReplayBuffer(capacity, layout, name="buffer")


def handmade_rows(first, count):
    index = np.arange(first, first + count)
    return replay_lib.ReplayRows(
        x={"a": np.stack([index, -index], 1).astype("float32"), "b": (index.astype("int32"),)},
        y=None,
        samples={"z": (index[:, None] % 2).astype("float32"), "k@2": np.eye(3, dtype="float32")[index % 3]},
        log_probs={"z": -0.1 * index.astype("float32"), "k@2": -0.2 * index.astype("float32")},
        costs={"c": 10.0 * index.astype("float32")},
        weights=np.ones(count, "float32"),
    )


def test_buffer_fills_and_wraps_around():
    buffer = handmade_buffer(capacity=5)
    assert int(buffer.filled()) == 0
    buffer.write(handmade_rows(0, 3))
    assert int(buffer.count.numpy()) == 3 and int(buffer.filled()) == 3
    buffer.write(handmade_rows(3, 4))  # rows 0..6: 5 and 6 replace 0 and 1
    buffer.write(handmade_rows(7, 8))  # more rows than slots: only the last 5 (10..14) stay
    assert int(buffer.count.numpy()) == 15 and int(buffer.filled()) == 5
    contents = buffer.contents()
    rows = np.array([10, 11, 12, 13, 14])  # row n sits in slot n mod 5
    np.testing.assert_array_equal(contents.x["a"].numpy(), np.stack([rows, -rows], 1))
    assert contents.x["b"][0].dtype == tf.int32
    np.testing.assert_array_equal(contents.x["b"][0].numpy(), rows)
    np.testing.assert_array_equal(contents.samples["k@2"].numpy(), np.eye(3)[rows % 3])
    np.testing.assert_allclose(contents.log_probs["z"].numpy(), -0.1 * rows)
    np.testing.assert_allclose(contents.costs["c"].numpy(), 10.0 * rows)
    drawn = buffer.draw(200)
    assert set(drawn.x["b"][0].numpy()) == set(rows)  # uniform over the filled slots
    np.testing.assert_allclose(drawn.costs["c"].numpy(), 10.0 * drawn.x["b"][0].numpy())


def test_training_stores_every_row_of_the_pass():
    """Capacity + k rows through fit: the ring holds the last `capacity` rows,
    each with its sample, the behaviour log-probability of that sample and
    the costs the weights gave it (the policy is held fixed, so a replay under
    the current weights reproduces both)."""
    model, _ = compiled_chain(keras_bpq.Replay(capacity=10), optimizer=keras.optimizers.SGD(0.0))
    data = rows_data(12)
    model.fit(data, batch_size=3, epochs=1, shuffle=False, verbose=0)
    buffer = model.training_state.replay_buffer
    assert int(buffer.count.numpy()) == 12 and int(buffer.filled()) == 10
    contents = buffer.contents()
    rows = np.array([10, 11, 2, 3, 4, 5, 6, 7, 8, 9])
    np.testing.assert_array_equal(contents.x.numpy(), data[rows])
    np.testing.assert_array_equal(contents.weights.numpy(), np.ones(10))
    for sample in contents.samples.values():
        assert set(np.unique(sample.numpy())) <= {0.0, 1.0}
    replayed = model.record_forward(contents.x, forced=contents.samples)
    for name, record in replayed.records.items():
        np.testing.assert_allclose(contents.log_probs[name].numpy(), record.log_prob().numpy(), rtol=1e-5)
    np.testing.assert_allclose(contents.costs["cost"].numpy(), replayed.costs["cost"].numpy(), rtol=1e-5)


def test_targets_of_compiled_losses_are_stored_and_replayed():
    x = keras.Input((graphs.INPUT_DIM,))
    z1 = keras_bpq.Bernoulli(name="z1", seed=1)(graphs.dense(2, "d1", 1)(x))
    z2 = keras_bpq.Bernoulli(name="z2", seed=2)(graphs.dense(2, "d2", 2)(z1))
    model = keras_bpq.BackpropQModel(inputs=x, outputs=graphs.dense(2, "out", 3)(z2), name="regression")
    model.compile(loss="mse", estimator="critic_cv", critic_hidden_units=(8,),
                  replay=keras_bpq.Replay(8, correction="retrace"))
    data = rows_data(12)
    targets = np.stack([data[:, 0], 2 * data[:, 0]], 1)
    model.fit(data, targets, batch_size=4, epochs=2, shuffle=False, verbose=0)
    contents = model.training_state.replay_buffer.contents()
    np.testing.assert_array_equal(contents.y.numpy(), targets[contents.x.numpy()[:, 0].astype(int)])
    assert model.get_build_config()["target_spec"] == {"tensor_spec": {"shape": [None, 2], "dtype": "float32"}}

    unknown = keras_bpq.BackpropQModel(inputs=x, outputs=graphs.dense(2, "out2", 3)(z2))
    unknown.compile(loss="mse", estimator="critic_cv", replay=keras_bpq.Replay(8))
    with pytest.raises(ValueError, match="stores every row's targets, whose shapes are not known yet"):
        unknown.build_training_state()


# -- critics only ---------------------------------------------------------------------
def test_replay_changes_the_critics_only():
    """Two models with the same weights and seeds, one replaying: the first
    step (empty buffer) leaves them identical; in a later step the actor's
    update and the estimators' state are still identical, the critics not."""
    keras.utils.set_random_seed(0)
    replaying, _ = compiled_chain(keras_bpq.Replay(32, updates_per_step=2, correction="retrace"))
    plain, _ = compiled_chain()
    for model in (replaying, plain):
        model.build_training_state()
    buffer_ids = {id(v) for v in replaying.training_state.replay_buffer.variables}
    shared = [v for v in replaying.variables if id(v) not in buffer_ids]
    assert [v.path for v in shared] == [v.path for v in plain.variables]
    for a, b in zip(shared, plain.variables):
        b.assign(a)
    data = rows_data(6)

    def step():
        critics = [v.numpy() for v in replaying.critic_variables]
        replaying.train_on_batch(data)
        plain.train_on_batch(data)
        return changed(critics, replaying.critic_variables)

    assert step()
    assert_same([v.numpy() for v in shared], [v.numpy() for v in plain.variables])
    step()
    assert_same([v.numpy() for v in replaying.actor_variables], [v.numpy() for v in plain.actor_variables])
    nodes = replaying.scg().node_names
    states = [[v.numpy() for n in nodes for v in m.training_state.node_state[n]] for m in (replaying, plain)]
    assert_same(*states)
    assert changed([v.numpy() for v in plain.critic_variables], replaying.critic_variables)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_critic_cv_stays_unbiased_with_replay(jit_compile):
    keras.utils.set_random_seed(1)
    model, x = compiled_chain(keras_bpq.Replay(64, updates_per_step=2, correction="retrace"), jit_compile=jit_compile)
    model.fit(np.repeat(x, 4, axis=0), batch_size=6, epochs=3, verbose=0)
    assert int(model.training_state.replay_buffer.count.numpy()) == 36
    assert {e.name for e in model.node_estimators.values()} == {"critic_cv"}
    assert_unbiased(model, x)


def test_critics_learn_exact_q_at_least_as_well_per_forward_pass():
    """The same forward passes (the policy held fixed), with and without three
    replayed updates per step: replay's critics are at least as close to the
    exact Q (benchmarks/results/replay.md has the measured margin)."""
    errors = {}
    for replay in (None, keras_bpq.Replay(512, updates_per_step=3)):
        keras.utils.set_random_seed(0)
        model, x = graphs.chain()
        model.compile(optimizer=keras.optimizers.SGD(0.0), critic_optimizer=keras.optimizers.Adam(3e-3),
                      critic_hidden_units=(32,), tau=0.05, steps_per_execution=10, replay=replay,
                      estimator="critic_cv")
        # 40 steps of one batch (x repeated 16 times), 10 per call.
        model.fit(np.tile(np.repeat(x, 16, axis=0), (40, 1)), batch_size=48, shuffle=False, verbose=0)
        errors[replay is not None] = np.mean(list(learned_vs_exact(model, x).values()))
    assert errors[True] <= errors[False], errors


# -- XLA, corrections ------------------------------------------------------------------
@pytest.mark.parametrize("correction", replay_lib.CORRECTIONS)
def test_each_correction_trains_under_xla_with_steps_per_execution(correction):
    model, x = compiled_chain(keras_bpq.Replay(20, updates_per_step=2, correction=correction, batch_size=5),
                              jit_compile=True, steps_per_execution=3)
    model.build_training_state()
    before = [v.numpy() for v in model.critic_variables]
    model.fit(rows_data(18), batch_size=3, epochs=1, shuffle=False, verbose=0)  # 6 steps, 2 executions
    buffer = model.training_state.replay_buffer
    assert int(buffer.count.numpy()) == 18 and int(model.training_state.steps.numpy()) == 6
    np.testing.assert_array_equal(np.sort(buffer.contents().x.numpy()[:18, 0]), np.arange(18))
    # 6 steps of one critic update, and 2 replayed ones from the second step on.
    assert int(model.critic_optimizer.iterations.numpy()) == 6 + 2 * 5
    assert changed(before, model.critic_variables)
    assert all(np.isfinite(v.numpy()).all() for v in model.critic_variables)


@pytest.mark.parametrize("correction", ["expected", "retrace"])
def test_a_continuous_successor_trains_with_a_fresh_draw(correction):
    """mixed: z1 -> n (Normal) -> z2; `Vbar` of n has no sum over a support."""
    model, x = graphs.mixed()
    model.compile(critic_hidden_units=(8,), replay=keras_bpq.Replay(16, updates_per_step=2, correction=correction))
    model.build_training_state()
    before = [v.numpy() for v in model.critic_variables]
    model.fit(np.repeat(x, 4, axis=0), batch_size=6, epochs=2, verbose=0)
    assert int(model.critic_optimizer.iterations.numpy()) == 4 + 2 * 3
    assert changed(before, model.critic_variables)
    assert all(np.isfinite(v.numpy()).all() for v in model.critic_variables)


def test_a_fresh_draw_estimates_vbar_without_bias(monkeypatch):
    """Where a successor's support is too large to sum, `Vbar` is its heads at
    one fresh draw from the current policy: on the chain (small supports) its
    targets match the exact sums on average."""
    keras.utils.set_random_seed(5)
    model, x = compiled_chain()
    model.build_training_state()
    data = tf.constant(np.repeat(x, 1000, axis=0))
    recording = model.record_forward(data)
    arguments = ("expected", 0.9, model.scg(), recording.costs, recording.records,
                 model.training_state.critics, model.q_function, data, None)
    exact, _ = targets_lib.evaluate(*arguments)
    monkeypatch.setattr(targets_lib, "MAX_SUPPORT", 0)
    sampled, _ = targets_lib.evaluate(*arguments, seed=tf.constant([3, 4], tf.int32))
    assert set(sampled) == set(exact) == {("z1", "cost"), ("z2", "cost")}
    for key in exact:
        difference = sampled[key].numpy() - exact[key].numpy()
        assert np.abs(difference).max() > 1e-3  # drawn, not summed
        assert abs(difference.mean()) < 4 * difference.std() / np.sqrt(len(difference)), key


def test_retrace_ratios_are_clipped_at_one():
    pi = {"a": np.array([0.2, 0.9, 0.5]), "b": np.array([0.3, 0.3, 1.0])}
    mu = {"a": np.array([0.4, 0.3, 0.5]), "b": np.array([0.6, 0.1, 0.2])}
    ratios = targets_lib.truncated_ratios(
        {n: tf.constant(np.log(p), tf.float32) for n, p in pi.items()},
        {n: tf.constant(np.log(p), tf.float32) for n, p in mu.items()},
    )
    np.testing.assert_allclose(ratios["a"].numpy(), [0.5, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(ratios["b"].numpy(), [0.5, 1.0, 1.0], rtol=1e-6)


def test_retrace_targets_multiply_the_truncated_ratios_along_the_chain():
    """Chain z1 -> z2 -> z3 -> cost, by hand: `G_3 = c`, `G_2 = V_3`,
    `G_1 = V_2 + t_2 (G_2 - Q_2)`; unrolled, `G_1 = V_2 + t_2 (V_3 - Q_2)`
    and with t_3 entering only through `G_3 - Q_3 = 0`."""
    model, _ = graphs.chain()
    model.compile()
    scg = model.scg()
    c = tf.constant([1.0, 2.0])
    q = {"z2": {"cost": tf.constant([0.5, 4.0])}, "z3": {"cost": c}}
    v = {"z2": {"cost": tf.constant([0.7, 3.0])}, "z3": {"cost": tf.constant([1.5, 2.5])}}
    t = {"z2": tf.constant([0.25, 1.0]), "z3": tf.constant([0.1, 0.2])}
    targets = targets_lib.critic_targets("retrace", scg, {"cost": c}, q, v, traces=t)
    np.testing.assert_allclose(targets[("z2", "cost")].numpy(), [1.5, 2.5])
    np.testing.assert_allclose(targets[("z1", "cost")].numpy(), [0.7 + 0.25 * (1.5 - 0.5), 3.0 + 1.0 * (2.5 - 4.0)])
    # With every ratio 1 and an exact successor (Q_2 = V_2 ... = c) the target is the cost itself.
    ones = {n: tf.ones(2) for n in t}
    exact = {"z2": {"cost": c}, "z3": {"cost": c}}
    on_policy = targets_lib.critic_targets("retrace", scg, {"cost": c}, exact, exact, traces=ones)
    np.testing.assert_allclose(on_policy[("z1", "cost")].numpy(), c.numpy())


# -- saving and resuming -------------------------------------------------------------------
def test_weights_file_round_trips_a_filled_buffer_and_training_resumes(tmp_path):
    keras.utils.set_random_seed(2)
    model, _ = compiled_chain(keras_bpq.Replay(10, correction="expected"))
    model.fit(rows_data(12), batch_size=3, epochs=2, shuffle=False, verbose=0)
    assert int(model.training_state.replay_buffer.count.numpy()) == 24
    model.save_weights(tmp_path / "model.weights.h5")
    other, _ = compiled_chain(keras_bpq.Replay(10, correction="expected"))
    other.load_weights(tmp_path / "model.weights.h5")
    assert_same(state(other), state(model))  # the buffer, its count and its seed generator included
    for m in (model, other):
        m.fit(rows_data(12), batch_size=3, epochs=1, shuffle=False, verbose=0)
    assert_same(state(other), state(model), exact=False)


def test_keras_file_round_trips_a_filled_buffer_and_training_resumes(tmp_path):
    keras.utils.set_random_seed(3)
    model, _ = compiled_chain(keras_bpq.Replay(10, updates_per_step=2, correction="retrace", batch_size=4))
    model.fit(rows_data(12), batch_size=3, epochs=1, shuffle=False, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    assert loaded.replay_options == model.replay_options
    assert_same(state(loaded), state(model))
    for m in (model, loaded):
        m.fit(rows_data(12), batch_size=3, epochs=1, shuffle=False, verbose=0)
    assert_same(state(loaded), state(model), exact=False)


def test_interrupted_fit_resumes_with_the_buffer_it_had(tmp_path):
    def run(backup, stop_at=None):
        keras.utils.set_random_seed(4)
        model, _ = compiled_chain(keras_bpq.Replay(7, correction="retrace"), steps_per_execution=2)

        class Stop(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if batch == stop_at:
                    raise RuntimeError("interrupted")

        callbacks = [keras.callbacks.BackupAndRestore(backup, save_freq=2), Stop()]
        model.fit(rows_data(), batch_size=3, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
        return model

    reference = state(run(tmp_path / "straight"))
    with pytest.raises(RuntimeError, match="interrupted"):
        run(tmp_path / "backup", stop_at=5)
    assert_same(state(run(tmp_path / "backup")), reference, exact=False)


# -- tf.distribute -------------------------------------------------------------------------
DISTRIBUTED = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    import graphs, keras_bpq
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model, x = graphs.chain()
        model.compile(estimator="critic_cv", critic_hidden_units=(8,), replay=keras_bpq.Replay(8, correction="retrace"))
    model.build_training_state()
    before = [v.numpy() for v in model.critic_variables]
    data = np.zeros((12, 3), "float32")
    data[:, 0] = np.arange(12)
    model.fit(data, batch_size=4, epochs=1, shuffle=False, verbose=0)  # 3 steps, 2 rows per replica
    buffer = model.training_state.replay_buffer
    slots = [t.numpy()[:, 0].tolist() for t in strategy.experimental_local_results(buffer.input_slots[0].value)]
    moved = any(not np.array_equal(b, v.numpy()) for b, v in zip(before, model.critic_variables))
    print(json.dumps({{"count": int(buffer.count.numpy()), "slots": slots, "moved": moved,
                      "iterations": int(model.critic_optimizer.iterations.numpy())}}))
    """
).format(tests=str(TESTS))


def test_each_replica_keeps_its_own_buffer():
    result = subprocess.run(
        [sys.executable, "-c", DISTRIBUTED], capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["count"] == 6 and out["moved"]
    assert out["iterations"] == 3 + 2  # a replayed update from the second step on
    first, second = (sorted(s[:6]) for s in out["slots"])
    assert first == [0, 1, 4, 5, 8, 9] and second == [2, 3, 6, 7, 10, 11]
