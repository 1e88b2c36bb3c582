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
from keras_bpq import _keras_compat
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


@pytest.mark.parametrize(
    "policy, scale, jit_compile, steps_per_execution",
    [
        # Every pair of (policy, cost scale, compile mode) appears once: half
        # of the 2 x 2 x 2 cross product, none of whose factors depends on
        # another (the claim is per policy; the scale and the compile mode
        # vary it).
        ("mixed_float16", 1e20, False, 1),
        ("mixed_float16", 1e30, True, 2),
        ("mixed_bfloat16", 1e20, True, 2),
        ("mixed_bfloat16", 1e30, False, 1),
    ],
    ids=[
        "mixed_float16-1e20-graph",
        "mixed_float16-1e30-xla_spe2",
        "mixed_bfloat16-1e20-xla_spe2",
        "mixed_bfloat16-1e30-graph",
    ],
)
def test_huge_finite_cost_under_mixed_precision_never_leaves_a_non_finite_value(
    policy, scale, jit_compile, steps_per_execution, tmp_path
):
    """`test_huge_finite_cost_never_leaves_a_non_finite_value` under the 16-bit
    policies, with a learned critic. Under mixed_bfloat16 every step is undone
    whole (weights, critics, target copies, both optimizers' slots, estimator
    state), and the error says truly what it would have written. Under
    mixed_float16 the actor's scaled gradient overflows first: every step is
    skipped whole but for the LossScaleOptimizer halving its loss scale, and
    at a scale of 1 (the 16th step) the error says so. Each policy runs with
    each cost scale and each compile mode (graph, XLA with two steps per
    execution), each scale under both compile modes."""
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
    loss_scaled = policy == "mixed_float16"
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == loss_scaled
    loss_scale = _keras_compat.loss_scale(model.optimizer) if loss_scaled else None
    assert_true = assert_overflow_is_true if loss_scaled else assert_skip_is_true
    before = [v.numpy().copy() for v in everything(model)]
    x = inputs(8)
    with pytest.raises(FloatingPointError) as error:
        model.fit(x, batch_size=4, epochs=20 if loss_scaled else 2, shuffle=False, verbose=0)
    assert_true(model, x[:4], error.value)
    with pytest.raises(FloatingPointError) as error:
        model.train_on_batch(x[:4])
    assert_true(model, x[:4], error.value)
    assert int(model.training_state.steps.numpy()) == 0
    for variable, value in zip(everything(model), before):
        if variable is loss_scale:
            assert float(variable.numpy()) == 1.0  # 2**15 halved by the 15 steps skipped before
            continue
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)
    model.save_weights(tmp_path / "huge.weights.h5")  # nothing non-finite to refuse


def assert_overflow_is_true(model, x, error):
    """The `FloatingPointError` of a step that overflowed the LossScaleOptimizer
    at a loss scale of at most 1 says what happened: every cost was finite (as
    it is on `x`), the scale is at most 1 now, and the largest cost's magnitude
    is that of the costs on `x` (within a decade: the samples differ)."""
    found = re.search(
        r"'hugem': the actor's gradient was not finite in a training step at a loss scale of at most 1 "
        r"\(now (?P<scale>[^)]+)\), although every cost was finite.* The largest cost, 'huge', is of order "
        r"1e(?P<exponent>-?\d+) in an example of the step's batch\. Nothing that step would have written was "
        r"kept, its loss scale included.* Scale the costs down .* or train under the float32 or mixed_bfloat16 "
        r"policy",
        str(error),
    )
    assert found, str(error)
    costs = model.run_forward(tf.constant(x), training=True).costs
    assert all(np.all(np.isfinite(c.numpy())) for c in costs.values())
    largest = max(float(np.abs(c.numpy()).max()) for c in costs.values())
    assert abs(int(found["exponent"]) - np.floor(np.log10(largest))) <= 1, (str(error), largest)
    scale = float(keras.ops.convert_to_numpy(_keras_compat.loss_scale(model.optimizer)))
    assert float(found["scale"]) == scale <= 1.0, str(error)


LOSS_SCALE_ERROR = (
    r"'hugem': the actor's gradient was not finite in a training step at a loss scale of at most 1 "
    r"\(now 1\), although every cost was finite.* The largest cost, 'huge', is of order 1e(?P<exponent>\d+) "
)


def loss_scale_state(model):
    """The variables a `LossScaleOptimizer` changes on a step whose update it
    skips: its loss scale and its count of finite steps."""
    return {id(model.optimizer.dynamic_scale), id(model.optimizer.step_counter)}


