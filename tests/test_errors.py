"""Bad input fails early with an error naming the culprit, and never corrupts weights."""

import os
import re
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from test_distribute import run as run_distributed

import keras_bpq
from keras_bpq import diagnostics
from keras_bpq import distribute

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


# -- cost names ---------------------------------------------------------------
def named_costs_model(costs, subclassed_cost=None, name="named"):
    """x -> Dense -> Bernoulli 'bits' -> Dense 'out'; `costs(z, x, out)` gives
    the constructor's costs, or `subclassed_cost` (a name) is added with
    `keras_bpq.add_cost` from a layer inside the network."""
    x = keras.Input((3,))
    z = keras_bpq.Bernoulli(name="bits", seed=1)(keras.layers.Dense(2, name="enc")(x))
    out = keras.layers.Dense(3, name="out")(z)
    if subclassed_cost is not None:
        out = _AddCost(subclassed_cost)(out)
    return keras_bpq.BackpropQModel(inputs=x, outputs=out, costs=costs(z, x, out), name=name)


class _AddCost(keras.layers.Layer):
    """Passes its input through, adding `sum(x^2)` as cost `cost_name`."""

    def __init__(self, cost_name, **kwargs):
        super().__init__(**kwargs)
        self.cost_name = cost_name

    def call(self, x):
        keras_bpq.add_cost(self.cost_name, keras.ops.sum(keras.ops.square(x), axis=-1))
        return x


def _sum(t):
    return keras.ops.sum(t, axis=-1)


@pytest.mark.parametrize(
    "name, match",
    [
        ("loss", r"Cost 'loss' \(costs= of the constructor\): 'loss' is reserved for the total objective"),
        ("val_recon", r"Cost 'val_recon' .*'val_' are reserved"),
    ],
    ids=["loss", "val_prefix"],
)
def test_reserved_cost_name_fails_at_construction(name, match):
    with pytest.raises(ValueError, match=match):
        named_costs_model(lambda z, x, out: {name: _sum(z), "other": _sum(out)})


@pytest.mark.parametrize(
    "costs, loss, match",
    [
        # A cost named as a compiled loss would replace (or be replaced by) it.
        ({"output_loss": _sum}, "mse", r"Cost 'output_loss' \(costs= of the constructor\) has the name that compile\(loss=...\)"),
        # A node's critic metrics.
        ({"bits_q": _sum}, None, r"Cost 'bits_q' .* a metric of node 'bits' \(its critic's q\)"),
        ({"bits_critic_loss": _sum}, None, r"Cost 'bits_critic_loss' .* metric of node 'bits'"),
        ({"bits_td_error": _sum}, None, r"Cost 'bits_td_error' .* metric of node 'bits'"),
    ],
    ids=["compiled_loss", "node_q", "node_critic_loss", "node_td_error"],
)
def test_cost_name_taken_by_another_term_fails_at_compile(costs, loss, match):
    model = named_costs_model(lambda z, x, out: {k: f(out) for k, f in costs.items()})
    with pytest.raises(ValueError, match=match):
        model.compile(optimizer="sgd", loss=loss)
    if loss is not None:  # the model stays usable once the clash is gone
        model.compile(optimizer="sgd")
        model.train_on_batch(inputs())


@pytest.mark.parametrize(
    "layer_cost, constructor_costs, loss, match",
    [
        ("loss", {"recon": _sum}, None, r"Cost 'loss' \(keras_bpq.add_cost\): 'loss' is reserved"),
        ("val_x", {"recon": _sum}, None, r"Cost 'val_x' \(keras_bpq.add_cost\)"),
        ("output_loss", {"recon": _sum}, "mse", r"Cost 'output_loss' \(keras_bpq.add_cost\) has the name that compile"),
        ("bits_q", {"recon": _sum}, None, r"Cost 'bits_q' \(keras_bpq.add_cost\) .*node 'bits'"),
        # The same name from add_cost and from the constructor's costs=.
        ("recon", {"recon": _sum}, None,
         r"Cost 'recon' was added twice .*by keras_bpq.add_cost and by costs= of the constructor"),
    ],
    ids=["loss", "val_prefix", "compiled_loss", "node_metric", "duplicate"],
)
def test_add_cost_name_taken_by_another_term_fails_at_compile(layer_cost, constructor_costs, loss, match):
    model = named_costs_model(
        lambda z, x, out: {k: f(out) for k, f in constructor_costs.items()}, subclassed_cost=layer_cost
    )
    with pytest.raises(ValueError, match=match):
        model.compile(optimizer="sgd", loss=loss)


