"""The estimator catalogue: each unbiased estimator against the exact gradient."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import graphs
import keras_bpq
from keras_bpq import diagnostics
from keras_bpq import forward as forward_lib
from test_critics import oracle_critics
from test_gradients import assert_unbiased


def per_node(model, estimator, fallback="critic_cv"):
    """`estimator` on the nodes it serves, `fallback` on the other discrete nodes."""
    model.compile(estimator="reinforce")
    choice = {}
    for info in model.scg().nodes:
        if info.reparameterized:
            continue
        binary_only = estimator == "disarm"
        choice[info.name] = fallback if binary_only and info.local_kind != "binary" else estimator
    return choice


@pytest.mark.parametrize("name", sorted(graphs.ALL))
@pytest.mark.parametrize("estimator", ["rloo", "disarm", "relax"])
def test_critic_free_and_relax_estimators_are_unbiased(estimator, name):
    model, x = graphs.ALL[name]()
    choice = per_node(model, estimator)
    model.compile(estimator=choice, num_samples=3 if estimator == "rloo" else 1)
    assert_unbiased(model, x, num_draws=1000)


@pytest.mark.parametrize("estimator", ["rloo", "disarm", "relax"])
def test_estimators_are_unbiased_under_xla(estimator):
    model, x = graphs.chain()
    model.compile(estimator=estimator, num_samples=2 if estimator == "rloo" else 1, jit_compile=True)
    assert_unbiased(model, x, num_draws=1000)


@pytest.mark.parametrize("name", ["chain", "tree", "dag"])
def test_local_expectation_and_expected_with_oracle_critics_are_unbiased(name):
    model, x = graphs.ALL[name]()
    model.compile(estimator="reinforce")
    choice = {
        info.name: "expected" if info.local_kind == "categorical" else "local_expectation"
        for info in model.scg().nodes
    }
    model.compile(estimator=choice, critics=oracle_critics(model))
    assert_unbiased(model, x, num_draws=1000)


@pytest.mark.parametrize("estimator", ["critic", "local_expectation", "relax"])
def test_estimators_on_a_factorised_categorical_are_unbiased(estimator):
    """`critic` and `local_expectation` (oracle critics) sum each choice's
    outcomes with the other choices held; `relax` relaxes every choice."""
    model, x = graphs.factorised_categorical()
    model.compile(estimator="reinforce")
    model.compile(estimator={"g": estimator}, critics=oracle_critics(model))
    assert_unbiased(model, x, num_draws=1000)


def test_factorised_categorical_nodes_get_an_estimator_that_serves_them():
    """`expected` sums one choice's whole support: a clear error at compile for
    a node of several choices. `auto` picks critic_cv while the local sum has
    at most MAX_SUPPORT outcomes (n (K - 1)), else reinforce (rloo)."""
    model, _ = graphs.factorised_categorical()
    with pytest.raises(ValueError, match=r"'expected' cannot serve node 'g'.*\[2, 3\] hold 2 independent choices"):
        model.compile(estimator={"g": "expected"})
    for factors, chosen in ((341, "critic_cv"), (342, "reinforce")):  # 341 * 3 <= 1024 < 342 * 3
        x = keras.Input((2,))
        logits = keras.layers.Reshape((factors, 4))(keras.layers.Dense(factors * 4)(x))
        grid = keras_bpq.Categorical(name="grid")(logits)
        model = keras_bpq.BackpropQModel(inputs=x, outputs=grid, costs={"c": keras.ops.sum(grid, axis=(1, 2))})
        model.compile(estimator="auto")
        assert model.node_estimators["grid"].name == chosen, factors
        assert model.scg().node("grid").factorized_units == factors


def test_gumbel_is_biased_and_its_temperature_anneals():
    model, x = graphs.tree()
    model.compile(estimator="reinforce")
    model.compile(estimator="gumbel", critics=oracle_critics(model))
    exact = diagnostics.exact_gradients(model, x)
    draws = diagnostics.estimate_gradients(model, x, num_draws=1000)
    bias = sum(float(np.sum((d.mean(0) - e) ** 2)) for d, e in zip(draws, exact))
    scale = sum(float(np.sum(e**2)) for e in exact)
    assert np.isfinite(bias) and bias > 1e-4 * scale  # biased by design, and measurably so
    model2, _ = graphs.chain()
    model2.compile(
        estimator=keras_bpq.estimators.Gumbel(temperature=1.0, anneal_rate=0.5, straight_through=True),
        jit_compile=True,
    )
    model2.fit(np.repeat(x, 2, axis=0), batch_size=6, epochs=3, verbose=0)
    temperatures = [v.numpy() for v in model2.training_state.weights if "temperature" in v.path]
    np.testing.assert_allclose(temperatures, 0.125)


def test_rloo_trains_with_several_samples_per_example():
    model, queries = graphs.walk_task()
    model.compile(optimizer=keras.optimizers.Adam(0.03), estimator="rloo", num_samples=4)
    history = model.fit(queries, batch_size=len(queries), epochs=3, verbose=0)
    assert np.isfinite(history.history["loss"][-1])


def test_estimator_and_node_mismatches_fail_at_compile():
    model, _ = graphs.chain()
    with pytest.raises(ValueError, match="'expected' cannot serve node 'z1'"):
        model.compile(estimator="expected")
    with pytest.raises(ValueError, match="'rloo' for node 'z1' needs several draws"):
        model.compile(estimator="rloo")
    model, _ = graphs.tree()
    with pytest.raises(ValueError, match="'disarm' cannot serve node 'b'"):
        model.compile(estimator="disarm")
    x = keras.Input((2,))
    big = keras_bpq.Categorical(name="big")(keras.layers.Dense(10_000)(x))
    model = keras_bpq.BackpropQModel(inputs=x, outputs=big, costs={"c": keras.ops.sum(big, axis=-1)})
    with pytest.raises(ValueError, match="'expected' cannot serve node 'big'.*10000 outcomes"):
        model.compile(estimator="expected")
    model.compile(estimator="auto")
    assert model.node_estimators["big"].name == "reinforce"
    model.compile(estimator="auto", num_samples=2)
    assert model.node_estimators["big"].name == "rloo"


def test_reinforce_normalize_standardises_the_advantage_and_round_trips():
    import tensorflow as tf

    from keras_bpq import estimators

    plain = estimators.Reinforce(decay=0.95)
    assert plain.normalize is False
    est = estimators.Reinforce(decay=0.95, normalize=True, epsilon=1e-6)
    config = est.get_config()
    assert config == {"decay": 0.95, "normalize": True, "epsilon": 1e-6}
    again = estimators.Reinforce(**config)
    assert (again.decay, again.normalize, again.epsilon) == (0.95, True, 1e-6)

    class Record:
        def log_prob(self):
            return log_p

    log_p = tf.Variable([0.1, -0.4, 0.3, -1.2])
    costs = tf.constant([1.0, 0.0, 3.0, 2.0])
    state = estimators.BaselineState(baseline=tf.Variable(0.5), baseline_steps=tf.Variable(1.0))
    step = estimators.NodeStep(info=None, record=Record(), downstream=costs, state=state)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(est.surrogate(step))
    advantage = tape.gradient(loss, log_p).numpy()
    raw = costs.numpy() - 0.5 / (1.0 - 0.95)  # bias-corrected EMA baseline after one step
    expected = (raw - raw.mean()) / (raw.std() + 1e-6)
    np.testing.assert_allclose(advantage, expected, rtol=1e-5)
    np.testing.assert_allclose([advantage.mean(), advantage.std()], [0.0, 1.0], atol=1e-5)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(plain.surrogate(step))
    np.testing.assert_allclose(tape.gradient(loss, log_p).numpy(), costs.numpy() - 0.5 / 0.05, rtol=1e-5)


# -- relax with a tuned control variate ----------------------------------------
def relax_state(model):
    """`{node: {name: value}}` of every relax node's tuned state."""
    return {
        name: {k: v.numpy().copy() for k, v in state._asdict().items()}
        for name, state in model.training_state.node_state.items()
        if hasattr(state, "eta")
    }


