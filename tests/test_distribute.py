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
        data = np.repeat(x, 2, axis=0)  # 6 rows: 3 per replica
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
        state = model.machinery.node_state["z"]["baseline"].value
        copies = [float(v.numpy()) for v in strategy.experimental_local_results(state)]
        counter = model.machinery.steps.value
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