@pytest.mark.parametrize(
    "scale, estimator, jit_compile, steps_per_execution",
    [
        (1e20, "reinforce", False, 1),
        (1e30, "auto", True, 2),
        (1e25, "reinforce", True, 1),
        (1e6, "critic_cv", False, 2),
    ],
    ids=["1e20_reinforce_graph", "1e30_auto_xla_spe2", "1e25_reinforce_xla", "1e6_critic_cv_graph_spe2"],
)
def test_loss_scale_optimizer_skipping_every_update_stops_fit(scale, estimator, jit_compile, steps_per_execution):
    """Under mixed_float16 a huge but finite cost overflows the actor's float16
    gradient at every loss scale the LossScaleOptimizer tries. Each such step
    is skipped whole: only the loss scale falls (halved per step); weights,
    estimator state, the step counter, critics, target copies and both
    optimizers' other variables (and, with `replay=`, the replay buffer) stay
    as they were. Once it overflows at a scale of 1, `fit` stops with a
    FloatingPointError naming the cost and its magnitude, and keeps nothing of
    that step (the scale stays 1)."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = huge_chain(scale) if estimator == "critic_cv" else huge_model(scale)
        model.compile(
            optimizer=keras.optimizers.Adam(0.01), estimator=estimator, critic_hidden_units=(8,),
            jit_compile=jit_compile, steps_per_execution=steps_per_execution,
            replay=keras_bpq.Replay(8) if estimator == "critic_cv" else None,
        )
    finally:
        keras.mixed_precision.set_global_policy(previous)
    model.build_training_state()
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    if estimator == "critic_cv":
        assert model.critic_variables and model.critic_optimizer.variables
        assert any("replay" in v.path for v in model.weights), [v.path for v in model.weights]
    model.optimizer.build(model.actor_variables)
    initial = float(model.optimizer.initial_scale)
    scale_state = loss_scale_state(model)
    kept = [v for v in everything(model) if id(v) not in scale_state]
    before = [v.numpy().copy() for v in kept]
    x = inputs(8)
    with pytest.raises(FloatingPointError, match=LOSS_SCALE_ERROR) as error:
        model.fit(x, batch_size=4, epochs=int(np.log2(initial)) + 2, shuffle=False, verbose=0)
    exponent = int(re.search(LOSS_SCALE_ERROR, str(error.value))["exponent"])
    assert abs(exponent - np.log10(scale)) <= 3, str(error.value)
    assert "Scale the costs down" in str(error.value) and "mixed_bfloat16" in str(error.value)
    # The scale fell from its initial value to 1, and nothing else moved.
    assert float(model.optimizer.dynamic_scale.numpy()) == 1.0
    for variable, value in zip(kept, before):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)
    assert int(model.training_state.steps.numpy()) == 0
    # The next step overflows at a scale of 1 too: the same error, nothing kept.
    with pytest.raises(FloatingPointError, match=LOSS_SCALE_ERROR):
        model.train_on_batch(x[:4])
    assert float(model.optimizer.dynamic_scale.numpy()) == 1.0
    for variable, value in zip(kept, before):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)


@pytest.mark.parametrize("jit_compile, steps_per_execution", [(False, 1), (True, 2)], ids=["graph", "xla_spe2"])
def test_mixed_float16_training_through_early_overflows_keeps_its_steps_whole(jit_compile, steps_per_execution):
    """A cost whose float16 gradient overflows at the initial loss scale but
    not at a lower one: the LossScaleOptimizer halves its scale on each
    overflowing step and then trains, without an error. Every step it skipped
    was skipped whole, so the package's step counter (advanced by every step
    that stands) equals the actor optimizer's iterations, the steps run less
    one per halving of the scale."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = huge_model(100.0)
        model.compile(
            optimizer=keras.optimizers.Adam(0.01), estimator="reinforce",
            jit_compile=jit_compile, steps_per_execution=steps_per_execution,
        )
    finally:
        keras.mixed_precision.set_global_policy(previous)
    model.build_training_state()
    model.optimizer.build(model.actor_variables)
    initial = float(model.optimizer.initial_scale)
    weights = snapshot(model)
    epochs, batches = 10, 2
    history = model.fit(inputs(8), batch_size=4, epochs=epochs, shuffle=False, verbose=0)
    scale = float(model.optimizer.dynamic_scale.numpy())
    assert 1.0 < scale < initial, "the initial scale was expected to overflow, and a lower one not to"
    # The scale only fell: it doubles after dynamic_growth_steps finite steps in a row.
    assert epochs * batches < model.optimizer.dynamic_growth_steps
    skipped = int(round(np.log2(initial / scale)))
    steps = int(model.training_state.steps.numpy())
    assert steps == int(model.optimizer.iterations.numpy()) == epochs * batches - skipped
    assert any(not np.array_equal(a, b) for a, b in zip(snapshot(model), weights))
    assert all(np.isfinite(history.history["loss"]))
    for variable in everything(model):
        value = variable.numpy()
        if value.dtype.kind == "f":
            assert np.all(np.isfinite(value)), variable.path


