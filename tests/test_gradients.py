"""Every estimator's mean agrees with the exact gradient computed by enumeration."""

import dataclasses

import keras
import numpy as np
import tensorflow as tf
import pytest

import graphs
import keras_bpq
from keras_bpq import critics
from keras_bpq import diagnostics
from keras_bpq import estimators
from keras_bpq import q_values
from keras_bpq import saving

NUM_DRAWS = 2000


def assert_unbiased(model, x, num_draws=NUM_DRAWS, exact_draws=4000, chunk_size=25):
    exact = diagnostics.exact_gradients(model, x, num_continuous_draws=exact_draws)
    draws = diagnostics.estimate_gradients(model, x, num_draws=num_draws, chunk_size=chunk_size)
    assert len(exact) == len(draws) == len(model.actor_variables)
    for variable, truth, samples in zip(model.actor_variables, exact, draws):
        assert samples.shape == (num_draws,) + tuple(variable.shape)
        mean = samples.mean(axis=0)
        stderr = samples.std(axis=0, ddof=1) / np.sqrt(num_draws)
        z = np.abs(mean - truth) / (stderr + 1e-7)
        assert np.all(np.abs(mean - truth) <= 4 * stderr + 1e-5), (
            f"{model.name}: {variable.path} estimate {mean} vs exact {truth} "
            f"(max |z| = {z.max():.2f})"
        )
    return exact, draws


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("name", sorted(graphs.ALL))
def test_reinforce_matches_exact_gradient(name, jit_compile):
    model, x = graphs.ALL[name]()
    model.compile(optimizer="adam", estimator="reinforce", jit_compile=jit_compile)
    exact, _ = assert_unbiased(model, x)
    assert any(np.abs(g).max() > 1e-3 for g in exact), "the test graph has no gradient"


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("name", sorted(graphs.ALL))
def test_critic_cv_with_untrained_critics_matches_exact_gradient(name, jit_compile):
    model, x = graphs.ALL[name]()
    model.compile(optimizer="adam", jit_compile=jit_compile)  # auto: critic_cv
    assert {e.name for e in model.node_estimators.values()} <= {"critic_cv", "reparam"}
    assert_unbiased(model, x)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_critic_cv_on_a_factorised_categorical_matches_exact_gradient(jit_compile):
    """A Categorical node of two independent masked choices (logits
    `[batch, 2, 3]`): auto picks critic_cv, whose local sum runs over each
    choice's outcomes with the other held at its sample; unbiased with an
    untrained critic (the node's cost through z2) and an exact head (its own)."""
    model, x = graphs.factorised_categorical()
    model.compile(optimizer="adam", jit_compile=jit_compile)
    assert {e.name for e in model.node_estimators.values()} == {"critic_cv"}
    assert model.scg().node("g").support_size == 9
    assert_unbiased(model, x)


def test_eager_matches_exact_gradient():
    model, x = graphs.dag()
    model.compile(optimizer="adam", estimator="reinforce", run_eagerly=True)
    # One eager pass for all the draws: an eager pass of 25 draws costs over half as much as one of 1000.
    assert_unbiased(model, x, num_draws=1000, chunk_size=1000)


def test_exact_gradient_matches_finite_differences():
    model, x = graphs.chain()
    model.compile(optimizer="adam")
    grads, objective = diagnostics.exact_gradients(model, x, return_objective=True)
    variable = model.actor_variables[0]
    index = (0, 1)
    eps = 1e-2
    value = variable.numpy()
    shifted = []
    for sign in (1, -1):
        bumped = value.copy()
        bumped[index] += sign * eps
        variable.assign(bumped)
        shifted.append(diagnostics.exact_gradients(model, x, return_objective=True)[1])
    variable.assign(value)
    numeric = (shifted[0] - shifted[1]) / (2 * eps)
    np.testing.assert_allclose(grads[0][index], numeric, rtol=2e-2, atol=1e-4)
    assert np.isfinite(objective)


