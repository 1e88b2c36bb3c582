"""Backprop-Q critics: oracle-exact estimators, critic learning, cost routing."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import graphs
import keras_bpq
from keras_bpq import diagnostics
from keras_bpq import q_values
from keras_bpq import targets as targets_lib
from test_gradients import assert_unbiased


def oracle_critics(model):
    """An exact critic for every node that has inexact heads."""
    scg = model.scg()
    heads = targets_lib.inexact_heads(scg)
    return {n: diagnostics.ExactCritic(model, n) for n in scg.node_names if heads[n]}


@pytest.mark.parametrize("name", sorted(graphs.ALL))
def test_critic_estimator_with_oracle_critics_is_unbiased(name):
    model, x = graphs.ALL[name]()
    model.compile(estimator="reinforce")  # discover the graph, then inject oracles
    estimator = {n: "critic" for n in model.scg().node_names if n != "n"}
    model.compile(estimator=estimator, critics=oracle_critics(model))
    assert_unbiased(model, x, num_draws=1000)


def test_critic_estimator_with_oracle_critics_is_unbiased_under_xla():
    model, x = graphs.dag()
    model.compile(estimator="reinforce")
    model.compile(estimator="critic", critics=oracle_critics(model), jit_compile=True)
    assert_unbiased(model, x, num_draws=1000)


def test_pathwise_with_oracle_critic_is_unbiased():
    model, x = graphs.mixed()
    model.compile(estimator="reinforce")
    model.compile(estimator={"n": "pathwise"}, critics=oracle_critics(model))
    assert model.node_estimators["n"].name == "pathwise"
    assert_unbiased(model, x, num_draws=1000)


def test_critic_estimator_with_a_wrong_critic_is_biased_and_critic_cv_is_not():
    """The reason critic_cv is the default: a wrong critic steers `critic` wrong."""
    model, x = graphs.chain()
    model.compile(estimator="critic")
    exact = diagnostics.exact_gradients(model, x)
    draws = diagnostics.estimate_gradients(model, x, num_draws=1000)
    z = [np.abs(d.mean(0) - e) / (d.std(0, ddof=1) / np.sqrt(len(d)) + 1e-7) for d, e in zip(draws, exact)]
    assert max(v.max() for v in z) > 8  # untrained critic: clearly biased
    model2, _ = graphs.chain()
    model2.compile(estimator="critic_cv")
    assert_unbiased(model2, x, num_draws=1000)


def learned_vs_exact(model, x, rows=400):
    """Relative MSE of each learned critic against the exact Q on fresh samples."""
    oracles = oracle_critics(model)
    data = tf.constant(np.repeat(x, rows // len(x), axis=0))
    out = model.run_forward(data)
    errors = {}
    for name, critic in model.training_state.learned_critics.items():
        info = model.scg().node(name)
        context = q_values.context(info, data, out.records)
        sample = out.records[name].sample
        learned = critic.q(context, sample, target=False).numpy()
        exact = oracles[name].q(context, sample).numpy()
        errors[name] = float(np.mean((learned - exact) ** 2) / np.var(exact))
    return errors


@pytest.mark.parametrize("target", ["mc", "td", "lambda", "expected"])
@pytest.mark.parametrize("name", ["chain", "dag"])
def test_learned_critics_converge_to_exact_q(name, target):
    model, x = graphs.ALL[name]()
    model.compile(
        optimizer=keras.optimizers.SGD(0.0),  # hold the policy fixed
        critic_optimizer=keras.optimizers.Adam(3e-3),
        estimator="critic_cv",  # learned heads (auto serves most by common noise)
        critic_target=target,
        critic_hidden_units=(32,),
        tau=0.05,
        steps_per_execution=50,
    )
    # 600 steps of 96 rows in one epoch: 12 calls of 50 steps, not 300 epochs of 2.
    model.fit(np.repeat(x, 64 * 300, axis=0), batch_size=96, epochs=1, verbose=0)
    errors = learned_vs_exact(model, x)
    assert errors and max(errors.values()) < 0.05, errors


def test_per_cost_routing_is_unbiased_where_summing_successors_double_counts():
    model, x = graphs.dag()
    model.compile(estimator="critic_cv")
    oracles = oracle_critics(model)
    data = tf.constant(np.repeat(x, 3000, axis=0))
    out = model.run_forward(data)
    records = out.records
    scg = model.scg()

    def exact_q(name):
        info = scg.node(name)
        heads = model.q_function.heads(info, data, None, records, records[name].sample[:, None], target=True)
        return heads["cost"][:, 0].numpy()

    model.training_state.critics.update(oracles)  # q_heads reads the oracles
    q1, q2, q3 = exact_q("z1"), exact_q("z2"), exact_q("z3")
    q_at_sample = {
        "z2": {"cost": tf.constant(q2)},
        "z3": {"cost": tf.constant(q3)},
        "z4": {"cost": out.costs["cost"]},
    }
    targets = targets_lib.critic_targets("td", scg, out.costs, q_at_sample)
    ours = targets[("z1", "cost")].numpy()  # routed along the chain z1 -> z2 -> z3 -> z4
    naive = q2 + q3  # "sum the successors' Q": z1's successors are z2 and z3
    z1 = records["z1"].sample.numpy()[:, 0]
    example = np.repeat(np.arange(len(x)), 3000)
    for e in range(len(x)):
        for value in (0.0, 1.0):
            rows = (example == e) & (z1 == value)
            if rows.sum() < 100:
                continue
            truth = q1[rows][0]
            se = ours[rows].std() / np.sqrt(rows.sum()) + 1e-6
            assert abs(ours[rows].mean() - truth) < 4 * se + 1e-4
            assert abs(naive[rows].mean() - truth) > 10 * se


def test_every_critic_trains_under_xla():
    model, x = graphs.dag()
    model.compile(jit_compile=True, critic_optimizer=keras.optimizers.Adam(1e-2), estimator="critic_cv")
    model.build_training_state()
    before = [v.numpy().copy() for v in model.critic_variables]
    assert len(model.training_state.learned_critics) == 3  # z1, z2, z3 have learned heads
    model.fit(np.repeat(x, 8, axis=0), batch_size=8, epochs=3, verbose=0)
    for old, var in zip(before, model.critic_variables):
        assert not np.allclose(old, var.numpy()), var.path


def test_warmup_trains_only_critics_and_period_copies_targets():
    model, x = graphs.chain()
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        estimator="critic_cv",
        critic_warmup_steps=3,
        target_update_period=2,
        critic_steps=2,
    )
    actor = [v.numpy().copy() for v in model.actor_variables]
    model.fit(np.repeat(x, 2, axis=0), batch_size=6, epochs=3, verbose=0)
    for old, var in zip(actor, model.actor_variables):
        np.testing.assert_array_equal(old, var.numpy())
    assert len(model.training_state.learned_critics) == 2  # z1, z2
    for critic in model.training_state.learned_critics.values():
        # 3 steps: copies after steps 2 (steps counter 2): target == online after step 2,
        # the online copy moved again at step 3.
        assert not all(
            np.allclose(t.numpy(), o.numpy())
            for t, o in zip(critic.target_network.weights, critic.online.weights)
        )
    model.fit(np.repeat(x, 2, axis=0), batch_size=6, epochs=1, verbose=0)
    assert not np.allclose(actor[0], model.actor_variables[0].numpy())


def changed(before, variables):
    return any(not np.array_equal(b, v.numpy()) for b, v in zip(before, variables))


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_critic_update_period_trains_the_critics_every_kth_step(jit_compile):
    """critic_update_period=3 after 2 warm-up steps: the critics train on every
    warm-up step, then on the steps whose counter is a multiple of 3; the actor
    trains every step after the warm-up, the target copies follow the online
    critics every step, and the critics' metrics average the steps that
    trained them."""
    keras.utils.set_random_seed(0)
    model, x = graphs.chain()
    model.compile(optimizer=keras.optimizers.Adam(0.05), critic_optimizer=keras.optimizers.Adam(0.01),
                  estimator="critic_cv", critic_update_period=3, critic_warmup_steps=2, jit_compile=jit_compile)
    model.build_training_state()
    targets = [w for c in model.training_state.learned_critics.values() for w in c.target_network.weights]
    trained, acted, followed = [], [], []
    for _ in range(8):
        before = [[v.numpy().copy() for v in vs] for vs in (model.critic_variables, model.actor_variables, targets)]
        model.train_on_batch(np.repeat(x, 2, axis=0))
        trained.append(changed(before[0], model.critic_variables))
        acted.append(changed(before[1], model.actor_variables))
        followed.append(changed(before[2], targets))
    assert trained == [True, True, False, True, False, False, True, False]
    assert acted == [False, False, True, True, True, True, True, True]
    assert all(followed)
    assert int(model.critic_optimizer.iterations.numpy()) == 4
    # One epoch of 6 steps (counter 8 to 13): the critics train at 9 and 12.
    model.fit(np.repeat(x, 12, axis=0), batch_size=6, epochs=1, verbose=0)
    for metrics in model.training_state.critic_metrics.values():
        assert [float(m.count.numpy()) for m in metrics] == [2.0, 2.0, 2.0]
    assert int(model.critic_optimizer.iterations.numpy()) == 6


def test_critic_cv_trained_on_a_period_stays_unbiased_under_xla():
    """A critic trained every third step is in whatever state that leaves it;
    `critic_cv` reads it as a control variate and stays unbiased."""
    keras.utils.set_random_seed(1)
    model, x = graphs.dag()
    model.compile(optimizer=keras.optimizers.Adam(0.02), critic_optimizer=keras.optimizers.Adam(0.01),
                  estimator="critic_cv", critic_update_period=3, jit_compile=True)
    model.fit(np.repeat(x, 40, axis=0), batch_size=8, epochs=1, verbose=0)
    steps = int(model.training_state.steps.numpy())
    assert steps >= 15 and int(model.critic_optimizer.iterations.numpy()) == (steps + 2) // 3
    assert_unbiased(model, x, num_draws=1000)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_critic_update_period_must_be_a_positive_integer(bad):
    model, _ = graphs.chain()
    with pytest.raises(ValueError, match="critic_update_period must be an integer of at least 1"):
        model.compile(estimator="critic_cv", critic_update_period=bad)


def test_summary_shows_learned_and_exact_heads():
    model, x = graphs.two_costs()
    model.compile(estimator="critic_cv")
    text = model.scg_summary(print_fn=lambda s: None)
    assert "learned[far]" in text and "exact[near]" in text and "exact[far]" in text


def test_estimator_node_mismatch_fails_at_compile():
    model, _ = graphs.mixed()
    with pytest.raises(ValueError, match="'critic_cv' cannot serve node 'n'"):
        model.compile(estimator={"n": "critic_cv"})
    model, _ = graphs.chain()
    with pytest.raises(ValueError, match="'pathwise' cannot serve node 'z1'"):
        model.compile(estimator="pathwise")
    with pytest.raises(ValueError, match="unknown nodes"):
        model.compile(critics={"nope": keras.Sequential([keras.layers.Dense(1)])})
        model.build_training_state()  # critics are created on first use


def test_user_critic_model_must_match_heads():
    model, x = graphs.two_costs()
    model.compile(estimator="critic_cv", critics={"z1": keras.Sequential([keras.layers.Dense(3)])})
    with pytest.raises(ValueError, match="must output 1 heads"):
        model.build_training_state()


def learning_curve(estimator, seed, checkpoints=6, steps_each=25):
    keras.utils.set_random_seed(seed)
    model, queries = graphs.walk_task(seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(0.03), estimator=estimator, steps_per_execution=25)
    curve = []
    # Every step one batch of all the queries: `steps_each` of them per call.
    data = np.tile(queries, (steps_each, 1))
    for _ in range(checkpoints):
        model.fit(data, batch_size=len(queries), shuffle=False, verbose=0)
        curve.append(diagnostics.exact_gradients(model, queries, return_objective=True)[1])
    return np.array(curve)


@pytest.mark.parametrize("seed", [0, 1])
def test_default_estimator_learns_a_masked_walk_at_least_as_fast_as_reinforce(seed):
    default = learning_curve("auto", seed)
    reinforce = learning_curve("reinforce", seed)
    # Exact expected miss rate at 25, 50, ..., 150 steps: lower area = faster.
    assert default[-1] < 0.25 and reinforce[-1] < 0.35, (default, reinforce)
    assert default.sum() <= reinforce.sum(), (default, reinforce)


def test_masked_actions_are_never_sampled_and_get_no_gradient():
    model, queries = graphs.walk_task()
    model.compile()
    out = model.run_forward(np.repeat(queries, 20, axis=0))
    for name in ("hop1", "hop2"):
        record = out.records[name]
        allowed = record.mask.numpy()
        assert np.all(allowed[record.sample.numpy() > 0])
    # Queries from one start entity: its non-neighbours' logits get no gradient.
    start = queries[0, :10]
    same_start = queries[(queries[:, :10] == start).all(axis=1)]
    masked = (start @ graphs.walk_adjacency(0)) == 0
    assert masked.any()
    for grads in (
        diagnostics.estimate_gradients(model, same_start, num_draws=50),
        [g[None] for g in diagnostics.exact_gradients(model, same_start)],
    ):
        bias = [g for g, v in zip(grads, model.actor_variables) if v.path == "policy1/bias"][0]
        assert np.abs(bias[:, ~masked]).max() > 0
        np.testing.assert_array_equal(bias[:, masked], 0.0)


def test_context_override_that_breaks_r2_is_reported_at_compile():
    model, x = graphs.dag()
    # z4's cost depends on z2 (directly and through z4): leaving it out breaks R1/R2.
    with pytest.raises(ValueError, match=r"node 'z4' breaks R1/R2.*\['z2'\]"):
        model.compile(contexts={"z4": ["inputs", "z1", "z3"]})
    with pytest.raises(ValueError, match="only 'inputs' and samples computed before"):
        model.compile(contexts={"z2": ["inputs", "z4"]})
    # Adding a value is safe; the critic then sees it.
    model, x = graphs.two_costs()
    model.compile(contexts={"z1": ["inputs"], "z2": ["inputs", "z1"]})
    assert model.scg(x).node("z2").context == ("inputs", "z1")
    model.fit(x, epochs=1, verbose=0)


def all_outcomes_critic(num_entities=10, distinct=False):
    """A DQN-style critic for the walk's first hop: context -> Q of every entity."""
    scores = keras.Sequential(
        [keras.layers.Dense(32, activation="relu"), keras.layers.Dense(num_entities)], name="scores"
    )
    return keras_bpq.critics.AllOutcomes(scores, num_entities, distinct=distinct, name="hop1_q")