@pytest.mark.parametrize(
    "policy, scale, estimator, jit_compile, steps_per_execution",
    [
        ("mixed_bfloat16", 1e20, "reinforce", False, 1),
        ("mixed_bfloat16", 1e30, "auto", True, 2),
        ("float32", 1e30, "auto", False, 2),
    ],
    ids=["bf16_1e20_reinforce_graph", "bf16_1e30_auto_xla_spe2", "f32_1e30_auto_graph_spe2"],
)
def test_huge_finite_cost_without_loss_scaling_is_undone_and_named(
    policy, scale, estimator, jit_compile, steps_per_execution
):
    """The one-node models of `test_loss_scale_optimizer_skipping_every_update_stops_fit`
    under the policies without a LossScaleOptimizer: the first step's update
    would overflow Adam's slots, is undone whole, and `fit` says so."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = huge_model(scale)
        model.compile(
            optimizer=keras.optimizers.Adam(0.01), estimator=estimator, jit_compile=jit_compile,
            steps_per_execution=steps_per_execution,
        )
    finally:
        keras.mixed_precision.set_global_policy(previous)
    model.build_training_state()
    assert not isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    before = [v.numpy().copy() for v in everything(model)]
    x = inputs(8)
    with pytest.raises(FloatingPointError) as error:
        model.fit(x, batch_size=4, epochs=2, shuffle=False, verbose=0)
    assert_skip_is_true(model, x[:4], error.value)
    for variable, value in zip(everything(model), before):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)


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


def test_distributed_steps_the_loss_scale_optimizer_skips_are_skipped_whole():
    """`test_loss_scale_optimizer_skipping_every_update_stops_fit` under
    `tf.distribute`: every replica skips the steps whose gradient overflowed,
    only the loss scale falls (to 1), and `fit` then raises."""
    result = run_distributed(
        """
        import keras_bpq
        keras.mixed_precision.set_global_policy("mixed_float16")
        with strategy.scope():
            x_in = keras.Input((3,))
            z = keras_bpq.Bernoulli(name="bits", seed=1)(keras.layers.Dense(2, name="enc")(x_in))
            h = keras.layers.Dense(3, name="dec")(z)
            cost = 1e20 * keras.ops.sum(keras.ops.square(h - x_in), axis=-1)
            model = keras_bpq.BackpropQModel(inputs=x_in, outputs=h, costs={"huge": cost})
            model.compile(optimizer=keras.optimizers.Adam(0.01), estimator="reinforce", steps_per_execution=2)
        keras.mixed_precision.set_global_policy("float32")
        model.build_training_state()
        model.optimizer.build(model.actor_variables)
        variables = list(model.weights) + list(model.optimizer.variables)
        before = [v.numpy().copy() for v in variables]
        try:
            model.fit(np.ones((8, 3), "float32"), batch_size=4, epochs=20, verbose=0)
            message = ""
        except FloatingPointError as error:
            message = str(error)
        changed = [v.path for v, b in zip(variables, before) if not np.array_equal(v.numpy(), b)]
        scale = float(model.optimizer.dynamic_scale.numpy())
        print(json.dumps({"message": message, "changed": changed, "scale": scale,
                          "scale_path": model.optimizer.dynamic_scale.path}))
        """
    )
    assert "the actor's gradient was not finite in a training step at a loss scale of at most 1" in result["message"], result
    assert result["scale"] == 1.0, result
    assert result["changed"] == [result["scale_path"]], result


@pytest.mark.parametrize("jit", [False, True])
def test_all_finite_finds_every_nonfinite_value(jit):
    """The write guard's check (`distribute.all_finite` and `first_nonfinite`
    of the variables' `variable_products`, and `finite` on the step's
    gradients): any NaN or inf in any floating variable or tensor, of any
    shape, is found and the first such variable named, under XLA too; huge
    finite values and integer variables are not flagged."""
    variables = [
        keras.Variable(np.full((784, 200), 3e38, np.float32)),
        keras.Variable(np.ones((7,), np.float32)),
        keras.Variable(np.float32(1.0)),
        keras.Variable(np.ones((2, 3, 4)) * 1e300, dtype="float64"),
        keras.Variable(np.ones((0, 3), np.float32)),
        keras.Variable(2**62, dtype="int64"),
        keras.Variable(np.ones((5, 200), np.float16)),
    ]

    def guard():
        products = distribute.variable_products(variables)
        return distribute.all_finite(products), distribute.first_nonfinite(products)

    check = tf.function(guard, jit_compile=jit)
    assert [int(v) for v in check()] == [1, -1]
    values = tf.function(lambda: distribute.finite([tf.identity(v.value) for v in variables]), jit_compile=jit)
    assert bool(values())
    for index in (0, 1, 2, 3, 6):
        for bad in (np.nan, np.inf, -np.inf):
            v = variables[index]
            original = keras.ops.convert_to_numpy(v)
            flat = original.reshape(-1).copy()
            flat[len(flat) // 2] = bad
            v.assign(flat.reshape(original.shape))
            assert [int(x) for x in check()] == [0, index], (index, bad)
            assert not bool(values()), (index, bad)
            if index:  # the first non-finite variable is named, not a later one
                variables[0].assign(np.full((784, 200), np.nan, np.float32))
                assert int(check()[1]) == 0, (index, bad)
                variables[0].assign(np.full((784, 200), 3e38, np.float32))
            v.assign(original)
    assert [int(v) for v in check()] == [1, -1]
    nothing = distribute.variable_products([])
    assert bool(distribute.all_finite(nothing)) and int(distribute.first_nonfinite(nothing)) == -1