def test_compiled_loss_named_like_a_node_metric_fails_at_compile():
    x = keras.Input((3,))
    z = keras_bpq.Bernoulli(name="bits", seed=1)(keras.layers.Dense(2)(x))
    out = {"bits_critic": keras.layers.Dense(3)(z)}
    model = keras_bpq.BackpropQModel(inputs=x, outputs=out, costs={"c": _sum(z)})
    with pytest.raises(ValueError, match=r"'bits_critic_loss', the name of a metric of node 'bits'"):
        model.compile(optimizer="sgd", loss={"bits_critic": "mse"})


def test_cost_named_like_a_compiled_metric_fails_before_training():
    model = named_costs_model(lambda z, x, out: {"mae": _sum(out)}, name="metricm")
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'metricm' logs two values under the name 'mae'"):
        model.fit(inputs(), inputs(), verbose=0)
    assert_unchanged(model, before)


def test_history_loss_is_the_total_objective():
    """`loss` is the batch mean of every cost (compiled ones too), each logged
    apart: in `evaluate`'s logs and in `fit`'s History, epoch by epoch."""
    model = named_costs_model(lambda z, x, out: {"recon": _sum(keras.ops.square(out - x)), "bits_used": _sum(z)})
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x = inputs(8)
    result = model.evaluate(x, x, batch_size=8, verbose=0, return_dict=True)
    assert {"recon", "bits_used", "output_loss"} <= set(result)
    total = result["recon"] + result["bits_used"] + result["output_loss"]
    np.testing.assert_allclose(result["loss"], total, rtol=1e-5)
    history = model.fit(x, x, batch_size=8, epochs=3, verbose=0).history
    assert {"recon", "bits_used", "output_loss"} <= set(history)
    total = np.add(np.add(history["recon"], history["bits_used"]), history["output_loss"])
    np.testing.assert_allclose(history["loss"], total, rtol=1e-5)


def test_cost_named_like_the_compiled_loss_of_a_dict_output_fails_at_compile():
    """With `compile(loss={key: ...})` on a model of dict outputs, the loss of
    output `key` is logged as `<key>_loss`: a cost of that name is refused,
    naming it; a compiled loss on the other output only leaves it alone."""

    def model():
        x = keras.Input((3,))
        z = keras_bpq.Bernoulli(name="bits", seed=1)(keras.layers.Dense(2, name="enc")(x))
        out = {"recon": keras.layers.Dense(3, name="recon")(z), "aux": keras.layers.Dense(3, name="aux")(z)}
        return keras_bpq.BackpropQModel(inputs=x, outputs=out, costs={"recon_loss": _sum(z)}, name="dictm")

    clashing = model()
    with pytest.raises(ValueError, match=r"Cost 'recon_loss' \(costs= of the constructor\) has the name that compile\(loss=...\) gives the loss of an output.* 'recon_loss_cost'"):
        clashing.compile(optimizer="sgd", loss={"recon": "mse", "aux": "mse"})
    apart = model()
    apart.compile(optimizer=keras.optimizers.SGD(0.0), loss={"aux": "mse"})
    x = inputs(8)
    logs = apart.evaluate(x, {"aux": x}, batch_size=8, verbose=0, return_dict=True)
    assert {"recon_loss", "aux_loss"} <= set(logs)
    np.testing.assert_allclose(logs["loss"], logs["recon_loss"] + logs["aux_loss"], rtol=1e-5)


# -- nothing non-finite is ever written -------------------------------------------
def huge_model(scale):
    """'huge' = scale * |dec(z) - x|^2: finite, but its gradients' squares are not."""
    x = keras.Input((3,))
    z = keras_bpq.Bernoulli(name="bits", seed=1)(keras.layers.Dense(2, name="enc")(x))
    h = keras.layers.Dense(3, name="dec")(z)
    cost = scale * keras.ops.sum(keras.ops.square(h - x), axis=-1)
    return keras_bpq.BackpropQModel(inputs=x, outputs=h, costs={"huge": cost}, name="hugem")


def everything(model):
    """Every variable a step may write: weights, critics, target copies,
    estimator state and both optimizers' variables."""
    variables = list(model.weights) + list(model.optimizer.variables)
    if model.critic_optimizer is not None:
        variables += list(model.critic_optimizer.variables)
    return variables