def least_allowed_probability(model, x, repeats=400):
    """The smallest probability of an allowed outcome of either hop of the
    walk, over `repeats` draws of every row of `x` (hop 2's depends on hop 1's draw)."""
    records = model.record_forward(np.repeat(x, repeats, axis=0)).records
    least = 1.0
    for record in (records["hop1"], records["hop2"]):
        probs = np.asarray(record.layer.distribution(record.params, record.mask).probs_parameter())
        least = min(least, float(probs[probs > 0].min()))  # a masked outcome's p is exactly 0
    return least


@pytest.mark.parametrize("distinct", [False, True])
def test_critic_cv_with_an_all_outcomes_critic_is_unbiased(distinct):
    model, queries = graphs.walk_task()
    x = queries[::7]
    model.compile(estimator="critic_cv", critics={"hop1": all_outcomes_critic(distinct=distinct)}, num_samples=2)
    model.build_training_state()
    critic = model.training_state.critics["hop1"]
    assert isinstance(critic.target_network, keras_bpq.critics.AllOutcomes)
    # A critic far from the exact Q (the control variate must not bias the gradient).
    for variable in critic.target_network.weights:
        variable.assign(tf.random.normal(variable.shape, stddev=1.0, seed=7))
    # A policy whose every allowed outcome is drawn often in an example's
    # 2 x 1000 draws: the z-test needs it. At the initial weights hop 1 of
    # row 2 has an outcome of p = 7e-4, which all 2000 draws miss in about a
    # quarter of seed streams, TFP's sampler's as the Gumbel-max one's. Then
    # every draw gives that logit the same gradient (the local expectation's
    # p_k (Q_k - V); the two draws' leave-one-out residuals sum to zero): the
    # estimate has no spread and lacks the outcome's share, |z| ~ 6000.
    for name in ("policy1", "policy2"):
        for variable in model.get_layer(name).weights:
            variable.assign(0.5 * variable)
    assert least_allowed_probability(model, x) > 0.01
    assert_unbiased(model, x, num_draws=1000)


