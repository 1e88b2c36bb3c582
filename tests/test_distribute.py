"""tf.distribute: MirroredStrategy over two logical CPU devices.

Logical devices must be configured before TensorFlow starts, so each check runs
in a fresh subprocess.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

TESTS = pathlib.Path(__file__).resolve().parent

PRELUDE = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    import graphs
    from keras_bpq import diagnostics
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    """
).format(tests=str(TESTS))


def run(body):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_distributed_step_applies_an_unbiased_global_mean_gradient():
    """SGD(lr=1) steps from fixed weights: the mean applied update over many
    steps equals minus the exact gradient (a sum over replicas would double it)."""
    result = run(
        """
        with strategy.scope():
            model, x = graphs.chain()
            model.compile(optimizer=keras.optimizers.SGD(1.0), estimator="critic_cv",
                          critic_optimizer=keras.optimizers.SGD(0.0))
        data = np.repeat(x, 2, axis=0)  # train_on_batch gives each replica all 6 rows
        exact = diagnostics.exact_gradients(model, data)
        start = [v.numpy() for v in model.actor_variables]
        updates = []
        for _ in range(300):
            model.train_on_batch(data)
            updates.append([s - v.numpy() for s, v in zip(start, model.actor_variables)])
            for v, s in zip(model.actor_variables, start):
                v.assign(s)
        worst = 0.0
        for k, truth in enumerate(exact):
            d = np.stack([u[k] for u in updates])
            se = d.std(0, ddof=1) / np.sqrt(len(d)) + 1e-6
            worst = max(worst, float(np.max(np.abs(d.mean(0) - truth) / (4 * se + 1e-5))))
        print(json.dumps({"worst": worst, "replicas": strategy.num_replicas_in_sync}))
        """
    )
    assert result["replicas"] == 2
    assert result["worst"] < 1.0, result


def test_replicas_draw_different_samples_and_keep_state_in_sync():
    result = run(
        """
        import keras_bpq
        with strategy.scope():
            inp = keras.Input((4,))
            z = keras_bpq.Bernoulli(name="z", seed=3)(keras.layers.Dense(64)(inp))
            cost = keras.ops.sum(z, axis=-1)
            model = keras_bpq.BackpropQModel(inputs=inp, outputs=z, costs={"c": cost})
            model.compile(optimizer="adam", estimator="reinforce")
        x = np.zeros((2, 4), "float32")  # one identical row per replica

        @tf.function
        def draw(x):
            return strategy.run(lambda v: model(v, training=True), args=(x,))

        dist = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices(x).batch(2))
        model.fit(np.zeros((8, 4), "float32"), batch_size=4, epochs=1, verbose=0)
        with strategy.scope():
            drawn = draw(next(iter(dist)))
        samples = [np.asarray(s) for s in strategy.experimental_local_results(drawn)]
        state = model.training_state.node_state["z"].baseline.value
        copies = [float(v.numpy()) for v in strategy.experimental_local_results(state)]
        counter = model.training_state.steps.value
        steps = [int(v.numpy()) for v in strategy.experimental_local_results(counter)]
        print(json.dumps({
            "same": bool(np.array_equal(samples[0], samples[1])),
            "baselines": copies, "steps": steps,
        }))
        """
    )
    assert not result["same"]
    assert result["baselines"][0] == result["baselines"][1] != 0.0
    assert result["steps"] == [2, 2]