def move_control_variates(model):
    """Sets every tuned relax node's `(t, eta)` away from the defaults, to
    different values per node; returns those nodes."""
    model.build_training_state()  # creates the node state
    tuned_nodes = [n for n, s in model.training_state.node_state.items() if hasattr(s, "eta")]
    for i, n in enumerate(tuned_nodes):
        model.training_state.node_state[n].log_temperature.assign(np.log(1.7 + i))
        model.training_state.node_state[n].eta.assign(0.4 - 0.9 * i)
    return tuned_nodes


@pytest.mark.parametrize("name,jit_compile", [("chain", False), ("dag", False), ("two_costs", True)])
def test_tuned_relax_is_unbiased_at_any_control_variate(name, jit_compile):
    model, x = graphs.ALL[name]()
    tuned = keras_bpq.estimators.Relax(temperature=0.8, tune=True)
    choice = {n: tuned if e == "relax" else e for n, e in per_node(model, "relax").items()}
    model.compile(estimator=choice, jit_compile=jit_compile)
    assert move_control_variates(model)
    assert_unbiased(model, x, num_draws=1000)


class _Logit(keras.layers.Layer):
    """The REBAR toy's single learnable logit, broadcast to the batch."""

    def build(self, input_shape):
        self.theta = self.add_weight(shape=(), initializer="zeros", name="theta")

    def call(self, x):
        return keras.ops.zeros_like(x[:, :1]) + self.theta