@pytest.mark.parametrize(
    "scale, estimator, jit_compile, steps_per_execution",
    [
        (1e20, "reinforce", False, 1),
        (1e30, "reinforce", True, 1),
        (1e25, "critic_cv", False, 2),
        (1e30, "critic_cv", True, 2),
    ],
    ids=["1e20_reinforce_graph", "1e30_reinforce_xla", "1e25_critic_cv_spe2", "1e30_critic_cv_xla_spe2"],
)
def test_huge_finite_cost_never_leaves_a_non_finite_value(scale, estimator, jit_compile, steps_per_execution):
    model = huge_model(scale)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01), estimator=estimator, jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    model.build_training_state()
    before = [v.numpy().copy() for v in everything(model)]
    message = r"'hugem': the update would have written a non-finite value \(NaN or inf\) into .* although every cost was finite"
    with pytest.raises(FloatingPointError, match=message):
        model.fit(inputs(8), batch_size=4, epochs=2, verbose=0)
    with pytest.raises(FloatingPointError, match=message):
        model.train_on_batch(inputs(4))
    # Every step was undone whole, optimizer iterations and slots included.
    for variable, value in zip(everything(model), before):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)
    # The checkpoint guard agrees: nothing non-finite to refuse.
    model.save_weights(os.path.join(tempfile.mkdtemp(), "huge.weights.h5"))


def huge_chain(scale):
    """z1 -> z2 -> 'huge' = scale * |dec(z2) - x|^2: z1's learned critic (with
    its target copy and the critic optimizer's slots) regresses on huge targets."""
    x = keras.Input((3,))
    z1 = keras_bpq.Bernoulli(name="z1", seed=1)(keras.layers.Dense(2, name="enc1")(x))
    z2 = keras_bpq.Bernoulli(name="z2", seed=2)(keras.layers.Dense(2, name="enc2")(z1))
    h = keras.layers.Dense(3, name="dec")(z2)
    cost = scale * keras.ops.sum(keras.ops.square(h - x), axis=-1)
    return keras_bpq.BackpropQModel(inputs=x, outputs=h, costs={"huge": cost}, name="hugem")


def assert_skip_is_true(model, x, error):
    """The `FloatingPointError` of an undone step says what happened: every
    cost was finite (as it is on `x`), and the variable it names has the role
    it gives it."""
    found = re.search(
        r"'hugem': the update would have written a non-finite value \(NaN or inf\) into (?P<role>.+?) "
        r"'(?P<path>[^']+)', although every cost was finite", str(error),
    )
    assert found, str(error)
    costs = model.run_forward(tf.constant(x), training=True).costs
    assert all(np.all(np.isfinite(c.numpy())) for c in costs.values())
    roles = {
        "weight": model.actor_variables,
        "critic weight": model.critic_variables,
        "critic target copy": model.training_state.non_trainable_weights,
        "actor optimizer variable": model.optimizer.variables,
        "critic optimizer variable": model.critic_optimizer.variables,
    }
    assert found["role"] in roles, str(error)
    assert found["path"] in [v.path for v in roles[found["role"]]], str(error)


