"""BackpropQModel: compile/fit/evaluate/predict, costs, metrics, variables."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import graphs
import keras_bpq
from keras_bpq import diagnostics


def test_fit_reduces_the_exact_objective():
    model, x = graphs.two_costs()
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    _, before = diagnostics.exact_gradients(model, x, return_objective=True)
    data = np.repeat(x, 32, axis=0)
    history = model.fit(data, batch_size=32, epochs=30, verbose=0)
    _, after = diagnostics.exact_gradients(model, x, return_objective=True)
    assert after < before - 0.2, (before, after)
    assert {"loss", "near", "far"} <= set(history.history)


def test_cost_only_layers_are_actor_variables_and_train():
    model, x = graphs.two_costs()
    model.compile(optimizer=keras.optimizers.Adam(0.05), estimator="critic_cv")
    paths = [v.path for v in model.actor_variables]
    assert any("dec1" in p for p in paths), paths  # feeds only the cost "near"
    dec1 = model.get_layer("dec1")
    before = dec1.kernel.numpy().copy()
    model.fit(np.repeat(x, 8, axis=0), batch_size=8, epochs=2, verbose=0)
    assert not np.allclose(before, dec1.kernel.numpy())
    critic_ids = {id(v) for v in model.critic_variables}
    assert critic_ids and not critic_ids & {id(v) for v in model.actor_variables}
    assert {id(v) for v in model.trainable_variables} == critic_ids | {id(v) for v in model.actor_variables}


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_steps_per_execution_matches_single_steps(jit_compile):
    data = np.repeat(graphs.inputs(), 4, axis=0)
    weights = []
    for steps in (1, 3):
        keras.utils.set_random_seed(7)
        model, _ = graphs.chain()
        model.compile(optimizer=keras.optimizers.Adam(0.01), steps_per_execution=steps,
                      jit_compile=jit_compile)
        model.fit(data, batch_size=2, epochs=1, shuffle=False, verbose=0)
        weights.append([w.numpy() for w in model.weights])
    # Seed-generator states, step counters and baselines advance exactly alike;
    # float weights agree up to multi-threaded reduction order.
    for a, b in zip(*weights):
        if a.dtype.kind in "iu":
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_compiled_loss_is_a_per_example_cost():
    x_in = keras.Input((3,))
    z = keras_bpq.Bernoulli(name="z", seed=1)(keras.layers.Dense(2)(x_in))
    out = keras.layers.Dense(3, name="out")(z)
    model = keras_bpq.BackpropQModel(inputs=x_in, outputs=out)
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    x = graphs.inputs()
    scg = model.scg(x)
    assert scg.costs == ("output_loss",)
    history = model.fit(x, x, epochs=2, verbose=0)
    assert {"loss", "output_loss", "mae"} <= set(history.history)
    result = model.evaluate(x, x, verbose=0, return_dict=True)
    assert set(result) >= {"loss", "output_loss", "mae"}
    grads = diagnostics.exact_gradients(model, x, x)
    assert len(grads) == len(model.actor_variables)


def test_predict_returns_the_mode_and_evaluate_samples():
    model, x = graphs.chain()
    model.compile()
    first = model.predict(x, verbose=0)
    second = model.predict(x, verbose=0)
    np.testing.assert_array_equal(first, second)
    result = model.evaluate(np.repeat(x, 10, axis=0), verbose=0, return_dict=True)
    assert np.isfinite(result["loss"]) and "cost" in result


def test_sample_weight_scales_examples():
    model, x = graphs.chain()
    model.compile()
    weights = np.array([1.0, 0.0, 2.0], "float32")
    grads = diagnostics.exact_gradients(model, x, sample_weight=weights)
    parts = [diagnostics.exact_gradients(model, x[i : i + 1]) for i in range(3)]
    for k, g in enumerate(grads):
        expected = (parts[0][k] + 2 * parts[2][k]) / 3
        np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-6)


def test_estimator_dict_and_layer_argument():
    x_in = keras.Input((3,))
    n = keras_bpq.Normal(name="n", estimator="reinforce")(keras.layers.Dense(2)(x_in))
    z = keras_bpq.Bernoulli(name="z")(keras.layers.Dense(1)(n))
    cost = keras.ops.sum(keras.ops.square(z - 0.3) + n, axis=-1)
    model = keras_bpq.BackpropQModel(inputs=x_in, outputs=z, costs={"c": cost})
    model.compile()
    text = model.scg_summary(print_fn=lambda s: None)
    assert "reinforce" in text and "reparam" not in text
    model, _ = graphs.mixed()
    model.compile(estimator={"n": "reinforce"})
    assert model.node_estimators["n"].name == "reinforce"
    assert model.node_estimators["z1"].name == "critic_cv"


class _ActivityPenalty(keras.layers.Layer):
    """Passes its input through, adding `rate * mean(x^2)` with `add_loss`."""

    def __init__(self, rate, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate

    def call(self, x):
        self.add_loss(self.rate * keras.ops.mean(keras.ops.square(x)))
        return x


def _regularized_model(rate):
    """Actor penalties `rate * |W_enc|^2 + rate * mean(pre^2)`; the critic's
    first layer `L2(10 * rate)`."""
    x_in = keras.Input((graphs.INPUT_DIM,))
    regularizer = keras.regularizers.L2(rate) if rate else None
    pre = keras.layers.Dense(2, name="enc", kernel_regularizer=regularizer)(x_in)
    z1 = keras_bpq.Bernoulli(name="z1", seed=3)(_ActivityPenalty(rate, name="penalty")(pre))
    z = keras_bpq.Bernoulli(name="z2", seed=4)(keras.layers.Dense(2, name="mid")(z1))
    cost = keras.ops.sum(keras.ops.square(keras.layers.Dense(2, name="dec")(z) - x_in[:, :2]), axis=-1)
    model = keras_bpq.BackpropQModel(inputs=x_in, outputs=z, costs={"cost": cost})
    model.compile(
        optimizer=keras.optimizers.SGD(1.0), critic_optimizer=keras.optimizers.SGD(0.1), estimator="critic_cv",
        critics={"z1": keras.Sequential([
            keras.layers.Dense(4, name="critic_in", kernel_regularizer=keras.regularizers.L2(10 * rate) if rate else None),
            keras.layers.Dense(1),
        ])},
    )
    model.build_training_state()
    return model


def test_regularization_losses_join_the_actor_loss_and_are_differentiated_directly():
    x = graphs.inputs()
    weights, critic_weights, logs = [], [], []
    for rate in (0.0, 0.1):
        keras.utils.set_random_seed(4)
        model = _regularized_model(rate)
        model(x)
        penalty = model.regularization_loss()
        with tf.GradientTape() as tape:
            model(x)
            regularization = model.regularization_loss()
        kernel, bias = model.get_layer("enc").kernel, model.get_layer("enc").bias
        expected_gradient = tape.gradient(regularization, kernel)
        pre = x @ kernel.numpy() + bias.numpy()
        by_hand = rate * np.sum(kernel.numpy() ** 2) + rate * np.mean(pre**2)
        critic_kernel = model.training_state.critics["z1"].online.get_layer("critic_in").kernel
        critic_before = critic_kernel.numpy()
        logs.append(model.train_on_batch(x, return_dict=True))
        weights.append(kernel.numpy())
        critic_weights.append(critic_kernel.numpy())
    # The actor's penalties only: the critic's L2 is not part of it.
    np.testing.assert_allclose(float(penalty), by_hand, rtol=1e-5)
    # Same seeds, same samples: the two SGD(1.0) updates differ by -grad R.
    np.testing.assert_allclose(weights[1] - weights[0], -expected_gradient.numpy(), rtol=1e-4, atol=1e-6)
    # The critic's own L2(1.0) joins the critic loss: SGD(0.1) adds -0.1 * 2 * W.
    np.testing.assert_allclose(critic_weights[1] - critic_weights[0], -0.2 * critic_before, rtol=1e-4, atol=1e-6)
    # The reported loss is the mean cost plus the penalty, as in keras.Model.
    np.testing.assert_allclose(logs[1]["loss"] - logs[1]["cost"], float(penalty), rtol=1e-4)
    np.testing.assert_allclose(logs[0]["loss"], logs[0]["cost"], rtol=1e-6)


# -- sample weights without targets ------------------------------------------------
def weighted_model():
    """Costs 'fit' (of the inputs only: a deterministic gradient for 'head') and
    'bits' (of the Bernoulli node 'z')."""
    x = keras.Input((3,))
    z = keras_bpq.Bernoulli(name="z", seed=1)(keras.layers.Dense(2, name="enc")(x))
    head = keras.layers.Dense(1, name="head")(x)
    costs = {
        "fit": keras.ops.sum(keras.ops.square(head - 1.0), axis=-1),
        "bits": keras.ops.sum(keras.ops.square(z - 0.3), axis=-1),
    }
    return keras_bpq.BackpropQModel(inputs=x, outputs=z, costs=costs, name="weighted")


def weighted_fit(model, x, w, path):
    """One training step on `x` weighted by `w` (None: unweighted), without targets."""
    if path == "fit":
        model.fit(x, sample_weight=w, batch_size=len(x), shuffle=False, verbose=0)
    elif path == "fit_positional":
        model.fit(x, None, len(x), 1, 0, sample_weight=w, shuffle=False)
    elif path == "train_on_batch":
        model.train_on_batch(x, sample_weight=w)
    elif path == "dataset":
        data = (x, None, w) if w is not None else (x,)
        model.fit(tf.data.Dataset.from_tensor_slices(data).batch(len(x)), verbose=0)


PATHS = ["fit", "fit_positional", "train_on_batch", "dataset"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("estimator", ["reinforce", "critic_cv"])
def test_zero_sample_weights_do_not_train(path, estimator):
    model = weighted_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), estimator=estimator)
    model.build_training_state()
    before = [v.numpy().copy() for v in model.weights]
    weighted_fit(model, graphs.inputs(), np.zeros(3, "float32"), path)
    for variable, value in zip(model.weights, before):
        if variable.path not in ("training_state/steps", "training_state/fit_epoch", "training_state/fit_batch"):
            np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)


@pytest.mark.parametrize("path", PATHS)
def test_sample_weight_two_equals_a_duplicated_example(path):
    """Weights (2, 0, 1) on rows (a, b, c) make the step of the batch (a, a, c):
    every example counts `w_i / batch` in the objective."""
    x = graphs.inputs()
    duplicated = x[[0, 0, 2]]
    weighted, plain = weighted_model(), weighted_model()
    for model in (weighted, plain):
        model.compile(optimizer=keras.optimizers.SGD(0.1), estimator="reinforce")
        model.build_training_state()
    plain.set_weights(weighted.get_weights())
    start = weighted.get_layer("head").kernel.numpy().copy()
    weighted_fit(weighted, x, np.array([2.0, 0.0, 1.0], "float32"), path)
    weighted_fit(plain, duplicated, None, path)
    for name in ("kernel", "bias"):
        got = getattr(weighted.get_layer("head"), name).numpy()
        want = getattr(plain.get_layer("head"), name).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=name)
    assert not np.allclose(start, weighted.get_layer("head").kernel.numpy())


def test_evaluate_and_validation_weigh_examples_without_targets():
    x = graphs.inputs()
    w = np.array([2.0, 0.0, 1.0], "float32")
    model = weighted_model()
    model.compile(optimizer=keras.optimizers.SGD(0.0), estimator="reinforce")
    want = model.evaluate(x[[0, 0, 2]], batch_size=3, verbose=0, return_dict=True)["fit"]
    got = model.evaluate(x, sample_weight=w, batch_size=3, verbose=0, return_dict=True)["fit"]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    history = model.fit(x, validation_data=(x, None, w), batch_size=3, verbose=0)
    np.testing.assert_allclose(history.history["val_fit"][0], want, rtol=1e-5)
    history = model.fit(
        np.concatenate([x, x]), sample_weight=np.concatenate([w, w]), validation_split=0.5,
        batch_size=3, shuffle=False, verbose=0,
    )
    np.testing.assert_allclose(history.history["val_fit"][0], want, rtol=1e-5)
    np.testing.assert_allclose(history.history["fit"][0], want, rtol=1e-5)


def test_a_traced_step_names_its_stages():
    """Every stage of the step has its own name scope (`step.STAGE_SCOPES`), and
    the actor's gradient of the forward stages theirs under `gradient_tape/`,
    which is how benchmarks/profile_step.py attributes a profiled step's time."""
    from keras_bpq import step

    model, x = graphs.two_costs()
    model.compile(optimizer=keras.optimizers.Adam(0.05), estimator="critic_cv")
    model.build_training_state(x)
    graph = tf.function(model.train_step).get_concrete_function(tf.TensorSpec(x.shape, tf.float32)).graph
    scopes = {op.name.split("/")[0].rstrip("0123456789").rstrip("_") for op in graph.get_operations()}
    gradients = {"/".join(op.name.split("/")[:2]) for op in graph.get_operations()
                 if op.name.startswith("gradient_tape/")}
    assert set(step.STAGE_SCOPES) <= scopes, scopes
    assert {"gradient_tape/record", "gradient_tape/estimators"} <= gradients, gradients