def rebar_toy(estimator, t=0.45, aux=False):
    """`b ~ Bernoulli(sigmoid(theta))`, cost `(b - t)^2` (benchmarks/toy.py), the
    actor frozen (SGD at rate 0); `aux` adds a cost `log x[:, 1]` that `b` does
    not influence, non-finite where `x[:, 1] < 0`."""
    keras.utils.set_random_seed(0)
    x = keras.Input((2,))
    b = keras_bpq.Bernoulli(name="b", seed=1)(_Logit(name="logit")(x))
    costs = {"cost": keras.ops.square(b[:, 0] - t)}
    if aux:
        costs["aux"] = keras.ops.log(x[:, 1])
    model = keras_bpq.BackpropQModel(inputs=x, outputs=b, costs=costs, name="toy")
    model.compile(optimizer=keras.optimizers.SGD(0.0), estimator=estimator)
    model.build_training_state()  # creates the node state
    return model


def test_relax_logit_gradient_is_the_surrogates_gradient():
    import tensorflow as tf

    est = keras_bpq.estimators.Relax(tune=True)
    model = rebar_toy(est)
    x = np.ones((64, 2), "float32")
    with tf.GradientTape() as tape:
        out = model.run_forward(x)
        loss = tf.reduce_sum(out.surrogate)
    step = out.steps["b"]
    expected = tape.gradient(loss, step.record.params).numpy()
    got = est.logit_gradient(step, *est.control(step.state)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert np.std(got) > 1e-3  # not a constant: the draws differ


def test_relax_tuning_lowers_the_variance_and_skips_nonfinite_steps():
    initial = {"log_temperature": np.log(0.5), "eta": 1.0}
    model = rebar_toy(keras_bpq.estimators.Relax(tune=True, tune_learning_rate=0.05), aux=True)
    state = model.training_state.node_state["b"]
    x = np.ones((16, 2), "float32")
    probe = x[:1]

    def variance():
        return diagnostics.gradient_variance(
            diagnostics.estimate_gradients(model, probe, num_draws=4000, chunk_size=500)
        )

    untuned = variance()
    for _ in range(100):
        model.train_on_batch(x)
    tuned_values = relax_state(model)["b"]
    assert abs(tuned_values["log_temperature"] - initial["log_temperature"]) > 0.2
    assert abs(tuned_values["eta"] - initial["eta"]) > 0.2
    assert tuned_values["tune_steps"] == 100
    tuned = variance()
    assert tuned < 0.8 * untuned, (tuned, untuned)
    # Same actor weights, back at the untuned control variate: the variance returns.
    for k, v in initial.items():
        getattr(state, k).assign(v)
    assert variance() > 0.9 * untuned
    for k in initial:
        getattr(state, k).assign(tuned_values[k])

    bad = x.copy()
    bad[0, 1] = -1.0  # cost "aux" is NaN: the step is skipped
    with pytest.raises(FloatingPointError, match="'aux' was not finite"):
        model.train_on_batch(bad)
    after = relax_state(model)["b"]
    for k, v in tuned_values.items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)


