"""Outcomes as one-unit edits, and costs re-evaluated only downstream of a node."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import graphs
import keras_bpq
from keras_bpq import critics as critics_lib
from keras_bpq import estimators
from keras_bpq import outcomes
from keras_bpq import q_values


def test_unit_edits_dense_and_with_first():
    base = tf.constant([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    unit = tf.constant([[0, 1, 2], [2, 0, 1]])
    edits = outcomes.UnitEdits(base, unit, 1.0 - 2.0 * tf.gather(base, unit, batch_dims=1), (3,))
    want = np.array(
        [[[0, 0, 1], [1, 1, 1], [1, 0, 0]], [[0, 0, 1], [1, 0, 0], [0, 1, 0]]], "float32"
    )
    np.testing.assert_array_equal(edits.dense(), want)
    sample = tf.constant([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    first = edits.with_first(sample)
    assert first.shape.as_list() == [2, 4, 3]
    np.testing.assert_array_equal(first.dense()[:, 0], sample)
    np.testing.assert_array_equal(first.dense()[:, 1:], want)
    np.testing.assert_array_equal(first.unit[:, 0], [-1, 1])


def _model(activation=None):
    """x -> z1 (Bernoulli) -> Dense(activation) -> z2 (Categorical) with costs
    that reach each node through a Dense, a nonlinear op and a second input."""
    x = keras.Input((6,), name="x")
    w = keras.Input((4,), name="w")
    z1 = keras_bpq.Bernoulli(name="z1")(keras.layers.Dense(5, name="enc")(x))
    h = keras.layers.Dense(4, activation=activation, name="mid")(z1)
    z2 = keras_bpq.Categorical(name="z2")(keras.layers.Dense(3, name="logits")(h))
    out = keras.layers.Dense(6, name="dec")(z1)
    recon = keras.ops.sum(keras.ops.square(out - x), axis=-1)
    mixed = keras.ops.sum(keras.ops.tanh(z1 * 2.0), axis=-1) + keras.ops.sum(h * w, axis=-1)
    pick = keras.ops.sum(keras.layers.Dense(2, name="readout")(z2), axis=-1) * keras.ops.sum(z1, axis=-1)
    costs = {"recon": recon, "mixed": mixed, "pick": pick}
    return keras_bpq.BackpropQModel(inputs={"x": x, "w": w}, outputs=out, costs=costs)


@pytest.mark.parametrize("activation", [None, "relu"])
def test_downstream_heads_equal_a_full_rerun(activation):
    keras.utils.set_random_seed(0)
    model = _model(activation)
    model.compile(optimizer="sgd", estimator="critic_cv")
    rng = np.random.RandomState(1)
    data = {"x": tf.constant(rng.randn(7, 6), tf.float32), "w": tf.constant(rng.randn(7, 4), tf.float32)}
    out = model.run_forward(data)
    checked = 0
    for info in model.scg(data).nodes:
        step = out.steps[info.name]
        values = estimators.local_outcomes(step)[0].with_first(step.record.sample)
        exact = tuple(c for c in info.costs if model.known_scg.cost_ancestors[c][-1] == info.name)
        assert model.q_function.downstream_evaluator(info, exact) is not None
        fast = model.q_function.heads(info, data, None, out.records, values)
        context = q_values.context(info, data, out.records)
        slow = model.q_function.rerun_heads(info, data, None, context, values, exact)
        for cost in exact:
            np.testing.assert_allclose(fast[cost], slow[cost], rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked == 3  # recon and mixed at z1, pick at z2


def test_evaluator_skips_what_the_outcomes_do_not_change():
    model = _model()
    model.compile(optimizer="sgd")
    data = {"x": tf.zeros((2, 6)), "w": tf.zeros((2, 4))}
    info = model.scg(data).node("z1")
    evaluator = model.q_function.downstream_evaluator(info, ("recon",))
    ops = {node.operation.name for node in evaluator.plan}
    assert "dec" in ops and "enc" not in ops and "mid" not in ops


def test_evaluator_refuses_costs_that_need_an_unforced_node():
    model = _model()
    model.compile(optimizer="sgd")
    data = {"x": tf.zeros((2, 6)), "w": tf.zeros((2, 4))}
    model.scg(data)
    with pytest.raises(outcomes.Unsupported, match="z2"):
        outcomes.DownstreamEvaluator(
            model.network, keras_bpq.StochasticNode, "z1", [], ("pick",)
        )


def test_critic_first_layer_rank_one_matches_tiled_rows():
    critic = critics_lib.NodeCritic(("a", "b"), feature_dim=3 + 5, hidden_units=(8, 8), name="c")
    rng = np.random.RandomState(0)
    context = {"inputs": tf.constant(rng.randn(4, 3), tf.float32)}
    sample = tf.constant(rng.rand(4, 5) < 0.5, tf.float32)
    unit = tf.tile(tf.range(5)[None], [4, 1])
    edits = outcomes.UnitEdits(sample, unit, 1.0 - 2.0 * sample, (5,)).with_first(sample)
    fast = critic.q_outcomes(context, edits, target=False)
    slow = critics_lib.Critic.q_outcomes(critic, context, edits, target=False)
    assert fast.shape == (4, 6, 2)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)


class _TwoOutputs(keras.layers.Layer):
    """`x -> (tanh(x W), x W)`: an operation with several outputs."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], 4), initializer="glorot_uniform")

    def call(self, x):
        h = keras.ops.matmul(x, self.w)
        return keras.ops.tanh(h), h