def test_all_outcomes_critic_learns_exact_q_and_round_trips():
    model, queries = graphs.walk_task()
    model.compile(
        optimizer=keras.optimizers.SGD(0.0),  # hold the policy fixed
        critic_optimizer=keras.optimizers.Adam(3e-3),
        critics={"hop1": all_outcomes_critic(distinct=True)},
        tau=0.05,
        steps_per_execution=50,
    )
    before = learned_vs_exact(model, queries)["hop1"]
    batch = np.repeat(queries, 4, axis=0)  # repeated contexts: `distinct` evaluates each once
    # 400 steps of that batch, 50 per call.
    model.fit(np.tile(batch, (400, 1)), batch_size=len(batch), shuffle=False, verbose=0)
    after = learned_vs_exact(model, queries)["hop1"]
    assert after < 0.1 and after < before / 5, (before, after)
    critic = model.training_state.critics["hop1"]
    clone = keras_bpq.critics.NodeCritic.from_config(critic.get_config())
    clone.online.set_weights(critic.online.get_weights())
    context = {"inputs": tf.constant(queries)}
    sample = tf.one_hot(np.arange(len(queries)) % 10, 10)
    np.testing.assert_allclose(clone.q(context, sample, target=False), critic.q(context, sample, target=False))
    assert clone.online.distinct and clone.online.num_outcomes == 10