def tuning_signals(model, x, sample_weight, seeds):
    """`estimator_signals` (`(means, has_data, tuning)`) of one pass over `x`
    weighted by `sample_weight`, the nodes' seed generators first set to
    `seeds` (`{layer: state}`)."""
    for layer, state in seeds.items():
        layer.seed_generator.state.assign(state)
    forward = model.run_forward(x, sample_weight=sample_weight)
    return forward_lib.estimator_signals(model.scg(x), model.node_estimators, forward)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_tuned_relax_ignores_rows_of_weight_zero(jit_compile):
    """Sample weights 0 on the last rows give the tuning gradients and the
    tuning step of the batch without those rows, and so do weights 2 on the
    rows kept and other inputs in the rows of weight 0. Without XLA the rows
    kept draw the same noise in a batch of 9 as in one of 12 (Philox), and
    the reference is the batch of 9; under XLA (Threefry, whose noise depends
    on the batch's shape) it is the batch of 12 with weights 0."""
    model, _ = graphs.masked_categorical()
    model.compile(estimator=keras_bpq.estimators.Relax(temperature=0.8, tune=True))
    assert move_control_variates(model) == ["z1", "c", "z2"]
    layers = [model.node_layer(info) for info in model.scg().nodes]
    seeds = {layer: layer.seed_generator.state.numpy() for layer in layers}
    x = np.random.RandomState(4).normal(size=(12, graphs.INPUT_DIM)).astype("float32")
    kept = 9
    signals = tf.function(
        lambda x, w: tuning_signals(model, x, w, seeds), jit_compile=jit_compile, autograph=False
    )
    zeros = np.where(np.arange(12) < kept, 1.0, 0.0).astype("float32")
    other = x.copy()
    other[kept:] = 10.0 * np.random.RandomState(5).normal(size=other[kept:].shape)
    cases = {"zeros": signals(x, zeros), "twos": signals(x, 2.0 * zeros), "other inputs": signals(other, zeros)}
    dropped = cases["zeros"] if jit_compile else signals(x[:kept], np.ones(kept, "float32"))
    unweighted = signals(x, np.ones(12, "float32"))
    state = model.training_state
    initial = relax_state(model)

    def tuned(signal):
        for node, values in initial.items():
            for k, v in values.items():
                getattr(state.node_state[node], k).assign(v)
        means, has_data, tuning = signal
        state.update_estimators(model.scg().nodes, model.node_estimators, means, tuning, has_data)
        return relax_state(model)

    expected = tuned(dropped)
    for name, signal in cases.items():
        for node, grads, want in zip(model.scg().node_names, signal[2], dropped[2]):
            np.testing.assert_allclose(
                [g.numpy() for g in grads], [w.numpy() for w in want], rtol=1e-4, atol=1e-7, err_msg=f"{name} {node}"
            )
        for node, values in tuned(signal).items():
            for k, v in values.items():
                np.testing.assert_allclose(v, expected[node][k], rtol=1e-5, atol=1e-7, err_msg=f"{name} {node} {k}")
    # The rows left out count when their weight is not 0: the comparison has power.
    differs = [
        not np.allclose(g.numpy(), w.numpy(), rtol=1e-3)
        for grads, want in zip(unweighted[2], dropped[2]) for g, w in zip(grads, want)
    ]
    assert any(differs)