def test_dot_with_the_outcomes_and_multi_output_layers_run_downstream(monkeypatch):
    keras.utils.set_random_seed(3)
    x = keras.Input((5,), name="x")
    z1 = keras_bpq.Categorical(name="z1")(keras.layers.Dense(3, name="l1")(x))
    vector, pre = _TwoOutputs(name="two")(keras.layers.Concatenate()([x[:, :2], z1]))
    z2 = keras_bpq.Categorical(name="z2")(keras.layers.Dense(4, name="l2")(pre))
    hit = keras.layers.Dot(axes=-1, name="dot")([z2, vector])
    cost = keras.ops.square(hit[:, 0] - 0.3) + keras.ops.sum(vector, axis=-1)
    model = keras_bpq.BackpropQModel(inputs=x, outputs=z2, costs={"cost": cost})
    model.compile(optimizer="sgd", estimator="critic_cv")
    data = tf.constant(np.random.RandomState(0).randn(6, 5), tf.float32)
    out = model.run_forward(data)
    info = model.scg(data).node("z2")
    evaluator = model.q_function.downstream_evaluator(info, ("cost",))
    assert evaluator is not None
    assert {"two", "dot"} <= {node.operation.name for node in evaluator.plan}
    step = out.steps["z2"]
    values = estimators.local_outcomes(step)[0].with_first(step.record.sample)
    with monkeypatch.context() as patch:  # the Dot is one gather: no [batch, A, K] outcomes
        patch.setattr(outcomes.UnitEdits, "dense", lambda self: pytest.fail("outcomes densified"))
        fast = model.q_function.heads(info, data, None, out.records, values)["cost"]
    context = q_values.context(info, data, out.records)
    slow = model.q_function.rerun_heads(info, data, None, context, values, ("cost",))["cost"]
    assert fast.shape == (6, 5)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)
    # The sample's own row is the realised cost.
    np.testing.assert_allclose(fast[:, 0], out.costs["cost"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("distinct", [False, True])
def test_all_outcomes_critic_matches_tiled_rows(distinct):
    keras.utils.set_random_seed(0)
    k, heads = 5, ("a", "b")
    scores = keras.Sequential([keras.layers.Dense(8, activation="relu"), keras.layers.Dense(k * len(heads))])
    network = critics_lib.AllOutcomes(scores, k, distinct=distinct)
    critic = critics_lib.NodeCritic(heads, feature_dim=3 + k, network=network, name="c")
    rng = np.random.RandomState(0)
    context = {"inputs": tf.constant(np.repeat(rng.randn(3, 3), 2, axis=0), tf.float32)}
    sample = tf.one_hot(rng.randint(k, size=6), k)
    unit = tf.tile(tf.range(k)[None], [6, 1])
    edits = outcomes.UnitEdits(tf.zeros([6, k]), unit, tf.ones([6, k]), (k,)).with_first(sample)
    fast = critic.q_outcomes(context, edits, target=False)
    slow = critics_lib.Critic.q_outcomes(critic, context, edits, target=False)
    assert fast.shape == (6, k + 1, 2)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(critic.q_outcomes(context, edits.dense(), target=False), slow, rtol=1e-5, atol=1e-6)
    # Row k of the network's output is Q(e_k); the sample's row is q(context, sample).
    table = scores(context["inputs"]).numpy().reshape(6, k, 2)
    np.testing.assert_allclose(fast[:, 1:], table, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast[:, 0], critic.q(context, sample, target=False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("width", [784, 200, 7, 17])
def test_softplus_sum_equals_a_sum_of_softplus(width, dtype):
    rng = np.random.RandomState(width)
    pre = rng.randn(3, 5, width) * 10.0
    pre[0, 0, :4] = [np.inf, -np.inf, 100.0, -100.0]
    want = np.sum(np.logaddexp(0.0, pre), axis=-1)
    got = outcomes.softplus_sum(tf.constant(pre, dtype))
    assert got.dtype == dtype and got.shape == (3, 5)
    np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=1e-6)
    assert np.isinf(got[0, 0]) and np.isfinite(got[1:]).all()


@pytest.mark.parametrize("scale", [0.5, 20.0])
@pytest.mark.parametrize("steps", [True, False])
def test_softplus_of_a_rank_one_update_sums_like_its_values(scale, steps, monkeypatch):
    """Flips of +-1 with moderate weights take the tables of exp(+-K); larger
    weights or other changes take `softplus_sum` of the values; both equal
    the sum of softplus entry by entry."""
    rng = np.random.RandomState(3)
    base = (rng.rand(4, 5) < 0.5).astype(np.float32)
    unit = np.tile(np.arange(-1, 5), [4, 1]).astype(np.int32)
    change = np.concatenate([np.zeros([4, 1]), 1.0 - 2.0 * base], axis=1).astype(np.float32)
    if not steps:
        change[:, 1:] *= 1.5
    edits = outcomes.UnitEdits(tf.constant(base), tf.constant(unit), tf.constant(change), (5,))
    dense = keras.layers.Dense(48)
    dense.build((None, 5))
    dense.kernel.assign(rng.randn(5, 48).astype(np.float32) * scale)
    dense.bias.assign(rng.randn(48).astype(np.float32))
    lazy = outcomes.Affine.of(edits).dense_layer(dense).scaled(-1.0).with_softplus()
    assert isinstance(lazy.softplus[0][1], outcomes.Affine)  # not materialised
    values = base[:, None, :] + change[..., None] * np.eye(5, dtype=np.float32)[np.maximum(unit, 0)]
    pre = -(values @ dense.kernel.numpy() + dense.bias.numpy())
    want = np.sum(np.logaddexp(0.0, pre), axis=-1)
    entrywise, softplus_sum = [], outcomes.softplus_sum
    with monkeypatch.context() as patch:
        patch.setattr(outcomes, "softplus_sum", lambda p: entrywise.append(p) or softplus_sum(p))
        np.testing.assert_allclose(lazy.sum(), want, rtol=1e-5)  # eagerly: only the branch taken runs
    assert bool(entrywise) == (not steps or scale > 1.0)
    np.testing.assert_allclose(tf.function(lambda: lazy.sum(), jit_compile=True)(), want, rtol=1e-5)


def _likelihood_model():
    """A Bernoulli node whose costs reach it through linear operations, softplus
    and sums: a Bernoulli log-likelihood of a Dense decoder, a linear chain of
    Dense layers, the node's own log-probability, and a max (not affine)."""
    x = keras.Input((6,), name="x")
    q = keras.layers.Dense(5, name="enc")(x)
    z = keras_bpq.Bernoulli(name="z")(q)
    logits = keras.layers.Dense(6, name="dec")(z)
    h = keras.layers.Dense(3, name="h2")(keras.layers.Dense(4, name="h1")(z))
    costs = {
        "recon": -keras.ops.sum(x * logits - keras.ops.softplus(logits), axis=-1),
        "chain": keras.ops.sum(2.0 * h + h - keras.ops.softplus(0.5 - h), axis=-1, keepdims=True),
        "prior": keras.ops.sum(z * q - keras.ops.softplus(q), axis=-1),
        "peak": keras.ops.max(logits, axis=-1),
    }
    return keras_bpq.BackpropQModel(inputs=x, outputs=logits, costs=costs)


@pytest.mark.parametrize("units", [None, 2])
def test_affine_heads_equal_a_full_rerun_without_rows_of_outcomes(units, monkeypatch):
    """Every flip (more outcomes than units: sums from matmuls over the units)
    and two drawn flips (fewer: from the outcomes' own kernel rows)."""
    keras.utils.set_random_seed(1)
    model = _likelihood_model()
    model.compile(optimizer="sgd", estimator="critic_cv")
    data = tf.constant(np.random.RandomState(2).rand(7, 6) < 0.5, tf.float32)
    out = model.run_forward(data)
    info = model.scg(data).node("z")
    step = out.steps["z"]
    values = estimators.local_outcomes(step, units)[0].with_first(step.record.sample)
    affine = ("recon", "chain", "prior")
    run_on_rows = outcomes.call_on_rows

    def per_example_rows_only(node, values_, num, training):
        # Only [batch, A] scalars (the sums) reach a re-run on rows.
        assert all(len(t.shape) <= 1 for t in node.input_tensors), node.operation.name
        return run_on_rows(node, values_, num, training)

    with monkeypatch.context() as patch:
        patch.setattr(outcomes, "call_on_rows", per_example_rows_only)
        fast = model.q_function.downstream_evaluator(info, affine)(data, {}, values)
    fast.update(model.q_function.downstream_evaluator(info, ("peak",))(data, {}, values))
    slow = model.q_function.rerun_heads(info, data, None, {"inputs": data}, values, affine + ("peak",))
    for cost in affine + ("peak",):
        assert fast[cost].shape == (7, 6 if units is None else units + 1)
        np.testing.assert_allclose(fast[cost], slow[cost], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(fast[cost][:, 0], out.costs[cost], rtol=1e-5, atol=1e-5)


def test_unit_edits_with_several_edits_per_outcome():
    """Outcome `a` is `base + sum_e change[a, e] e_{unit[a, e]}`: dense values,
    a linear map, a contraction and a first outcome agree with that sum."""
    rng = np.random.RandomState(4)
    base = tf.constant([[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]])
    unit = tf.constant([[[0, 1], [2, 3], [-1, -1]], [[1, 0], [3, -1], [2, 3]]])
    change = tf.constant([[[1.0, -1.0], [1.0, -1.0], [0.0, 0.0]], [[1.0, -1.0], [-1.0, 0.0], [1.0, -1.0]]])
    edits = outcomes.UnitEdits(base, unit, change, (2, 2))
    assert not edits.one_edit and outcomes.Affine.of(edits) is None
    want = base.numpy()[:, None] + np.sum(
        change.numpy()[..., None] * (np.eye(4)[unit.numpy()] * (unit.numpy() >= 0)[..., None]), axis=2)
    np.testing.assert_array_equal(edits.dense(), want.reshape(2, 3, 2, 2))
    kernel = tf.constant(rng.randn(4, 5), tf.float32)
    offset = tf.matmul(base, kernel) + 0.5
    np.testing.assert_allclose(edits.linear(kernel, offset), want @ kernel.numpy() + 0.5, rtol=1e-5, atol=1e-6)
    table = tf.constant(rng.randn(2, 4, 3), tf.float32)
    contracted = np.einsum("bau,buo->bao", want, table.numpy())
    np.testing.assert_allclose(edits.contract(table), contracted, rtol=1e-5, atol=1e-6)
    sample = tf.constant([[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]])  # one unit from base, or none
    first = edits.with_first(tf.reshape(sample, [2, 2, 2]))
    assert first.unit.shape == (2, 4, 2)
    np.testing.assert_array_equal(first.dense()[:, 0], tf.reshape(sample, [2, 2, 2]))
    np.testing.assert_array_equal(first.dense()[:, 1:], want.reshape(2, 3, 2, 2))


def test_edits_of_every_unit_in_order_contract_without_a_gather():
    """`UnitEdits.each_unit` (a categorical node's outcomes, every flip of a
    Bernoulli layer): its contraction, with a first outcome or not and under
    XLA, equals that of the same edits read by a gather, and the dense sum."""
    rng = np.random.RandomState(5)
    base = tf.constant(rng.randint(2, size=(3, 4)), tf.float32)
    ordered = outcomes.UnitEdits.each_unit(base, 1.0 - 2.0 * base, (4,))
    plain = outcomes.UnitEdits(base, ordered.unit, ordered.change, (4,))
    np.testing.assert_array_equal(ordered.unit, np.tile(np.arange(4), [3, 1]))
    assert ordered.ordered == 0 and plain.ordered is None
    sample = base.numpy().copy()
    sample[0, 2] = 1.0 - sample[0, 2]  # one unit from base, or none
    table = tf.constant(rng.randn(3, 4, 2), tf.float32)
    xla = tf.function(lambda edits: edits.contract(table), jit_compile=True)
    for fast, slow in ((ordered, plain), (ordered.with_first(sample), plain.with_first(sample))):
        want = np.einsum("bau,buo->bao", slow.dense(), table.numpy())
        np.testing.assert_allclose(slow.contract(table), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fast.contract(table), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(xla(fast), want, rtol=1e-5, atol=1e-6)
    assert ordered.with_first(sample).ordered == 1
    with pytest.raises(ValueError, match="one per unit in order"):
        outcomes.UnitEdits(base, ordered.unit[:, :3], ordered.change[:, :3], (4,), ordered=0)


def test_factorised_categorical_outcomes_set_one_choice_at_a_time():
    """A Categorical node of independent choices (logits `[batch, 2, 3]`): its
    local outcomes are the sample with one choice set to each of its other
    outcomes, weighted by their probabilities (zero where masked), the sample
    weighted by the sum of its choices' probabilities; the critic's rank-one
    first layer and the exact heads agree with evaluations on rows."""
    model, x = graphs.factorised_categorical()
    model.compile(optimizer="sgd", estimator="critic_cv")
    data = tf.constant(np.repeat(x, 8, axis=0))
    out = model.run_forward(data)
    info = model.scg(data).node("g")
    step = out.steps["g"]
    local = estimators.local_outcomes(step)
    values = local.values.with_first(step.record.sample)
    dense = values.dense().numpy()
    sample = step.record.sample.numpy()
    probs = tf.nn.softmax(model.node_layer(info).distribution(step.record.params, step.record.mask).logits).numpy()
    assert dense.shape == (24, 1 + 2 * 2, 2, 3)
    np.testing.assert_array_equal(dense[:, 0], sample)
    for b in range(24):
        chosen = sample[b].argmax(-1)
        wanted = []
        for i in range(2):
            for k in range(3):
                if k != chosen[i]:
                    outcome = sample[b].copy()
                    outcome[i] = np.eye(3)[k]
                    wanted.append((outcome, probs[b, i, k]))
        np.testing.assert_array_equal(dense[b, 1:], [o for o, _ in wanted])
        np.testing.assert_allclose(local.weights[b], [p for _, p in wanted], rtol=1e-6)
        np.testing.assert_allclose(local.current[b], probs[b, [0, 1], chosen].sum(), rtol=1e-6)
    np.testing.assert_allclose(np.sum(local.weights, 1) + local.current, 2.0, rtol=1e-6)
    masked = ~step.record.mask.numpy()
    assert masked.any() and np.all(probs[masked] == 0)
    context = q_values.context(info, data, out.records)
    critic = model.training_state.critics["g"]
    fast = critic.q_outcomes(context, values, target=False)
    slow = critics_lib.Critic.q_outcomes(critic, context, values, target=False)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)
    exact = model.q_function.heads(info, data, None, out.records, values)["cost_g"]
    rerun = model.q_function.rerun_heads(info, data, None, context, values, ("cost_g",))["cost_g"]
    np.testing.assert_allclose(exact, rerun, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(exact[:, 0], out.costs["cost_g"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("outcomes_per_row", [2, 6])
@pytest.mark.parametrize("known_batch", [True, False])
def test_softplus_of_a_few_flips_skips_the_tables(outcomes_per_row, known_batch, monkeypatch):
    """The tables of exp(+-K) serve only where `batch A > 2 U` (they cost `2 U`
    rows of exponentials): fewer rows take `softplus_sum` of the values, decided
    when tracing where the batch size is known and by a `tf.cond` where it is
    not; every way equals the sum of softplus entry by entry."""
    rng = np.random.RandomState(4)
    base = (rng.rand(4, 5) < 0.5).astype(np.float32)
    unit = np.tile(np.arange(-1, outcomes_per_row - 1), [4, 1]).astype(np.int32)
    change = np.where(unit >= 0, 1.0 - 2.0 * np.take_along_axis(base, np.maximum(unit, 0), 1), 0.0)
    change = change.astype(np.float32)
    dense = keras.layers.Dense(48)
    dense.build((None, 5))
    dense.kernel.assign(rng.randn(5, 48).astype(np.float32) * 0.5)
    dense.bias.assign(rng.randn(48).astype(np.float32))
    values = base[:, None, :] + change[..., None] * np.eye(5, dtype=np.float32)[np.maximum(unit, 0)]
    pre = -(values @ dense.kernel.numpy() + dense.bias.numpy())
    want = np.sum(np.logaddexp(0.0, pre), axis=-1)

    def total(base, unit, change):
        edits = outcomes.UnitEdits(base, unit, change, (5,))
        return outcomes.Affine.of(edits).dense_layer(dense).scaled(-1.0).with_softplus().sum()

    batch = 4 if known_batch else None
    signature = [
        tf.TensorSpec([batch, 5], tf.float32),
        tf.TensorSpec([batch, outcomes_per_row], tf.int32),
        tf.TensorSpec([batch, outcomes_per_row], tf.float32),
    ]
    entrywise, softplus_sum = [], outcomes.softplus_sum
    with monkeypatch.context() as patch:
        patch.setattr(outcomes, "softplus_sum", lambda p: entrywise.append(p) or softplus_sum(p))
        traced = tf.function(total, input_signature=signature).get_concrete_function()
    # Traced: a cond between the tables and the values, unless a known batch
    # has few rows (then the values only).
    conds = [op for op in traced.graph.get_operations() if op.type in ("If", "StatelessIf")]
    few = 4 * outcomes_per_row <= 2 * 5
    assert bool(conds) == (not (known_batch and few))
    assert entrywise
    for jit in (False, True):
        got = tf.function(total, input_signature=signature, jit_compile=jit)(base, unit, change)
        np.testing.assert_allclose(got, want, rtol=1e-5)