@pytest.mark.parametrize("jit_compile, steps_per_execution", [(False, 1), (True, 2)], ids=["graph", "xla_spe2"])
@pytest.mark.parametrize("scale", [1e20, 1e30])
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_huge_finite_cost_under_mixed_precision_never_leaves_a_non_finite_value(
    policy, scale, jit_compile, steps_per_execution, tmp_path
):
    """`test_huge_finite_cost_never_leaves_a_non_finite_value` under the 16-bit
    policies, with a learned critic: every step is undone whole (weights,
    critics, target copies, both optimizers' slots, the loss scale, estimator
    state), and the error says truly what it would have written."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = huge_chain(scale)
        model.compile(
            optimizer=keras.optimizers.Adam(0.01), estimator="critic_cv", critic_hidden_units=(8,),
            jit_compile=jit_compile, steps_per_execution=steps_per_execution,
        )
    finally:
        keras.mixed_precision.set_global_policy(previous)
    model.build_training_state()
    assert model.critic_variables and model.critic_optimizer.variables
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (policy == "mixed_float16")
    before = [v.numpy().copy() for v in everything(model)]
    x = inputs(8)
    with pytest.raises(FloatingPointError) as error:
        model.fit(x, batch_size=4, epochs=2, shuffle=False, verbose=0)
    assert_skip_is_true(model, x[:4], error.value)
    with pytest.raises(FloatingPointError) as error:
        model.train_on_batch(x[:4])
    assert_skip_is_true(model, x[:4], error.value)
    for variable, value in zip(everything(model), before):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)
    model.save_weights(tmp_path / "huge.weights.h5")  # nothing non-finite to refuse


def test_undone_step_names_the_optimizer_slot_that_overflowed():
    model = huge_model(1e30)
    model.compile(optimizer=keras.optimizers.Adam(0.01), estimator="reinforce")
    with pytest.raises(FloatingPointError, match=r"into actor optimizer variable 'adam\w*/enc_kernel_velocity'"):
        model.train_on_batch(inputs(4))


def test_critic_overflow_is_undone_and_named():
    """z1 -> z2 -> 'huge' (1e30 scale): z1's learned critic regresses on targets
    of 1e30, whose squared gradients overflow its Adam slots."""
    x = keras.Input((3,))
    z1 = keras_bpq.Bernoulli(name="z1", seed=1)(keras.layers.Dense(2, name="enc1")(x))
    z2 = keras_bpq.Bernoulli(name="z2", seed=2)(keras.layers.Dense(2, name="enc2")(z1))
    h = keras.layers.Dense(3, name="dec")(z2)
    cost = 1e30 * keras.ops.sum(keras.ops.square(h - x), axis=-1)
    model = keras_bpq.BackpropQModel(inputs=x, outputs=h, costs={"huge": cost}, name="criticm")
    # The actor does not move (its update is finite anyway): the critic's is under test.
    model.compile(optimizer=keras.optimizers.SGD(0.0), estimator="critic_cv")
    model.build_training_state()
    assert model.critic_variables
    before = [v.numpy().copy() for v in everything(model)]
    with pytest.raises(FloatingPointError, match=r"'criticm': the update would have written .* into critic"):
        model.train_on_batch(inputs(4))
    for variable, value in zip(everything(model), before):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)


def test_distributed_step_never_leaves_a_non_finite_value():
    result = run_distributed(
        """
        import keras_bpq
        with strategy.scope():
            x_in = keras.Input((3,))
            z = keras_bpq.Bernoulli(name="bits", seed=1)(keras.layers.Dense(2, name="enc")(x_in))
            h = keras.layers.Dense(3, name="dec")(z)
            cost = 1e30 * keras.ops.sum(keras.ops.square(h - x_in), axis=-1)
            model = keras_bpq.BackpropQModel(inputs=x_in, outputs=h, costs={"huge": cost})
            model.compile(optimizer=keras.optimizers.Adam(0.01), steps_per_execution=2)
        model.build_training_state()
        variables = list(model.weights) + list(model.optimizer.variables) + list(model.critic_optimizer.variables)
        before = [v.numpy().copy() for v in variables]
        try:
            model.fit(np.ones((8, 3), "float32"), batch_size=4, epochs=1, verbose=0)
            message = ""
        except FloatingPointError as error:
            message = str(error)
        changed = [v.path for v, b in zip(variables, before) if not np.array_equal(v.numpy(), b)]
        print(json.dumps({"message": message, "changed": changed}))
        """
    )
    assert "would have written a non-finite value" in result["message"], result
    assert result["changed"] == [], result


@pytest.mark.parametrize("jit", [False, True])
def test_all_finite_finds_every_nonfinite_value(jit):
    """The write guard's check (`distribute.all_finite`, and `finite` on the
    step's gradients): any NaN or inf in any floating variable or tensor, of
    any shape, is found, under XLA too; huge finite values and integer
    variables are not flagged."""
    variables = [
        keras.Variable(np.full((784, 200), 3e38, np.float32)),
        keras.Variable(np.ones((7,), np.float32)),
        keras.Variable(np.float32(1.0)),
        keras.Variable(np.ones((2, 3, 4)) * 1e300, dtype="float64"),
        keras.Variable(np.ones((0, 3), np.float32)),
        keras.Variable(2**62, dtype="int64"),
    ]
    check = tf.function(lambda: distribute.all_finite(variables), jit_compile=jit)
    assert bool(check())
    values = tf.function(lambda: distribute.finite([tf.identity(v.value) for v in variables]), jit_compile=jit)
    assert bool(values())
    for index in range(4):
        for bad in (np.nan, np.inf, -np.inf):
            v = variables[index]
            original = keras.ops.convert_to_numpy(v)
            flat = original.reshape(-1).copy()
            flat[len(flat) // 2] = bad
            v.assign(flat.reshape(original.shape))
            assert not bool(check()), (index, bad)
            assert not bool(values()), (index, bad)
            v.assign(original)
    assert bool(check())
