"""Bad input fails early with an error naming the culprit, and never corrupts weights."""

import keras
import numpy as np
import pytest
import tensorflow_probability as tfp

import keras_bpq
from keras_bpq import diagnostics

tfd = tfp.distributions


@keras.saving.register_keras_serializable(package="tests")
def errors_poisson_counts(params):  # a distinctive name: the registry is global
    return tfd.Poisson(log_rate=params)


def bits_model(estimator=None):
    """x -> Dense -> Bernoulli 'bits' -> per-example cost."""
    x = keras.Input((3,))
    z = keras_bpq.Bernoulli(name="bits", seed=1, estimator=estimator)(
        keras.layers.Dense(3, name="enc")(x)
    )
    cost = keras.ops.sum(keras.ops.square(z - x), axis=-1)
    return keras_bpq.BackpropQModel(inputs=x, outputs=z, costs={"cost": cost})


def inputs(rows=4, seed=0):
    return np.random.RandomState(seed).normal(size=(rows, 3)).astype(np.float32)


def snapshot(model):
    return [v.numpy().copy() for v in model.weights]


def assert_unchanged(model, before):
    for variable, value in zip(model.weights, before):
        assert np.all(np.isfinite(variable.numpy())), variable.path
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)


# -- model structure --------------------------------------------------------
def test_model_without_stochastic_node_fails_at_compile():
    x = keras.Input((3,))
    h = keras.layers.Dense(2)(x)
    model = keras_bpq.BackpropQModel(
        inputs=x, outputs=h, costs={"cost": keras.ops.sum(h, axis=-1)}, name="plain"
    )
    with pytest.raises(ValueError, match="'plain' has no stochastic node"):
        model.compile(optimizer="sgd")


@pytest.mark.parametrize(
    "make_cost",
    [
        lambda z, x: keras.ops.mean(z),  # averaged over the batch: a scalar
        lambda z, x: z * x,  # not reduced: [batch, 3]
    ],
    ids=["scalar", "batch_by_3"],
)
def test_cost_that_is_not_per_example_fails_at_compile(make_cost):
    x = keras.Input((3,))
    z = keras_bpq.Bernoulli(name="bits")(keras.layers.Dense(3)(x))
    model = keras_bpq.BackpropQModel(
        inputs=x,
        outputs=z,
        costs={"fine": keras.ops.sum(z, axis=-1), "wrong_cost": make_cost(z, x)},
    )
    with pytest.raises(ValueError, match=r"Cost 'wrong_cost' .*per-example"):
        model.compile(optimizer="sgd")


# -- node parameters --------------------------------------------------------
@pytest.mark.parametrize(
    "make_node, param_shape",
    [
        (lambda: keras_bpq.Bernoulli(name="culprit"), ()),  # rank 1
        (lambda: keras_bpq.Categorical(name="culprit"), ()),  # rank 1
        (lambda: keras_bpq.Categorical(name="culprit"), (1,)),  # one outcome
        (lambda: keras_bpq.Normal(name="culprit"), (3,)),  # odd [loc, raw_scale]
        (lambda: keras_bpq.Normal(name="culprit"), ()),  # rank 1
    ],
    ids=[
        "bernoulli_rank1",
        "categorical_rank1",
        "categorical_one_outcome",
        "normal_odd",
        "normal_rank1",
    ],
)
def test_wrong_parameter_shape_fails_when_building_the_graph(make_node, param_shape):
    with pytest.raises(ValueError, match="'culprit'"):
        make_node()(keras.Input(param_shape))


def test_stochastic_node_without_distribution_fn():
    with pytest.raises(ValueError, match="'culprit' needs a distribution_fn"):
        keras_bpq.StochasticNode(name="culprit")


@pytest.mark.filterwarnings("ignore:Layer 'culprit' .* does not support masking:UserWarning")
def test_categorical_mask_of_wrong_shape_fails_when_building_the_graph():
    logits = keras.Input((3,))
    mask = keras.Input((4,), dtype="bool")
    with pytest.raises(ValueError, match=r"'culprit'.*mask shape \(None, 4\)"):
        keras_bpq.Categorical(name="culprit")(logits, mask=mask)


# -- estimators -------------------------------------------------------------
@pytest.mark.parametrize(
    "node_estimator, compile_estimator, match",
    [
        (None, "bogus", r"Unknown estimator 'bogus' for node 'bits'"),
        ("bogus", "auto", r"Unknown estimator 'bogus' for node 'bits'"),
        (None, "reparam", r"'reparam' cannot serve node 'bits'"),
        ("reparam", "auto", r"'reparam' cannot serve node 'bits'"),
        (None, {"bits": "reparam"}, r"'reparam' cannot serve node 'bits'"),
        (None, {"bits": "reinforce", "nope": "reinforce"}, r"unknown nodes \['nope'\]"),
    ],
    ids=[
        "unknown_name",
        "unknown_node_arg",
        "reparam",
        "reparam_node_arg",
        "reparam_dict",
        "dict_unknown_node",
    ],
)
def test_bad_estimator_fails_at_compile_naming_the_node(node_estimator, compile_estimator, match):
    model = bits_model(estimator=node_estimator)
    with pytest.raises(ValueError, match=match):
        model.compile(optimizer="sgd", estimator=compile_estimator)