def test_exact_gradient_refuses_huge_supports():
    model, x = graphs.chain()
    model.compile(optimizer="adam")
    with pytest.raises(ValueError, match="max_configurations"):
        diagnostics.exact_gradients(model, x, max_configurations=8)


@pytest.mark.parametrize("name", ["chain", "mixed"])
def test_critic_cv_with_several_draws_matches_exact_gradient(name):
    """With `num_samples=3` critic_cv's residual gets a leave-one-out baseline."""
    model, x = graphs.ALL[name]()
    model.compile(optimizer="adam", num_samples=3)
    assert_unbiased(model, x)


def _unit_subsets(model, units, unit_sampling="uniform"):
    """`CriticCV(units)` on every Bernoulli node, 'auto' on the others."""
    model.compile(estimator="reinforce")
    return {
        info.name: estimators.CriticCV(units=units, unit_sampling=unit_sampling)
        if info.local_kind == "binary" else "auto"
        for info in model.scg().nodes
    }


@pytest.mark.parametrize("name,jit_compile,unit_sampling", [
    ("chain", False, "uniform"), ("dag", False, "uniform"), ("two_costs", True, "uniform"),
    ("chain", False, "importance"), ("two_costs", True, "importance")])
def test_critic_cv_on_a_random_subset_of_units_matches_exact_gradient(name, jit_compile, unit_sampling):
    """One flipped unit per example, scaled by one over its expected count
    (the node's unit count, or one over its importance probability): unbiased."""
    model, x = graphs.ALL[name]()
    model.compile(optimizer="adam", estimator=_unit_subsets(model, 1, unit_sampling), jit_compile=jit_compile)
    assert_unbiased(model, x)


def test_critic_cv_units_are_checked_and_saved():
    model, _ = graphs.dag()  # z3 is Categorical
    with pytest.raises(ValueError, match="units=1 cannot serve node 'z3'"):
        model.compile(estimator=estimators.CriticCV(units=1))
    with pytest.raises(ValueError, match="positive int"):
        estimators.CriticCV(units=0)
    estimator = saving.decode_estimator(saving.encode_estimator(estimators.CriticCV(units=3), "estimator"))
    assert isinstance(estimator, estimators.CriticCV) and estimator.units == 3


def _linearised_subsets(model, units, unit_sampling="uniform"):
    """`CriticCV(units, linearize=True)` on every Bernoulli node, 'auto' on the others."""
    model.compile(estimator="reinforce")
    return {
        info.name: estimators.CriticCV(units=units, linearize=True, unit_sampling=unit_sampling)
        if info.local_kind == "binary" else "auto"
        for info in model.scg().nodes
    }


@pytest.mark.parametrize("name,jit_compile,unit_sampling", [
    ("chain", False, "uniform"), ("dag", True, "uniform"), ("two_costs", True, "uniform"),
    ("mixed", False, "uniform"), ("dag", True, "importance"), ("mixed", False, "importance")])
def test_critic_cv_with_a_first_order_expansion_matches_exact_gradient(name, jit_compile, unit_sampling):
    """Every unit's flip expanded to first order, one exact flip per example
    correcting it: unbiased whatever the expansion's error."""
    model, x = graphs.ALL[name]()
    model.compile(optimizer="adam", estimator=_linearised_subsets(model, 1, unit_sampling),
                  jit_compile=jit_compile)
    assert_unbiased(model, x)