DETERMINISTIC = """
import keras_bpq

def build(**options):
    # Logits of +-50: every sample is certain, so two replicas and one device
    # see the same samples and must make the same updates.
    fixed = lambda units, name: keras.layers.Dense(
        units, name=name, kernel_initializer="zeros",
        bias_initializer=keras.initializers.Constant([50.0, -50.0][:units]))
    inp = keras.Input((3,))
    z1 = keras_bpq.Bernoulli(name="z1")(fixed(2, "d1")(inp))
    z2 = keras_bpq.Bernoulli(name="z2")(fixed(1, "d2")(keras.layers.Concatenate()([z1, inp])))
    out = keras.layers.Dense(2, name="dec", kernel_initializer="ones")(z2)
    cost = keras.ops.sum(keras.ops.square(out - inp[:, :2]), axis=-1)
    model = keras_bpq.BackpropQModel(inputs=inp, outputs=out, costs={"cost": cost})
    model.compile(optimizer=keras.optimizers.SGD(0.1), critic_optimizer=keras.optimizers.SGD(0.05),
                  critic_steps=3, critic_target="mc", tau=0.5, estimator="critic_cv", **options)
    return model

# Replica 0 gets the first two rows of a batch, replica 1 the last two: their
# critic losses differ.
data = np.random.RandomState(0).normal(size=(8, 3)).astype("float32")
"""


def test_critic_steps_under_merge_call_average_each_replica_own_loss():
    """critic_steps=3 on two replicas: every extra critic step averages the two
    replicas' own gradients, as one device on the whole batch does."""
    result = run(
        DETERMINISTIC
        + textwrap.dedent(
            """
        results = []
        for scope in (strategy.scope(), tf.distribute.get_strategy().scope()):
            keras.utils.set_random_seed(0)  # the same critic initialisation
            with scope:
                model = build()
            # fit splits each batch of 4 between the replicas (train_on_batch would not).
            model.fit(data, batch_size=4, epochs=1, shuffle=False, verbose=0)
            critic = model.training_state.critics["z1"]
            results.append([v.numpy() for v in critic.online.weights + critic.target_network.weights])
        print(json.dumps({
            "gap": max(float(np.abs(a - b).max()) for a, b in zip(*results)),
            "moved": max(float(np.abs(a - b).max()) for a, b in zip(results[0], results[0][len(results[0]) // 2:])),
        }))
        """
        )
    )
    assert result["gap"] < 1e-5, result
    assert result["moved"] > 1e-3, result  # the online critic trained away from its copy


def test_critic_update_period_on_two_replicas_matches_one_device():
    """critic_update_period=2 on two replicas: the critics train on the same
    steps (counter 0, 2, 4) and to the same weights as on one device."""
    result = run(
        DETERMINISTIC
        + textwrap.dedent(
            """
        results, iterations = [], []
        for scope in (strategy.scope(), tf.distribute.get_strategy().scope()):
            keras.utils.set_random_seed(0)
            with scope:
                model = build(critic_update_period=2)
            model.fit(np.tile(data, (3, 1)), batch_size=4, epochs=1, shuffle=False, verbose=0)
            critic = model.training_state.critics["z1"]
            results.append([v.numpy() for v in critic.online.weights + critic.target_network.weights])
            iterations.append(int(model.critic_optimizer.iterations.numpy()))
        print(json.dumps({
            "gap": max(float(np.abs(a - b).max()) for a, b in zip(*results)),
            "iterations": iterations,
        }))
        """
        )
    )
    assert result["gap"] < 1e-5, result
    assert result["iterations"] == [9, 9], result  # steps 0, 2, 4 of 6, critic_steps=3 each


def test_steps_per_execution_matches_one_step_per_call_on_two_replicas():
    """The same seeds give the same weights, critics, target copies, baselines
    and optimizer state with 4 steps per call as with 1 (6 steps: calls of 4 and 2)."""
    result = run(
        """
        states = []
        for steps in (1, 4):
            keras.utils.set_random_seed(0)
            with strategy.scope():
                model, x = graphs.chain()
                model.compile(optimizer="adam", estimator={"z1": "reinforce", "z2": "critic_cv"}, steps_per_execution=steps)
            history = model.fit(np.tile(x, (8, 1)), batch_size=4, epochs=1, shuffle=False, verbose=0)
            variables = model.weights + model.optimizer.variables + model.critic_optimizer.variables
            states.append([v.numpy() for v in variables])
            counter = int(model.training_state.steps.numpy())
        print(json.dumps({
            "gap": max(float(np.abs(a - b).max()) for a, b in zip(*states)),
            "moved": max(float(np.abs(a - b).max()) for a, b in zip(states[0], [v.numpy() for v in graphs.chain()[0].weights])),
            "steps": counter, "loss": history.history["loss"][-1],
        }))
        """
    )
    assert result["steps"] == 6, result
    assert result["gap"] < 1e-5, result
    assert result["moved"] > 1e-3 and np.isfinite(result["loss"]), result