def test_failed_compile_leaves_the_model_usable():
    model = bits_model()
    with pytest.raises(ValueError, match="'bits'"):
        model.compile(optimizer="sgd", estimator="reparam")
    model.compile(optimizer=keras.optimizers.SGD(0.1), estimator="reinforce")
    before = snapshot(model)
    model.train_on_batch(inputs())
    after = snapshot(model)
    assert all(np.all(np.isfinite(v)) for v in after)
    assert not np.array_equal(before[0], after[0]), "the encoder did not train"


# -- non-finite costs -------------------------------------------------------
def log_model():
    """Cost 'log_cost' = -log(x0 * (1 + sum z)): NaN or inf wherever x0 <= 0.

    The bad cost depends on the sample, so the REINFORCE surrogate (and hence
    the encoder's gradient) is NaN too: an unguarded update would corrupt it.
    """
    x = keras.Input((3,))
    z = keras_bpq.Bernoulli(name="bits", seed=1)(keras.layers.Dense(2, name="enc")(x))
    h = keras.layers.Dense(3, name="dec")(z)
    recon = keras.ops.sum(keras.ops.square(h - x), axis=-1)
    bad = -keras.ops.log(x[:, 0] * (1.0 + keras.ops.sum(z, axis=-1)))
    return keras_bpq.BackpropQModel(
        inputs=x, outputs=h, costs={"recon": recon, "log_cost": bad}, name="logm"
    )


def good_inputs(rows=8):
    return np.abs(inputs(rows, seed=1)) + 0.5


def bad_inputs(rows=4):
    x = good_inputs(rows)
    x[0, 0] = -1.0  # NaN
    x[1, 0] = 0.0  # inf
    return x


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_non_finite_cost_stops_training_without_touching_weights(jit_compile):
    model = log_model()
    # reinforce: the guard is under test, not the estimator chosen by "auto".
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), estimator="reinforce", jit_compile=jit_compile
    )
    before = snapshot(model)
    message = r"'logm': cost 'log_cost' was not finite"

    # fit: the very first batch is non-finite, so no update may happen at all.
    with pytest.raises(FloatingPointError, match=message):
        model.fit(bad_inputs(), batch_size=4, epochs=3, verbose=0)
    assert_unchanged(model, before)
    assert int(model.optimizer.iterations.numpy()) == 0

    with pytest.raises(FloatingPointError, match=message):
        model.train_on_batch(bad_inputs())
    assert_unchanged(model, before)
    assert int(model.optimizer.iterations.numpy()) == 0

    # Training on good data afterwards works normally.
    model.fit(good_inputs(), batch_size=4, epochs=2, verbose=0)
    after = snapshot(model)
    assert all(np.all(np.isfinite(v)) for v in after)
    for variable, old, new in zip(model.weights, before, after):
        if variable.trainable:
            assert not np.array_equal(old, new), f"{variable.path} did not train"
    assert int(model.optimizer.iterations.numpy()) == 4
    model.train_on_batch(good_inputs(4))


def test_non_finite_gradient_with_finite_costs_stops_training():
    """The norm of h * x0 is 0 (finite) at x0 = 0, but its gradient is 0/0."""
    x = keras.Input((3,))
    z = keras_bpq.Bernoulli(name="bits", seed=1)(keras.layers.Dense(2, name="enc")(x))
    h = keras.layers.Dense(3, name="dec")(z)
    norm = keras.ops.sqrt(keras.ops.sum(keras.ops.square(h * x[:, :1]), axis=-1))
    model = keras_bpq.BackpropQModel(inputs=x, outputs=h, costs={"norm": norm}, name="normm")
    model.compile(optimizer=keras.optimizers.SGD(0.1), estimator="reinforce")
    before = snapshot(model)
    x_zero = good_inputs(4)
    x_zero[:, 0] = 0.0
    with pytest.raises(FloatingPointError, match="'normm': the gradient was not finite"):
        model.fit(x_zero, batch_size=4, epochs=1, verbose=0)
    assert_unchanged(model, before)


# -- diagnostics ------------------------------------------------------------
def test_exact_gradients_refuses_non_enumerable_node():
    x = keras.Input((3,))
    counts = keras_bpq.StochasticNode(errors_poisson_counts, name="counts", seed=1)(
        keras.layers.Dense(2)(x)
    )
    cost = keras.ops.sum(keras.ops.square(counts - 1.0), axis=-1)
    model = keras_bpq.BackpropQModel(inputs=x, outputs=counts, costs={"cost": cost})
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="exact_gradients cannot handle node 'counts'"):
        diagnostics.exact_gradients(model, inputs())