def test_distinct_all_outcomes_critic_evaluates_once_per_group_or_every_row_under_xla():
    """`distinct=True` evaluates once per distinct context (a `tf.unique`)
    without XLA; under XLA, whose static shapes would pad the unique rows to
    the batch, it evaluates every row; rows known to come in groups of equal
    rows (`repeats`), once per group, with and without XLA. The scores are
    the same every way."""
    network = all_outcomes_critic(distinct=True)
    context = tf.constant(np.repeat(np.random.default_rng(0).normal(size=(3, 5)), 4, axis=0), tf.float32)
    network.build((None, 5 + network.num_outcomes))  # the context's 5 features, then the node's value
    graphs_of = {}
    for jit in (False, True):
        for repeats in (1, 4):
            scores = functools.partial(network.scores, repeats=repeats)
            function = tf.function(scores, jit_compile=jit).get_concrete_function(context)
            graphs_of[jit, repeats] = {op.type for op in function.graph.get_operations()}
            np.testing.assert_allclose(
                function(context), all_outcomes_critic_scores(network, context), rtol=1e-5, atol=1e-6
            )
    assert "UniqueV2" in graphs_of[False, 1] and "UniqueV2" not in graphs_of[True, 1]
    # Rows in groups of 4 equal rows: the first of each group, evaluated and repeated.
    assert not any("UniqueV2" in graphs_of[jit, 4] for jit in (False, True))