def test_one_device_mirrored_strategy_trains():
    """MirroredStrategy() on a machine with one device: one replica, which still
    synchronises through merge_call (no update may run inside a tf.cond)."""
    result = run(
        """
        with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
            model, x = graphs.chain()
            model.compile(optimizer="adam", estimator={"z1": "reinforce", "z2": "critic_cv"}, critic_steps=2)
        history = model.fit(np.tile(x, (4, 1)), batch_size=3, epochs=2, verbose=0)
        print(json.dumps({"steps": int(model.training_state.steps.numpy()),
                          "loss": history.history["loss"][-1]}))
        """
    )
    assert result["steps"] == 8 and np.isfinite(result["loss"]), result


def test_mixed_float16_training_through_early_overflows_on_two_replicas():
    """Under mixed_float16 on two replicas with different data, a cost of 100
    overflows the float16 gradient at the initial loss scale on one replica
    and not always on the other. Keras' LossScaleOptimizer, under a strategy
    that synchronises through merge_call, decides on the first replica's
    gradient alone but would apply the replicas' sum: a step that overflowed on
    any replica must still be skipped whole, by every replica and the
    optimizer alike. Training goes on without an error, and the step counter
    equals the optimizer's iterations, the steps run less one per halving of
    the loss scale. Data seeds 1 and 3 (one child process): on main before the
    fix the first stopped with an undone step, the second counted skipped
    steps."""
    results = run(
        """
        import keras_bpq
        results = []
        for seed in (1, 3):
            keras.mixed_precision.set_global_policy("mixed_float16")
            with strategy.scope():
                x_in = keras.Input((3,))
                z = keras_bpq.Bernoulli(name="bits", seed=1)(keras.layers.Dense(2, name="enc")(x_in))
                h = keras.layers.Dense(3, name="dec")(z)
                cost = 100.0 * keras.ops.sum(keras.ops.square(h - x_in), axis=-1)
                model = keras_bpq.BackpropQModel(inputs=x_in, outputs=h, costs={"c": cost})
                model.compile(optimizer=keras.optimizers.Adam(0.01), estimator="reinforce", steps_per_execution=2)
            keras.mixed_precision.set_global_policy("float32")
            model.build_training_state()
            model.optimizer.build(model.actor_variables)
            x = np.random.RandomState(seed).normal(size=(8, 3)).astype("float32")
            try:
                model.fit(x, batch_size=4, epochs=10, verbose=0)
                message = ""
            except FloatingPointError as error:
                message = str(error)
            finite = all(np.all(np.isfinite(v.numpy())) for v in model.weights + model.optimizer.variables
                         if v.dtype.startswith("float"))
            results.append({
                "seed": seed, "message": message, "finite": finite,
                "initial": float(model.optimizer.initial_scale), "scale": float(model.optimizer.dynamic_scale.numpy()),
                "steps": int(model.training_state.steps.numpy()),
                "iterations": int(model.optimizer.iterations.numpy()),
            })
        print(json.dumps({"results": results}))
        """
    )
    for result in results["results"]:
        assert result["message"] == "" and result["finite"], result
        assert 1.0 < result["scale"] < result["initial"], result
        skipped = int(round(np.log2(result["initial"] / result["scale"])))
        assert result["steps"] == result["iterations"] == 20 - skipped, result
