"""`fit` in ordinary TF input pipelines: tf.data, generators, validation data,
and several steps per compiled call."""

import pathlib
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import graphs

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))


def _chain(**compile_args):
    keras.utils.set_random_seed(0)
    model, x = graphs.chain()
    # z1: an EMA baseline; z1, z2: learned critics with target copies (every
    # learned head gets one once an estimator needs a critic; `auto` would
    # serve z2's head by common noise); z3: exact heads.
    model.compile(optimizer="adam", estimator={"z1": "reinforce", "z2": "critic_cv"}, **compile_args)
    return model, x


def _state(model):
    variables = model.weights + model.optimizer.variables + model.critic_optimizer.variables
    return [v.numpy() for v in variables]


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_steps_per_execution_matches_one_step_per_call(jit_compile):
    """7 steps as calls of 3, 3 and 1: the same weights, critics, target copies,
    baselines, optimizer state and logs as 7 calls of one step."""
    data = np.tile(graphs.inputs(), (7, 1))
    runs = []
    for steps in (1, 3):
        model, _ = _chain(steps_per_execution=steps, jit_compile=jit_compile)
        model.build_training_state()
        start = _state(model)
        history = model.fit(data, batch_size=3, epochs=2, shuffle=False, verbose=0)
        assert int(model.training_state.steps.numpy()) == 14
        runs.append((_state(model), history.history))
    (one, logs_one), (three, logs_three) = runs
    assert len(one) == len(three)
    names = [v.path for v in model.weights]
    for i, (a, b) in enumerate(zip(one, three)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=names[i] if i < len(names) else str(i))
    assert any(not np.allclose(a, b) for a, b in zip(start, one))  # training moved them
    baseline = model.training_state.node_state["z1"].baseline.numpy()
    assert baseline != 0.0
    assert logs_one.keys() == logs_three.keys()
    for key in logs_one:
        np.testing.assert_allclose(logs_one[key], logs_three[key], rtol=1e-5, err_msg=key)


def _binarised(x, seed):
    """Dynamic binarisation inside the pipeline, as examples/sbn.py does."""
    probs = tf.data.Dataset.from_tensor_slices(tf.sigmoid(x))
    return probs.map(
        lambda p: tf.cast(tf.random.stateless_uniform(tf.shape(p), seed=[seed, 0]) < p, tf.float32)
    )


def _check_logs(history, validation):
    logs = history.history
    expected = ["loss", "cost", "z1_critic_loss", "z2_critic_loss", "z2_td_error", "z2_q"]
    # z3 is the cost's last node: its head is the cost itself, no critic.
    assert "z3_critic_loss" not in logs
    for key in expected + (["val_" + k for k in expected] if validation else []):
        assert key in logs, sorted(logs)
        assert len(logs[key]) == 2 and np.isfinite(logs[key]).all(), (key, logs[key])


def test_fit_on_a_tf_data_pipeline_with_validation_data():
    model, x = _chain()
    train = (
        tf.data.Dataset.from_tensor_slices(np.tile(x, (8, 1)))
        .shuffle(24, seed=0)
        .map(lambda row: tf.cast(tf.random.uniform(tf.shape(row)) < tf.sigmoid(row), tf.float32))
        .batch(6)
        .prefetch(tf.data.AUTOTUNE)
    )
    validation = _binarised(np.tile(x, (4, 1)), seed=1).batch(6)
    history = model.fit(train, validation_data=validation, epochs=2, shuffle=False, verbose=0)
    _check_logs(history, validation=True)
    assert int(model.training_state.steps.numpy()) == 8  # 4 batches a epoch; validation trains nothing


def test_fit_on_a_generator_with_generator_validation_data():
    model, x = _chain()

    def batches(seed):
        rng = np.random.RandomState(seed)
        while True:
            yield ((rng.rand(6, x.shape[1]) < 0.5).astype("float32"),)  # (inputs,)

    history = model.fit(
        batches(0), steps_per_epoch=3, validation_data=batches(1), validation_steps=2,
        epochs=2, shuffle=False, verbose=0,
    )
    _check_logs(history, validation=True)
    assert int(model.training_state.steps.numpy()) == 6


def test_fit_on_arrays_with_validation_split_and_tuple_validation():
    model, x = _chain()
    data = np.tile(x, (6, 1))
    history = model.fit(data, batch_size=3, validation_split=0.5, epochs=2, verbose=0)
    _check_logs(history, validation=True)
    model, x = _chain()
    history = model.fit(data, batch_size=3, validation_data=(data,), epochs=2, verbose=0)
    _check_logs(history, validation=True)


def test_sbn_example_binarises_dynamically_in_its_pipeline():
    """examples/sbn.py draws a fresh binarisation of every image each epoch."""
    from sbn import binarised

    images = np.full((4, 64), 0.3, "float32")
    dataset = binarised(images, batch_size=4, seed=0, repeat=True)
    assert isinstance(dataset, tf.data.Dataset)
    draws = np.stack([batch.numpy() for batch in dataset.take(200)])
    assert set(np.unique(draws)) == {0.0, 1.0}
    assert not np.array_equal(draws[0], draws[1])  # a new draw every epoch
    assert abs(draws.mean() - 0.3) < 0.01  # mean 0.3, se about 0.0011
    again = np.stack([batch.numpy() for batch in binarised(images, 4, 0, True).take(3)])
    np.testing.assert_array_equal(draws[:3], again)  # reproducible for a seed