def test_tuned_relax_config_and_keras_file_round_trip(tmp_path):
    est = keras_bpq.estimators.Relax(temperature=0.8, tune=True, tune_learning_rate=0.02)
    config = est.get_config()
    assert config == {"temperature": 0.8, "tune": True, "tune_learning_rate": 0.02}
    again = keras_bpq.estimators.Relax(**config)
    assert again.get_config() == config
    assert keras_bpq.estimators.Relax().get_config()["tune"] is False
    with pytest.raises(ValueError, match="temperature must be positive"):
        keras_bpq.estimators.Relax(temperature=0.0)

    keras.utils.set_random_seed(3)
    model, x = graphs.chain()
    model.compile(optimizer=keras.optimizers.Adam(0.03), estimator=est, critic_hidden_units=(4,))
    model.fit(np.repeat(x, 4, axis=0), batch_size=6, epochs=2, verbose=0)
    values = relax_state(model)
    assert set(values) == {"z1", "z2", "z3"}
    assert all(v["tune_steps"] == 4 and v["eta"] != 1.0 for v in values.values())
    model.save(tmp_path / "relax.keras")
    loaded = keras.saving.load_model(tmp_path / "relax.keras", safe_mode=True)
    assert loaded.node_estimators["z2"].get_config() == config
    loaded_values = relax_state(loaded)
    for node, state in values.items():
        for k, v in state.items():
            np.testing.assert_array_equal(loaded_values[node][k], v, err_msg=f"{node} {k}")


# -- relax and gumbel on (masked) Categorical nodes ------------------------------
def _dense_gradient(model, exact, layer):
    """The exact gradient of `layer`'s kernel."""
    (grad,) = [g for v, g in zip(model.actor_variables, exact) if v.path == f"{layer}/kernel"]
    return grad


@pytest.mark.parametrize(
    "tune,temperature,jit_compile", [(False, 0.2, False), (True, 0.8, True)], ids=["t0.2-graph", "tuned-xla"]
)
def test_relax_on_masked_categorical_nodes_is_unbiased(tune, temperature, jit_compile):
    """Bernoulli -> masked Categorical -> Bernoulli, relax on every node: the
    Categorical node through the conditional Gumbel construction. Tuned: at
    `(t, eta)` away from the defaults (`eta < 0` on one node)."""
    model, x = graphs.masked_categorical()
    estimator = keras_bpq.estimators.Relax(temperature=temperature, tune=tune)
    model.compile(estimator=estimator, jit_compile=jit_compile)
    assert {e.name for e in model.node_estimators.values()} == {"relax"}
    if tune:
        assert move_control_variates(model) == ["z1", "c", "z2"]
    exact, _ = assert_unbiased(model, x, num_draws=1000)
    assert np.abs(_dense_gradient(model, exact, "dc")).max() > 1e-2  # c's own parameters


def test_relax_with_an_exact_critic_on_a_masked_categorical_node_is_unbiased():
    """With an exact critic the control variate is strong, so the relaxed terms
    carry much of the estimate and a wrong `z~ | b` shows: one off by a shift
    of the log-probabilities (`log_p + 1`, tried) fails here. On top of 4
    standard errors per entry, the 20 entries of the node's kernel together:
    chi2 about 20 when unbiased (sd 6.3). (Only `c` uses relax: `z1`'s exact
    critic thresholds its relaxed value into `c`'s mask, a control variate not
    continuous in `z`.)"""
    model, x = graphs.masked_categorical()
    model.compile(estimator="reinforce")
    tuned = keras_bpq.estimators.Relax(tune=True)
    model.compile(estimator={"c": tuned}, critics=oracle_critics(model))
    model.build_training_state()  # creates the node state
    model.training_state.node_state["c"].log_temperature.assign(np.log(1.7))
    model.training_state.node_state["c"].eta.assign(0.4)
    exact, draws = assert_unbiased(model, x, num_draws=1000)
    (index,) = [i for i, v in enumerate(model.actor_variables) if v.path == "dc/kernel"]
    samples = draws[index]
    stderr = samples.std(axis=0, ddof=1) / np.sqrt(len(samples))
    live = stderr > 0
    chi2 = float(np.sum(((samples.mean(axis=0) - exact[index])[live] / stderr[live]) ** 2))
    assert chi2 <= live.sum() + 6 * np.sqrt(2 * live.sum()), chi2