def _wide():
    """x -> z1 (6 bits, wider than auto's exact flips) -> z2 (6 bits) -> a
    softplus-sum cost, and a cost on z1 alone: auto expands both nodes' flips."""
    x = keras.Input((graphs.INPUT_DIM,))
    z1 = keras_bpq.Bernoulli(name="z1", seed=1)(graphs.dense(6, "d1", 1)(x))
    z2 = keras_bpq.Bernoulli(name="z2", seed=2)(graphs.dense(6, "d2", 2)(z1))
    logits = graphs.dense(3, "dec", 3)(z2)
    far = keras.ops.sum(keras.ops.softplus(logits) - x * logits, axis=-1)
    near = graphs.square_cost(graphs.dense(2, "dec1", 4)(z1), x)
    model = keras_bpq.BackpropQModel(inputs=x, outputs=z2, costs={"far": far, "near": near}, name="wide")
    return model, graphs.inputs()


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_auto_expands_wide_bernoulli_nodes_and_stays_unbiased(jit_compile):
    model, x = _wide()
    model.compile(optimizer="adam", jit_compile=jit_compile)
    chosen = {n: (e.name, e.units, e.linearize, e.unit_sampling) for n, e in model.node_estimators.items()}
    flips = estimators.AUTO_EXACT_FLIPS
    assert chosen == {n: ("critic_cv", flips, True, "importance") for n in ("z1", "z2")}
    assert_unbiased(model, x, num_draws=1500)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_the_recorded_pass_gives_the_expansion_the_heads_give(jit_compile):
    """Where every head is exact at the sample (auto on `_wide`: z2's heads
    exact, z1's exact or common-noise), `Q(x) = c_X` and the slope of `c_X`
    from the recorded pass replace a pass through the heads, with the same values."""
    model, x = _wide()
    model.compile(optimizer="adam")
    model.run_forward(x)

    @tf.function(jit_compile=jit_compile)
    def both(x):
        steps = model.run_forward(x).steps
        assert all(steps[n].sample_slope is not None for n in ("z1", "z2"))
        return [
            (estimators.expanded_flips(steps[n]),
             estimators.expanded_flips(dataclasses.replace(steps[n], sample_slope=None)))
            for n in ("z1", "z2")
        ]

    for (q_x, expanded), (q_heads, expanded_heads) in both(tf.constant(x)):
        np.testing.assert_allclose(q_x, q_heads, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(expanded, expanded_heads, rtol=1e-4, atol=1e-5)
        assert np.abs(expanded_heads).max() > 0.1  # the heads' slopes are not trivially zero


@pytest.mark.parametrize("common_noise,with_slope", [(False, set()), (True, {"z1", "z2"})])
def test_only_nodes_whose_heads_are_all_exact_at_the_sample_get_the_recorded_slope(common_noise, with_slope):
    """A learned head's `Q(x)` is not `c_X`: a node with one keeps the
    expansion's own pass through its heads (chain: z1 and z2 have heads past
    later nodes, learned, or common-noise with `common_noise=True`; z3's one
    unit is summed exactly, no expansion)."""
    model, x = graphs.chain()
    model.compile(estimator={
        n: estimators.CriticCV(units=1, linearize=True, common_noise=common_noise) for n in ("z1", "z2", "z3")})
    steps = model.run_forward(x).steps
    assert {n for n, step in steps.items() if step.sample_slope is not None} == with_slope


def test_auto_sums_every_flip_of_narrow_bernoulli_nodes():
    model, _ = graphs.chain()
    model.compile(optimizer="adam")
    assert all(e.units is None for e in model.node_estimators.values())


def test_linearize_needs_units():
    with pytest.raises(ValueError, match="needs units"):
        estimators.CriticCV(linearize=True)
    estimator = saving.decode_estimator(saving.encode_estimator(
        estimators.CriticCV(units=3, linearize=True, unit_sampling="importance"), "estimator"))
    assert estimator.units == 3 and estimator.linearize and estimator.unit_sampling == "importance"
    with pytest.raises(ValueError, match="unit_sampling must be one of"):
        estimators.CriticCV(units=3, unit_sampling="stratified")


def test_summary_names_the_expansion():
    model, x = _wide()
    model.compile(optimizer="adam")
    text = model.scg_summary(x, print_fn=lambda s: None)
    flips = estimators.AUTO_EXACT_FLIPS
    assert f"critic_cv(units={flips}, linearize=True, unit_sampling='importance', common_noise=True)" in text


def _linear_in_z2():
    """x -> z1 (2 bits) -> z2 (3 bits) -> a cost linear in z2: z2's heads are
    exact, and for a cost linear in z2 its deviation is `c - E[c | z1]` exactly."""
    x = keras.Input((graphs.INPUT_DIM,))
    z1 = keras_bpq.Bernoulli(name="z1", seed=1)(graphs.dense(2, "d1", 1)(x))
    z2 = keras_bpq.Bernoulli(name="z2", seed=2)(graphs.dense(3, "d2", 2)(z1))
    cost = 3.0 * keras.ops.sum(graphs.dense(2, "dec", 3)(z2), axis=-1)
    model = keras_bpq.BackpropQModel(inputs=x, outputs=z2, costs={"cost": cost}, name="linear_in_z2")
    return model, graphs.inputs()


def _two_hops():
    """x -> z1 (3-way categorical) -> z2 (4-way categorical) -> a cost
    non-linear in z2, as the knowledge-graph walker's hops: z2's heads are exact."""
    x = keras.Input((graphs.INPUT_DIM,))
    z1 = keras_bpq.Categorical(name="z1", seed=1)(graphs.dense(3, "d1", 1)(x))
    z2 = keras_bpq.Categorical(name="z2", seed=2)(graphs.dense(4, "d2", 2)(keras.layers.Concatenate()([z1, x])))
    cost = 2.0 * graphs.square_cost(graphs.dense(2, "dec", 3)(z2), x)
    model = keras_bpq.BackpropQModel(inputs=x, outputs=z2, costs={"cost": cost}, name="two_hops")
    return model, graphs.inputs()


def _z1_variance(build, num_samples, successor_deviations, jit_compile):
    """The total variance of `d1`'s (z1's logits') gradient draws under
    `critic_cv`, asserting the draws unbiased against enumeration."""
    model, x = build()
    model.compile(optimizer="adam", estimator=estimators.CriticCV(successor_deviations=successor_deviations),
                  num_samples=num_samples, jit_compile=jit_compile)
    _, draws = assert_unbiased(model, x, num_draws=1500)
    index = [i for i, v in enumerate(model.actor_variables) if v.path.startswith("d1/")]
    return sum(float(draws[i].var(axis=0).sum()) for i in index)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("build,num_samples", [(_linear_in_z2, 1), (_two_hops, 4)],
                         ids=["bernoulli", "categorical_4_draws"])
def test_a_later_exact_nodes_deviation_takes_its_noise_out_of_an_earlier_node(build, num_samples, jit_compile):
    """z2's heads are exact, so z1's `critic_cv` subtracts z2's deviation from
    its realised cost: unbiased (enumeration; an untrained critic at z1), and
    z1's gradient variance falls below that of the same estimator without it
    (with 4 draws per example, as the walker's rollouts, the leave-one-out
    baseline takes out the untrained critic's offset and z2's noise is most
    of what is left)."""
    with_deviation = _z1_variance(build, num_samples, True, jit_compile)
    without = _z1_variance(build, num_samples, False, jit_compile)
    assert with_deviation < 0.8 * without, (with_deviation, without)


def test_a_drawn_subset_of_units_passes_no_deviation():
    """Over 4 drawn flips of wide Bernoulli nodes no deviation from z2
    reaches z1 (its estimate over a subset is noisier than what it removes);
    with every flip exact it does."""
    model, x = _wide()
    model.compile(optimizer="adam", estimator=estimators.CriticCV(units=4, linearize=True))
    steps = model.run_forward(x).steps
    assert steps["z1"].successor_deviation is None
    model, x = _linear_in_z2()
    model.compile(optimizer="adam", estimator="critic_cv")
    steps = model.run_forward(x).steps
    assert steps["z1"].successor_deviation is not None and steps["z2"].successor_deviation is None


def test_successor_deviations_are_checked_and_saved():
    with pytest.raises(ValueError, match="successor_deviations must be True or False"):
        estimators.CriticCV(successor_deviations=1)
    estimator = saving.decode_estimator(saving.encode_estimator(
        estimators.CriticCV(successor_deviations=False), "estimator"))
    assert estimator.successor_deviations is False
    assert estimators.CriticCV().describe() == "critic_cv"
    assert "successor_deviations=False" in estimators.CriticCV(successor_deviations=False).describe()


def _common_noise(model, **options):
    """`CriticCV(common_noise=True, **options)` on every Bernoulli and
    Categorical node, 'auto' on the others."""
    model.compile(estimator="reinforce")
    return {
        info.name: estimators.CriticCV(common_noise=True, **options) if info.local_kind else "auto"
        for info in model.scg().nodes
    }


@pytest.mark.parametrize("name,jit_compile", [
    ("chain", True), ("dag", False), ("two_costs", True), ("mixed", False), ("tree", True)])
def test_common_noise_heads_match_exact_gradient(name, jit_compile):
    """Heads past later Bernoulli nodes re-evaluated with those nodes drawn
    from this pass's noise: unbiased against enumeration; on the chain every
    head is common-noise or exact, so no critic is made."""
    model, x = graphs.ALL[name]()
    model.compile(optimizer="adam", estimator=_common_noise(model), jit_compile=jit_compile)
    assert_unbiased(model, x)
    if name == "chain":
        assert model.critic_variables == []


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_common_noise_heads_with_drawn_expanded_flips_match_exact_gradient(jit_compile):
    """With auto's expansion and 4 exact flips drawn by importance (the
    expansion holds the later samples fixed): unbiased, no critic."""
    model, x = _wide()
    flips = estimators.AUTO_EXACT_FLIPS
    options = dict(units=flips, linearize=True, unit_sampling="importance")
    model.compile(optimizer="adam", estimator=_common_noise(model, **options), jit_compile=jit_compile)
    assert model.critic_variables == []
    assert_unbiased(model, x, num_draws=1500)


def _noise_heads_and_records(model, x):
    """z1's heads at its sample and at its other outcomes (each unit flipped),
    and the pass they belong to."""
    forward = model.run_forward(x)
    info = model.scg().node("z1")
    sample = forward.records["z1"].sample
    flips = tf.abs(sample[:, None, :] - tf.eye(sample.shape[1])[None])
    values = tf.concat([sample[:, None], flips], axis=1)
    heads = model.q_function.heads(info, forward.x, forward.y, forward.records, values)
    return forward, info, values, heads


def test_common_noise_heads_at_the_sample_are_the_realised_costs():
    model, x = graphs.two_costs()
    model.compile(optimizer="adam", estimator=_common_noise(model))
    forward, _, _, heads = _noise_heads_and_records(model, x)
    assert model.q_function.common_noise_costs(model.scg().node("z1")) == ("far",)
    for cost in ("near", "far"):
        np.testing.assert_allclose(heads[cost][:, 0], forward.costs[cost], rtol=1e-5, atol=1e-5)
    assert forward.steps["z1"].successor_deviation is None


def test_common_noise_heads_are_a_forward_pass_with_the_same_noise():
    """The downstream evaluator's heads equal a re-run of the whole forward
    pass (the path of subclassed models) with z1 forced to each outcome and z2
    drawn from the recorded noise; with other noise they differ."""
    model, x = graphs.two_costs()
    model.compile(optimizer="adam", estimator=_common_noise(model))
    forward, info, values, heads = _noise_heads_and_records(model, x)
    noise = forward.records["z2"].noise
    held = q_values.context(info, forward.x, forward.records)
    rerun = model.q_function.rerun_heads(info, forward.x, forward.y, held, values, ("far",), {"z2": noise})
    np.testing.assert_allclose(heads["far"], rerun["far"], rtol=1e-5, atol=1e-5)
    other = model.q_function.rerun_heads(info, forward.x, forward.y, held, values, ("far",), {"z2": 1.0 - noise})
    assert not np.allclose(heads["far"], other["far"])


def _d1_variance(model, x):
    _, draws = assert_unbiased(model, x, num_draws=1500)
    index = [i for i, v in enumerate(model.actor_variables) if v.path.startswith("d1/")]
    return sum(float(draws[i].var(axis=0).sum()) for i in index)


def test_common_noise_heads_cut_the_variance_of_an_untrained_critic():
    """On the chain, z1's gradient variance with common-noise heads is below
    half of `critic_cv`'s with its (untrained) learned critic."""
    model, x = graphs.chain()
    model.compile(optimizer="adam", estimator=_common_noise(model))
    noise = _d1_variance(model, x)
    model, x = graphs.chain()
    model.compile(optimizer="adam", estimator="critic_cv")
    learned = _d1_variance(model, x)
    assert noise < 0.5 * learned, (noise, learned)


def test_common_noise_is_checked_saved_and_summarised():
    with pytest.raises(ValueError, match="common_noise must be True or False"):
        estimators.CriticCV(common_noise="yes")
    estimator = saving.decode_estimator(saving.encode_estimator(
        estimators.CriticCV(units=3, linearize=True, common_noise=True), "estimator"))
    assert estimator.common_noise is True and estimator.units == 3
    model, x = graphs.two_costs()
    model.compile(optimizer="adam", estimator=_common_noise(model))
    text = model.scg_summary(x, print_fn=lambda s: None)
    assert "critic_cv(common_noise=True)" in text and "common-noise[far] exact[near]" in text
    model.fit(x, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="common_noise=True when it first ran"):
        model.compile(optimizer="adam", estimator="critic_cv")


def test_replay_names_common_noise_heads_when_nothing_is_learned():
    model, _ = graphs.chain()
    with pytest.raises(ValueError, match="common-noise heads"):
        model.compile(optimizer="adam", estimator=_common_noise(model), replay=keras_bpq.Replay(64, 1))


def test_a_critic_for_a_node_that_learns_no_head_is_refused():
    """compile(critics=...) for a node whose heads are all common-noise or
    exact is an error, not a critic silently left unused."""
    model, _ = graphs.two_costs()
    estimator = _common_noise(model)
    with pytest.raises(ValueError, match=r"gives critics to nodes \['z1'\], which learn no head"):
        model.compile(optimizer="adam", estimator=estimator, critics={"z1": keras.Sequential([keras.layers.Dense(2)])})


class _Constant(critics.Critic):
    """An injected critic predicting zero for the heads it is given."""

    def __init__(self, heads):
        self.heads = tuple(heads)

    def q(self, context, values, target=True):
        return tf.zeros([tf.shape(values)[0], len(self.heads)])


def test_a_given_critic_must_predict_exactly_the_heads_its_node_learns():
    """On the tree `auto` serves z1's `cost_a` by common noise (its later node
    `a` is Bernoulli) and learns `cost_b` (`b` is Categorical): a given critic
    claiming both (as `ExactCritic` does by default) is refused, not silently
    overridden; an `ExactCritic` of the learned one keeps the estimator
    unbiased."""
    model, x = graphs.tree()
    model.compile(optimizer="adam")
    learned = critics.learned_heads(model.scg(), model.node_estimators)
    assert learned == {"z1": ("cost_b",)}
    every, oracle = diagnostics.ExactCritic(model, "z1"), diagnostics.ExactCritic(model, "z1", heads=learned["z1"])
    with pytest.raises(ValueError, match=r"predicts heads \['cost_a', 'cost_b'\], but the node learns heads \['cost_b'\]"):
        model.compile(optimizer="adam", critics={"z1": _Constant(("cost_a", "cost_b"))})
    with pytest.raises(ValueError, match=r"predicts heads \['cost_a', 'cost_b'\]"):
        model.compile(optimizer="adam", critics={"z1": every})
    model.compile(optimizer="adam", critics={"z1": oracle}, jit_compile=True)
    assert_unbiased(model, x, num_draws=1000)