def test_a_training_pass_reads_a_distinct_critic_once_per_group(monkeypatch):
    """Under `num_samples=4` hop 1's context rows (the inputs alone) come in
    groups of 4 equal rows: the estimator's reads of the critic's target copy,
    the targets and the critic's loss evaluate the critic's network on one
    row per group (`of_pass`), under XLA (where reading rows as they are
    evaluates every row) and without it (no `tf.unique`), and give what
    reading every row gives."""
    model, queries = graphs.walk_task()
    model.compile(estimator="critic_cv", critics={"hop1": all_outcomes_critic(distinct=True)}, num_samples=4)
    model.build_training_state(queries)
    critic = model.training_state.critics["hop1"]
    rows_seen = []
    for network in (critic.online.network, critic.target_network.network):
        monkeypatch.setattr(network, "call", counting_rows(network.call, rows_seen))

    def read_critics():
        forward = model.run_forward(queries)  # the estimators read the target copy
        model.critic_set().evaluate(forward, with_gradient=True)  # the targets and the loss
        return forward

    traced = tf.function(lambda: read_critics().total, jit_compile=True)
    traced.get_concrete_function()  # traced only: static row counts
    assert rows_seen and set(rows_seen) == {len(queries)}, rows_seen
    graph = tf.function(lambda: read_critics().total).get_concrete_function().graph
    assert "UniqueV2" not in {op.type for op in graph.get_operations()}
    forward = read_critics()
    info, records = model.known_scg.node("hop1"), forward.records
    values = tf.tile(tf.eye(10)[None], [4 * len(queries), 1, 1])
    heads = {
        of_pass: model.q_function.heads(info, forward.x, forward.y, records, values, of_pass=of_pass)["miss"]
        for of_pass in (True, False)
    }
    np.testing.assert_allclose(heads[True], heads[False], rtol=1e-5, atol=1e-6)
    at_sample = {
        of_pass: targets_lib.evaluate(
            "expected", 0.0, model.known_scg, forward.costs, records, model.training_state.critics,
            model.q_function, forward.x, forward.y, of_pass=of_pass,
        )[1]["hop1"]["miss"]
        for of_pass in (True, False)
    }
    np.testing.assert_allclose(at_sample[True], at_sample[False], rtol=1e-5, atol=1e-6)