def _masked_pass(estimator, rows_per_example=100):
    """One recorded pass of `graphs.masked_categorical` with `estimator` on
    node `c`: returns `(step, values, gradient)`, `values` every input `estimator`
    gave `Q` and `gradient` that of its surrogate (summed over rows) with respect
    to the node's logits."""
    import dataclasses

    import tensorflow as tf

    model, x = graphs.masked_categorical()
    model.compile(estimator={"c": estimator})
    model.build_training_state()  # creates the node state
    values = []
    with tf.GradientTape() as tape:
        out = model.run_forward(tf.constant(np.repeat(x, rows_per_example, axis=0)))
        recorded = out.steps["c"]

        def spy(v):
            values.append(tf.convert_to_tensor(v))
            return recorded.q(v)

        step = dataclasses.replace(recorded, q=spy, cache=keras_bpq.estimators.PassCache())
        loss = tf.reduce_sum(estimator.surrogate(step))
    return step, [v.numpy() for v in values], tape.gradient(loss, step.record.params).numpy()


@pytest.mark.parametrize(
    "make",
    [
        lambda: keras_bpq.estimators.Relax(tune=True),
        lambda: keras_bpq.estimators.Gumbel(),
        lambda: keras_bpq.estimators.Gumbel(straight_through=True),
    ],
    ids=["relax_tuned", "gumbel", "gumbel_straight_through"],
)
def test_relax_and_gumbel_give_masked_outcomes_no_weight_and_no_gradient(make):
    estimator = make()
    step, values, grad = _masked_pass(estimator)
    allowed = step.record.mask.numpy()
    masked = ~allowed
    assert masked[:, 2].any() and masked[:, 3].any() and allowed[:, 2].any()  # the mask varies by row
    assert not step.record.sample.numpy()[masked].any()  # never sampled
    assert values
    for v in values:  # Q never sees weight on a masked outcome
        assert v.shape[0] == len(allowed) and v.shape[-1] == 4
        assert np.all(v[masked[:, None, :].repeat(v.shape[1], axis=1)] == 0.0)
        assert np.isfinite(v).all()
    assert np.isfinite(grad).all()
    assert np.all(grad[masked] == 0.0)
    assert np.abs(grad[allowed]).max() > 1e-3
    if estimator.name == "relax":  # the tuned control variate's g is that gradient
        got = estimator.logit_gradient(step, *estimator.control(step.state)).numpy()
        np.testing.assert_allclose(got, grad, rtol=1e-4, atol=1e-6)
        assert np.all(got[masked] == 0.0)


def test_gumbel_on_masked_categorical_nodes_has_a_measured_bias(record_property):
    """The Concrete relaxation with an exact critic: its bias on the
    Categorical node's parameters is measured (recorded as a test property),
    never assumed zero."""
    model, x = graphs.masked_categorical()
    model.compile(estimator="reinforce")
    model.compile(estimator="gumbel", critics=oracle_critics(model))
    exact = diagnostics.exact_gradients(model, x)
    draws = diagnostics.estimate_gradients(model, x, num_draws=1000)
    (index,) = [i for i, v in enumerate(model.actor_variables) if v.path == "dc/kernel"]
    truth, samples = exact[index], draws[index]
    bias = samples.mean(axis=0) - truth
    stderr = samples.std(axis=0, ddof=1) / np.sqrt(len(samples))
    relative = float(np.linalg.norm(bias) / np.linalg.norm(truth))
    live = stderr > 0  # kernel entries of outcomes some row allows
    chi2 = float(np.sum((bias[live] / stderr[live]) ** 2))
    record_property("gumbel_relative_bias_dc_kernel", relative)
    record_property("gumbel_bias_chi2_dc_kernel", chi2)
    print(f"gumbel on masked c: |bias| / |grad| = {relative:.3f}, chi2 = {chi2:.1f} on {live.sum()} entries")
    assert np.isfinite(samples).all() and np.isfinite(relative)
    # Unbiased, chi2 would be about `live` (sd sqrt(2 live)): the bias shows at 1000 draws.
    assert chi2 > live.sum() + 6 * np.sqrt(2 * live.sum())


