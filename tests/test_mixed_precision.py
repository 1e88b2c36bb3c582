"""Mixed precision: keras.mixed_precision policies around a BackpropQModel."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import graphs
from keras_bpq import diagnostics
from keras_bpq import estimators

# bfloat16 keeps 8 significant bits (relative spacing 2**-8). Gradients of the
# float32 weights come back through bfloat16 casts, and the exact gradient
# (enumeration, a 4x longer row layout) and the estimates reduce over rows in
# different groupings, so they differ by a few bfloat16 units of |exact| even
# without any estimator bias: allow 4 units (2**-6 |exact|) on top of 4 standard
# errors. A real bias of more than 1.6% still fails.
BF16_SLACK = 2.0**-6


@pytest.fixture
def mixed_bfloat16():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_samples_follow_the_compute_dtype_and_the_rest_stays_float32(mixed_bfloat16):
    for build in (graphs.mixed, graphs.tree):  # Bernoulli, Normal, Categorical
        model, x = build()
        model.compile(optimizer="adam")
        assert all(v.dtype == "float32" for v in model.trainable_variables)
        out = model.run_forward(tf.constant(x))
        for name, record in out.records.items():
            assert record.layer.compute_dtype == "bfloat16"
            assert record.sample.dtype == tf.bfloat16, name
            assert record.log_prob().dtype == tf.float32, name
        assert {c.dtype for c in out.costs.values()} == {tf.float32}
        assert out.total.dtype == tf.float32 and out.surrogate.dtype == tf.float32
        critics = model.critic_set().evaluate(out, with_gradient=True)
        assert critics.targets and all(t.dtype == tf.float32 for t in critics.targets.values())
        for loss, td_error in critics.per_node.values():
            assert loss.dtype == tf.float32 and td_error.dtype == tf.float32
        assert all(g is not None and g.dtype == tf.float32 for g in critics.grads)
        # Outside training the nodes return their most likely values, cast alike.
        for value in tf.nest.flatten(model(tf.constant(x), training=False)):
            assert value.dtype == tf.bfloat16  # these models output node samples


def test_trains_and_stays_finite(mixed_bfloat16):
    model, x = graphs.mixed()
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    start = [v.numpy() for v in model.actor_variables]
    history = model.fit(np.tile(x, (10, 1)), batch_size=6, epochs=3, verbose=0)
    for key, values in history.history.items():
        assert np.isfinite(values).all(), key
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert any(not np.allclose(s, v.numpy()) for s, v in zip(start, model.actor_variables))


@pytest.mark.parametrize(
    "name,estimator",
    [(n, "auto") for n in sorted(graphs.ALL)] + [("mixed", "reinforce"), ("tree", "reinforce")],
)
def test_gradient_check_passes_under_bfloat16(mixed_bfloat16, name, estimator):
    model, x = graphs.ALL[name]()
    model.compile(optimizer="adam", estimator=estimator)
    num_draws = 2000
    exact = diagnostics.exact_gradients(model, x, num_continuous_draws=4000)
    draws = diagnostics.estimate_gradients(model, x, num_draws=num_draws)
    for variable, truth, samples in zip(model.actor_variables, exact, draws):
        mean = samples.mean(axis=0)
        stderr = samples.std(axis=0, ddof=1) / np.sqrt(num_draws)
        allowed = 4 * stderr + 1e-5 + BF16_SLACK * np.abs(truth)
        assert np.all(np.abs(mean - truth) <= allowed), (
            f"{name}/{estimator}: {variable.path} estimate {mean} vs exact {truth} (stderr {stderr})"
        )
    assert any(np.abs(g).max() > 1e-3 for g in exact)


def test_mixed_float16_scales_the_loss():
    """mixed_float16 wraps the optimizer in a LossScaleOptimizer, which divides
    the gradients by its scale: the step must scale the loss to match, and leave
    overflowing steps to the optimizer (it skips them and lowers its scale)."""
    previous = keras.mixed_precision.global_policy()
    moved = {}
    try:
        for policy in ("float32", "mixed_float16"):
            keras.mixed_precision.set_global_policy(policy)
            model, x = graphs.chain()
            model.compile(optimizer=keras.optimizers.SGD(0.1), estimator="reinforce")
            start = [v.numpy() for v in model.actor_variables]
            model.fit(np.tile(x, (20, 1)), batch_size=3, epochs=1, shuffle=False, verbose=0)
            moved[policy] = sum(
                float(np.abs(s - v.numpy()).sum()) for s, v in zip(start, model.actor_variables)
            )
            if policy == "mixed_float16":
                assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    # Unscaled, the float16 updates would be 2**15 times too small.
    assert moved["mixed_float16"] > 0.5 * moved["float32"], moved


# -- every estimator x every precision policy -----------------------------------
def rounding_slack(policy):
    """Four units of rounding (`2 eps`, `eps` the spacing at 1) of the policy's
    compute dtype, relative to |exact|: the allowance of `BF16_SLACK`'s
    argument for any 16-bit type (2**-6 for bfloat16's 8 significant bits,
    2**-9 for float16's 11), and negligible for float32."""
    import ml_dtypes

    dtype = keras.mixed_precision.Policy(policy).compute_dtype
    return 2.0 * float(ml_dtypes.finfo(getattr(ml_dtypes, dtype, None) or np.dtype(dtype)).eps)


def _tuned_relax():
    return estimators.Relax(temperature=0.8, tune=True)


# Every estimator of the catalogue, grouped three to a graph so that one
# compile, one gradient check and one short fit serve three of them:
# name -> (graph, {node: estimator factory}, num_samples, unbiased whatever the
# critics' state). `graphs.masked_categorical`: z1 (2 Bernoulli units), c (a
# masked 4-way Categorical), z2 (1 Bernoulli unit); `graphs.mixed`: z1, n
# (Normal), z2. Each node's own parameters (`d1`, `dc`, `dn`, `d2`) get their
# gradient only from that node's estimator.
BUNDLES = {
    "disarm-relax_tuned-relax": (
        graphs.masked_categorical, {"z1": estimators.DisARM, "c": _tuned_relax, "z2": estimators.Relax}, 1, True,
    ),
    "rloo-critic_cv-reinforce": (
        graphs.masked_categorical,
        {"z1": estimators.RLOO, "c": estimators.CriticCV, "z2": estimators.Reinforce}, 2, True,
    ),
    "relax_tuned-reparam-critic_cv": (
        graphs.mixed, {"z1": _tuned_relax, "n": estimators.Reparam, "z2": estimators.CriticCV}, 1, True,
    ),
    "critic-expected-local_expectation": (
        graphs.masked_categorical,
        {"z1": estimators.CriticAdvantage, "c": estimators.Expected, "z2": estimators.LocalExpectation}, 1, False,
    ),
    "gumbel-gumbel_straight_through-critic": (
        graphs.masked_categorical,
        {"z1": estimators.Gumbel, "c": lambda: estimators.Gumbel(straight_through=True),
         "z2": estimators.CriticAdvantage}, 1, False,
    ),
    "local_expectation-pathwise-gumbel": (
        graphs.mixed, {"z1": estimators.LocalExpectation, "n": estimators.Pathwise, "z2": estimators.Gumbel}, 1, False,
    ),
}
assert {f().name for _, choice, _, _ in BUNDLES.values() for f in choice.values()} == set(estimators.ESTIMATORS)


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_every_estimator_trains_and_passes_the_gradient_check_under_each_policy(bundle, policy):
    """Each estimator serves its node under the policy: the gradient estimate
    agrees with enumeration (bundles of estimators unbiased whatever the
    critics' state; 500 draws, 4 standard errors plus `rounding_slack`) and a
    few training steps leave every weight, critic, estimator state and slot
    of both optimizers (the actor's and the critics') finite."""
    graph, factories, num_samples, unbiased = BUNDLES[bundle]
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        model, x = graph()
        choice = {n: make() for n, make in factories.items()}
        model.compile(optimizer=keras.optimizers.Adam(0.05), estimator=choice, num_samples=num_samples)
        assert all(model.node_estimators[n] is e for n, e in choice.items())
        model.build_training_state()  # creates the node state
        tuned = [n for n in choice if hasattr(model.training_state.node_state[n], "eta")]
        for i, n in enumerate(tuned):  # a control variate away from the defaults
            model.training_state.node_state[n].log_temperature.assign(np.log(1.7 + i))
            model.training_state.node_state[n].eta.assign(0.4 - 0.9 * i)
        if unbiased:
            num_draws = 500
            exact = diagnostics.exact_gradients(model, x, num_continuous_draws=4000)
            draws = diagnostics.estimate_gradients(model, x, num_draws=num_draws, chunk_size=250)
            for variable, truth, samples in zip(model.actor_variables, exact, draws):
                mean = samples.mean(axis=0)
                stderr = samples.std(axis=0, ddof=1) / np.sqrt(num_draws)
                allowed = 4 * stderr + 1e-5 + rounding_slack(policy) * np.abs(truth)
                assert np.all(np.abs(mean - truth) <= allowed), (
                    f"{bundle}/{policy}: {variable.path} estimate {mean} vs exact {truth} (stderr {stderr})"
                )
        start = [v.numpy() for v in model.actor_variables]
        history = model.fit(np.tile(x, (4, 1)), batch_size=6, epochs=2, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    for key, values in history.history.items():
        assert np.isfinite(values).all(), key
    variables = (
        model.weights + model.training_state.weights + model.optimizer.variables + model.critic_optimizer.variables
    )
    for variable in variables:
        assert np.isfinite(keras.ops.convert_to_numpy(variable)).all(), variable.path
    assert any(not np.allclose(s, v.numpy()) for s, v in zip(start, model.actor_variables))
    if tuned:
        assert all(model.training_state.node_state[n].tune_steps.numpy() > 0 for n in tuned)
