"""The estimator catalogue: each unbiased estimator against the exact gradient."""

import keras
import numpy as np
import pytest

import graphs
import keras_bpq
from keras_bpq import diagnostics
from test_critics import oracle_critics
from test_gradients import assert_unbiased


def per_node(model, estimator, fallback="critic_cv"):
    """`estimator` on the nodes it serves, `fallback` on the other discrete nodes."""
    model.compile(estimator="reinforce")
    choice = {}
    for info in model.scg().nodes:
        if info.reparameterized:
            continue
        binary_only = estimator in ("disarm", "relax")
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
    temperatures = [v.numpy() for v in model2.machinery.weights if "temperature" in v.path]
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
    assert model._node_estimators["big"].name == "reinforce"
    model.compile(estimator="auto", num_samples=2)
    assert model._node_estimators["big"].name == "rloo"


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
    state = {"baseline": tf.Variable(0.5), "baseline_steps": tf.Variable(1.0)}
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