def test_importance_draws_keep_finite_weights_and_their_expectation_when_units_saturate():
    """`subset_units(..., "importance")` on logits a trained net reaches (most
    units saturated, up to |logit| = 100, the first and last units among
    them) and at the offsets' extremes (0 and the largest float32 below 1):
    every weight is finite and at most about `U / (S IMPORTANCE_FLOOR)`
    (before the floor, offset 0 drew a unit of probability about
    `exp(-60)` with weight `exp(60) / S`, and a point past the float32 CDF's
    end the last unit with weight `exp(100) / S`, inf), and over a grid of
    offsets `E[sum_s scale_s f(unit_s)]
    = sum_u f(u)` for an `f` shaped like the units' gradient terms."""
    from types import SimpleNamespace

    from keras_bpq import estimators

    rng = np.random.RandomState(0)
    units, total, rows = 4, 200, 2**15
    logits = rng.randn(total).astype(np.float32) * 2.0
    saturated = rng.rand(total) < 0.75
    saturated[[0, -1]] = True
    logits[saturated] = rng.choice([-100.0, -60.0, 40.0, 100.0], saturated.sum())
    logits[[0, -1]] = 100.0
    sizes = np.abs(rng.randn(total)).astype(np.float32)
    offsets = np.concatenate([(np.arange(rows - 2) + 0.5) / (rows - 2), [0.0, np.nextafter(1.0, 0.0)]])
    step = SimpleNamespace(
        record=SimpleNamespace(params=tf.constant(np.tile(logits, (rows, 1)))),
        uniform=lambda shape: tf.constant(offsets.astype(np.float32)[:, None]),
    )
    unit, scale = estimators.subset_units(step, units, "importance", tf.constant(np.tile(sizes, (rows, 1))))
    unit, scale = unit.numpy(), scale.numpy()
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    assert scale.max() <= 1.05 * total / (units * estimators.IMPORTANCE_FLOOR)  # float32 widths: about 1%
    w = 1.0 / (1.0 + np.exp(-logits.astype(np.float64))) / (1.0 + np.exp(logits.astype(np.float64)))
    f = w * (sizes + sizes.mean()) * rng.choice([-1.0, 1.0], total)
    estimate = np.mean(np.sum(scale * f[unit], axis=1))
    assert abs(estimate - f.sum()) <= 1e-3 * np.abs(f).sum(), (estimate, f.sum())


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("total", [1, 7, 200, 785])
def test_systematic_draw_draws_the_units_whose_cdf_intervals_hold_the_points(total, jit_compile):
    """`systematic_draw` against a float64 numpy reference: each of the `S`
    points `(offset + k) / S` falls in its unit's interval of the CDF of `pi`,
    and each weight is one over `S` times that interval's width (its CDF is
    a running sum computed as matrix products; a point within float32
    rounding of an interval's end may fall either side)."""
    from keras_bpq import estimators

    rng = np.random.RandomState(total)
    rows, units = 64, 4
    pi = rng.gamma(0.3, size=(rows, total))
    pi /= pi.sum(axis=1, keepdims=True)
    offset = rng.rand(rows, 1)
    draw = tf.function(estimators.systematic_draw, jit_compile=jit_compile, reduce_retracing=True)
    unit, scale = (t.numpy() for t in draw(tf.constant(pi, tf.float32), tf.constant(offset, tf.float32), units))
    cdf = np.cumsum(pi, axis=1)
    points = (offset + np.arange(units)) / units
    expected = np.minimum((cdf[:, None, :] <= points[:, :, None]).sum(axis=2), total - 1)
    near_an_end = np.min(np.abs(cdf[:, None, :] - points[:, :, None]), axis=2) < 1e-5
    assert np.all((unit == expected) | near_an_end), np.argwhere((unit != expected) & ~near_an_end)
    width = np.take_along_axis(pi, unit, axis=1)
    ok = ~near_an_end
    np.testing.assert_allclose(scale[ok], 1.0 / (units * width[ok]), rtol=1e-3)