def counting_rows(call, rows_seen):
    """`call`, appending the row count of its inputs to `rows_seen` first."""

    def counted(inputs, *args, **kwargs):
        rows_seen.append(inputs.shape[0])
        return call(inputs, *args, **kwargs)

    return counted


def all_outcomes_critic_scores(network, context):
    """`network`'s scores of every row of `context`, each row evaluated."""
    return tf.reshape(network.network(context), [context.shape[0], network.num_outcomes, -1])


@pytest.mark.parametrize("jit_compile", [False, True])
def test_distinct_all_outcomes_critic_trains_alike(jit_compile):
    """`distinct=True` trains exactly like `distinct=False`, with and without
    XLA: under `num_samples=4` hop 1's context (the inputs alone) comes in
    groups of 4 equal rows, whose first row the critic's loss evaluates."""
    weights = {}
    for distinct in (False, True):
        keras.utils.set_random_seed(0)
        model, queries = graphs.walk_task()
        model.compile(estimator="critic_cv", critics={"hop1": all_outcomes_critic(distinct=distinct)},
                      num_samples=4, jit_compile=jit_compile)
        model.fit(np.repeat(queries, 4, axis=0), batch_size=8, epochs=2, verbose=0, shuffle=False)
        assert model.q_function.pass_repeats == {"hop1": 4, "hop2": 1}
        weights[distinct] = [w.numpy() for w in model.weights]
    for a, b in zip(weights[False], weights[True]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
