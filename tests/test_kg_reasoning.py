"""The knowledge-graph reasoning example on a tiny synthetic graph: training,
masking (never sampled, never ranked, no gradient), beam search and serving."""

import json
import os
import pathlib
import subprocess
import sys

from absl.testing import flagsaver
import keras
import numpy as np
import pytest
import tensorflow as tf

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import kg_reasoning  # noqa: E402

NUM_ENTITIES = 24


def synthetic_graph(seed=0):
    """Two random functions `f`, `g` over 24 entities, and two composed query
    relations `fg(e) = g(f(e))` and `gf(e) = f(g(e))`: answering a query needs
    two hops chosen by the query relation (its own edge is hidden)."""
    rng = np.random.RandomState(seed)
    f, g = rng.permutation(NUM_ENTITIES), rng.permutation(NUM_ENTITIES)
    name = lambda e: f"e{e}"  # noqa: E731
    triples = [(name(e), "f", name(f[e])) for e in range(NUM_ENTITIES)]
    triples += [(name(e), "g", name(g[e])) for e in range(NUM_ENTITIES)]
    composed = [(name(e), "fg", name(g[f[e]])) for e in range(NUM_ENTITIES)]
    composed += [(name(e), "gf", name(f[g[e]])) for e in range(NUM_ENTITIES)]
    return kg_reasoning.build_graph({"train": triples + composed, "valid": composed[:8], "test": composed})


def test_agent_from_flags_takes_sizes_and_compile_settings_from_the_flags():
    """The benchmarks' agents (`agent_from_flags`): hops, sizes, the critics'
    sizes, rollouts, learning rate, steps per execution and XLA from the
    command line's flags;
    other compile arguments passed on ("auto": none, Keras' choice)."""
    assert kg_reasoning.jit_compile_option("auto") == {}
    kg = synthetic_graph()
    if not kg_reasoning.FLAGS.is_parsed():
        kg_reasoning.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver(hops=3, dim=4, hidden=8, rollouts=3, learning_rate=0.01, steps_per_execution=2,
                             jit_compile="true"):
        assert kg_reasoning.agent_from_flags(kg, "rloo", 0).model.get_compile_config()["jit_compile"] is True
        agent = kg_reasoning.agent_from_flags(kg, "rloo", 0, jit_compile=False)  # a keyword overrides the flag
    assert agent.hops == 3
    assert [n.name for n in agent.model.scg().nodes] == ["hop_1", "hop_2", "hop_3"]
    assert (agent.policy.dim, agent.policy.hidden) == (4, 8)
    config = agent.model.get_compile_config()
    assert (config["estimator"], config["num_samples"], config["steps_per_execution"]) == ("rloo", 3, 2)
    assert config["jit_compile"] is False
    assert config["optimizer"]["config"]["learning_rate"] == pytest.approx(0.01)

    def critic_size(agent):
        network = agent.model.get_compile_config()["critics"]["hop_1"]["config"]["network"]["config"]
        return network["dim"], network["hidden"]

    assert critic_size(kg_reasoning.agent_from_flags(kg, "auto", 0)) == (16, 32)  # critics_for's defaults
    with flagsaver.flagsaver(critic_dim=5, critic_hidden=7):
        assert critic_size(kg_reasoning.agent_from_flags(kg, "auto", 0)) == (5, 7)
        assert critic_size(kg_reasoning.agent_from_flags(kg, "auto", 0, critic_dim=3, critic_hidden=6)) == (3, 6)


@pytest.fixture(scope="module")
def trained():
    kg = synthetic_graph()
    agent = kg_reasoning.build_agent(kg, hops=2, dim=16, hidden=32, seed=0)
    kg_reasoning.compile_agent(agent, "rloo", rollouts=8, learning_rate=0.003, steps_per_execution=25)
    data = kg_reasoning.queries(kg, "test")
    agent.model.fit(kg_reasoning.train_dataset(kg, 24, 0, "test"), steps_per_epoch=300, epochs=1, verbose=0)
    return agent, data


def test_data_loads_with_standard_split_sizes_and_inverse_edges():
    kg = kg_reasoning.load_graph("umls")
    assert (kg.num_entities, kg.num_base_relations) == (135, 46)
    assert [len(kg.splits[s]) for s in ("train", "valid", "test")] == [5216, 652, 661]
    assert kg.relations[46] == kg.relations[0] + "_inv" and kg.relations[kg.no_op] == "NO_OP"
    h, r, t = kg.splits["train"][0]
    row = kg.action_rel[t][kg.action_mask[t]], kg.action_ent[t][kg.action_mask[t]]
    assert any(rr == r + 46 and ee == h for rr, ee in zip(*row))  # the inverse edge
    assert np.all(kg.action_rel[:, 0] == kg.no_op) and np.all(kg.action_ent[:, 0] == np.arange(135))
    kinship = kg_reasoning.load_graph("kinship")
    assert [len(kinship.splits[s]) for s in ("train", "valid", "test")] == [8544, 1068, 1074]


def test_training_masks_come_from_training_triples_only():
    """A test answer training never shows (`(a, r, c)`, reachable as
    a -p-> d -q-> c) is not masked at the last hop of the training query
    `(a, r, b)`; dev/test queries are filtered over every split."""
    kg = kg_reasoning.build_graph({
        "train": [("a", "r", "b"), ("a", "p", "d"), ("d", "q", "c"), ("b", "q", "d")],
        "valid": [("b", "q", "c")],
        "test": [("a", "r", "c")],
    })
    e = {name: i for i, name in enumerate(kg.entities)}
    train, test = kg_reasoning.queries(kg, "train"), kg_reasoning.queries(kg, "test")
    row = next(i for i, (h, t) in enumerate(zip(train["head"], train["tail"])) if (h, t) == (e["a"], e["b"]))
    assert not train["exclude"].any()  # no training (head, relation) has another training tail
    assert test["exclude"][0, e["b"]] == 1.0 and test["exclude"][0].sum() == 1.0
    agent = kg_reasoning.build_agent(kg, hops=2, dim=4, hidden=8)
    arg = lambda key: tf.constant(train[key][row : row + 1])  # noqa: E731
    allowed = agent.policy.mask(tf.constant([e["d"]]), arg("head"), arg("relation"), arg("tail"),
                                arg("exclude"), last=True).numpy()[0]
    into_c = (kg.action_ent[e["d"]] == e["c"]) & kg.action_mask[e["d"]]
    assert into_c.any() and allowed[into_c].all()
    # On UMLS, every training query masks only tails the training triples give its (head, relation).
    umls = kg_reasoning.load_graph("umls")
    data = kg_reasoning.queries(umls, "train")
    for h, r, t, excl in zip(data["head"], data["relation"], data["tail"], data["exclude"]):
        assert set(np.flatnonzero(excl)) == umls.train_tails[(int(h), int(r))] - {int(t)}


def test_ties_share_their_mean_rank_and_unreached_answers_rank_nowhere():
    """`ranks`: the answer's rank is 1 + the entities scored above it + half the
    others tied with it (never the optimistic first place of a tie), and inf
    for an answer no beam reached."""
    inf = np.inf
    scores = np.array([[3.0, 1.0, 3.0, 3.0, -inf]] * 3 + [[0.5, 2.0, 1.0, -inf, -inf]])
    np.testing.assert_array_equal(kg_reasoning.ranks(scores, np.array([0, 1, 4, 2])), [2.0, 4.0, inf, 2.0])


def test_agent_learns_to_answer_its_queries(trained):
    agent, _ = trained
    metrics = kg_reasoning.evaluate(agent, "test", beam=8)
    assert metrics["hits@1"] >= 0.9, metrics
    history = agent.model.evaluate(kg_reasoning.train_dataset(agent.kg, 24, 1, "test"), steps=5,
                                   return_dict=True, verbose=0)
    assert "hits_at_1" in history and "miss" in history


def test_evaluation_traces_beam_search_once_more_whatever_the_chunks(trained):
    """`evaluate` scores the same in one chunk as in chunks of 7, and after its
    trace for the whole split the beam search traces once more for the chunks
    of 7, 6 and 1 queries of both splits (a trace for any count), not once per
    count."""
    agent, _ = trained
    whole = kg_reasoning.evaluate(agent, "test", beam=6, chunk=48)
    search = kg_reasoning.beam_function(agent, 6)
    traced = search.experimental_get_tracing_count()
    assert kg_reasoning.evaluate(agent, "test", beam=6, chunk=7) == pytest.approx(whole)
    kg_reasoning.evaluate(agent, "valid", beam=6, chunk=7)
    assert search.experimental_get_tracing_count() - traced <= 1


def allowed_numpy(kg, entity, head, relation, tail, exclude, last):
    """The masks of `KGPolicy.mask`, recomputed in numpy from the graph."""
    allowed = kg.action_mask[entity].copy()
    rel, ent = kg.action_rel[entity], kg.action_ent[entity]
    nb = kg.num_base_relations
    inverse = np.where(relation < nb, relation + nb, relation - nb)
    allowed &= ~((entity == head)[:, None] & (rel == relation[:, None]) & (ent == tail[:, None]))
    allowed &= ~((entity == tail)[:, None] & (rel == inverse[:, None]) & (ent == head[:, None]))
    if last:
        allowed &= np.take_along_axis(exclude, ent, axis=1) <= 0
    stuck = ~allowed.any(axis=1)
    allowed[stuck, 0] = True
    return allowed


def test_masked_actions_are_never_sampled(trained):
    agent, data = trained
    kg = agent.kg
    rows = {k: np.repeat(v, 50, axis=0) for k, v in data.items()}
    # Hide some targets' siblings: every query's other tails include 3 random entities.
    rows["exclude"] = rows["exclude"].copy()
    rng = np.random.RandomState(0)
    for i in range(len(rows["head"])):
        rows["exclude"][i, rng.choice(NUM_ENTITIES, 3, replace=False)] = 1.0
        rows["exclude"][i, rows["tail"][i]] = 0.0
    _, _, _, records = agent.model.record_forward({k: tf.constant(v) for k, v in rows.items()})
    entity = rows["head"]
    for t in (1, 2):
        action = np.argmax(records[f"hop_{t}"].sample.numpy(), axis=1)
        allowed = allowed_numpy(kg, entity, rows["head"], rows["relation"], rows["tail"], rows["exclude"], t == 2)
        np.testing.assert_array_equal(records[f"hop_{t}"].mask.numpy(), allowed)
        assert allowed[np.arange(len(action)), action].all()
        assert (kg.action_rel[entity, action] != kg.relations.index("PAD")).all()
        entity = kg.action_ent[entity, action]


def test_masked_actions_get_exactly_zero_gradient():
    kg = synthetic_graph()
    agent = kg_reasoning.build_agent(kg, hops=2, dim=8, hidden=16, seed=1, entropy_beta=0.05)
    kg_reasoning.compile_agent(agent, "minerva", rollouts=4)
    agent.model.build_training_state()
    data = {k: tf.constant(v) for k, v in kg_reasoning.queries(kg, "test").items()}
    with tf.GradientTape(persistent=True) as tape:
        out = agent.model.run_forward(data)
        surrogate = tf.reduce_mean(out.surrogate)
        bonus = out.regularization
    for t in (1, 2):
        record = out.records[f"hop_{t}"]
        grad = tape.gradient(surrogate, record.params).numpy()
        mask = record.mask.numpy()
        assert (~mask).any() and np.all(grad[~mask] == 0.0)
        assert np.abs(grad[mask]).max() > 0.0
    # The entropy bonus is a regularisation loss, not a cost routed to the hops,
    # and its direct gradient reaches the policy.
    assert set(out.costs) == {"miss"} and float(bonus) < 0.0
    grads = tape.gradient(bonus, agent.policy.trainable_variables)
    assert any(g is not None and float(tf.reduce_max(tf.abs(tf.convert_to_tensor(g)))) > 0 for g in grads)


def test_beam_search_never_ranks_masked_answers_and_its_paths_are_real(trained):
    agent, data = trained
    kg = agent.kg
    exclude = data["exclude"].copy()
    exclude[:, 5] = np.where(data["tail"] == 5, 0.0, 1.0)  # entity 5 is an "other true tail" everywhere
    out = kg_reasoning.beam_search(agent.policy, 2, 16, data["head"], data["relation"], data["tail"], exclude)
    answers, scores = out["answers"].numpy(), out["scores"].numpy()
    rels, ents = out["path_relations"].numpy(), out["path_entities"].numpy()
    edges = {(e, r, n) for e in range(kg.num_entities) for r, n, m in
             zip(kg.action_rel[e], kg.action_ent[e], kg.action_mask[e]) if m}
    for q in range(len(answers)):
        head, rel, tail = data["head"][q], data["relation"][q], data["tail"][q]
        for a in np.flatnonzero(np.isfinite(scores[q])):
            answer = answers[q, a]
            assert exclude[q, answer] == 0.0  # excluded entities are never ranked
            assert ents[q, a, -1] == answer
            here = head
            for r, n in zip(rels[q, a], ents[q, a]):
                assert (here, r, n) in edges
                assert (here, r, n) != (head, rel, tail)  # the query edge stays hidden
                here = n
        assert np.all(np.diff(scores[q][np.isfinite(scores[q])]) <= 0)
    reached = np.isfinite(scores)
    assert np.all(rels[~reached] == -1)


def all_walks(agent, data):
    """Every masked 2-hop walk of every query: `(query, answer, log pi(walk))`, by enumeration."""
    policy, num_q = agent.policy, len(data["head"])
    arg = {k: tf.constant(v) for k, v in data.items()}
    h = policy.start(arg["head"], arg["relation"])
    mask1 = policy.mask(arg["head"], arg["head"], arg["relation"], arg["tail"], arg["exclude"], False)
    logp1 = tf.nn.log_softmax(tf.where(mask1, policy.logits(h, arg["head"], arg["relation"]), -1e9)).numpy()
    q, a1 = np.nonzero(mask1.numpy())
    rep = {k: tf.gather(v, q) for k, v in arg.items()}
    h1, e1, _ = policy.advance(tf.gather(h, q), rep["head"], tf.constant(a1, tf.int32))
    mask2 = policy.mask(e1, rep["head"], rep["relation"], rep["tail"], rep["exclude"], True).numpy()
    logp2 = tf.nn.log_softmax(tf.where(mask2, policy.logits(h1, e1, rep["relation"]), -1e9)).numpy()
    walks = []
    for i, j in zip(*np.nonzero(mask2)):
        walks.append((q[i], agent.kg.action_ent[e1.numpy()[i], j], logp1[q[i], a1[i]] + logp2[i, j]))
    assert len({w[0] for w in walks}) == num_q
    return walks


@pytest.mark.parametrize("pool", ["max", "sum"])
def test_beam_pools_every_path_of_an_entity_and_deduplicates_the_last_hop(trained, pool):
    """With a beam wider than hop 1's actions, `unique=True` sees every walk:
    each entity's score is the max / log-sum-exp of its walks' log-probabilities
    (enumerated), and the beam keeps distinct entities. `unique=False` keeps the
    `beam` best walks: with `pool="max"` every entity they reach gets its best
    walk's score; the ranked entities are fewer."""
    agent, data = trained
    data = {k: v[:12] for k, v in data.items()}
    pooled = {}
    for q, e, lp in all_walks(agent, data):
        pooled.setdefault((q, e), []).append(lp)
    expect = np.full((12, agent.kg.num_entities), -np.inf)
    for (q, e), lps in pooled.items():
        if data["exclude"][q, e] <= 0:
            expect[q, e] = np.max(lps) if pool == "max" else np.logaddexp.reduce(lps)
    assert max(len(v) for v in pooled.values()) > 1  # some entity is reached by several walks
    args = [data[k] for k in ("head", "relation", "tail", "exclude")]
    width = agent.kg.num_entities + agent.kg.max_actions  # every hop-1 action and every entity fit
    wide = kg_reasoning.beam_search(agent.policy, 2, width, *args, pool=pool, unique=True)
    np.testing.assert_allclose(wide["entity_scores"].numpy(), expect, rtol=1e-4, atol=1e-4)
    narrow = kg_reasoning.beam_search(agent.policy, 2, 4, *args, pool=pool, unique=True)["entity_scores"].numpy()
    assert np.all(np.isfinite(narrow).sum(axis=1) == np.minimum(4, np.isfinite(expect).sum(axis=1)))
    paths = kg_reasoning.beam_search(agent.policy, 2, 4, *args, pool=pool, unique=False)["entity_scores"].numpy()
    reached = np.isfinite(paths)
    assert np.all(reached.sum(axis=1) <= 4) and np.all(np.isfinite(expect[reached]))
    if pool == "max":
        np.testing.assert_allclose(paths[reached], expect[reached], rtol=1e-4, atol=1e-4)
    else:
        assert np.all(paths[reached] <= expect[reached] + 1e-4)
    with pytest.raises(ValueError, match="pool must be one of"):
        kg_reasoning.beam_search(agent.policy, 2, 4, *args, pool="mean")


CHILD = r'''
import json, sys
import numpy as np
import tensorflow as tf
path, inputs, out = sys.argv[1:4]
loaded = tf.saved_model.load(path)
data = np.load(inputs)
beam = loaded.signatures["beam"](head=tf.constant(data["head"]), relation=tf.constant(data["relation"]))
walk = loaded.signatures["walk"](head=tf.constant(data["head"]), relation=tf.constant(data["relation"]),
                                 seed=tf.constant(data["seed"]))
arrays = {f"beam/{k}": v.numpy() for k, v in beam.items()}
arrays.update({f"walk/{k}": v.numpy() for k, v in walk.items()})
np.savez(out + ".npz", **arrays)
mods = sorted(m for m in ("keras_bpq", "kg_reasoning", "tensorflow_probability") if m in sys.modules)
json.dump({"modules": mods, "signatures": sorted(loaded.signatures)}, open(out + ".json", "w"))
'''


def test_exported_agent_serves_the_same_answers_in_a_fresh_process(trained, tmp_path):
    agent, data = trained
    path = tmp_path / "agent"
    kg_reasoning.export_agent(agent, path, beam=8)
    head, relation = data["head"][:10], data["relation"][:10]
    seeds = np.arange(10, dtype=np.int64) * 31 + 7
    np.savez(tmp_path / "inputs.npz", head=head, relation=relation, seed=seeds)
    script = tmp_path / "serve.py"
    script.write_text(CHILD)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "inputs.npz"),
                             str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out.json").read_text())
    assert report == {"modules": [], "signatures": ["beam", "walk"]}
    served = np.load(tmp_path / "out.npz")
    local = kg_reasoning.beam_search(agent.policy, 2, 8, head, relation)
    for key in ("answers", "path_relations", "path_entities"):
        np.testing.assert_array_equal(served[f"beam/{key}"], local[key].numpy())
    np.testing.assert_allclose(served["beam/scores"], local["scores"].numpy(), rtol=1e-5)
    walk = kg_reasoning.sample_walk(agent, head, relation, tf.constant(seeds))
    for key in ("relations", "entities", "answer"):
        np.testing.assert_array_equal(served[f"walk/{key}"], walk[key].numpy())
    np.testing.assert_allclose(served["walk/log_prob"], walk["log_prob"].numpy(), rtol=1e-5)
    assert np.all(served["walk/log_prob"] <= 0.0) and np.all(served["walk/entities"][:, -1] == served["walk/answer"])


def test_default_estimator_evaluates_hops_once_per_query_not_per_action():
    """hop 2's exact Q runs only the ops downstream of it (a `Dot` with the
    actions into the tail); hop 1's critic scores every action in one pass;
    both equal the evaluations on `batch x actions` rows."""
    from keras_bpq import critics as critics_lib
    from keras_bpq import estimators
    from keras_bpq import q_values

    kg = synthetic_graph()
    agent = kg_reasoning.build_agent(kg, hops=2, dim=8, hidden=16, seed=0)
    kg_reasoning.compile_agent(agent, "auto", rollouts=3)
    model = agent.model
    data = {k: tf.constant(v[:5]) for k, v in kg_reasoning.queries(kg, "test").items()}
    out = model.run_forward(data)
    x = out.x
    hop1, hop2 = model.scg(data).nodes
    evaluator = model.q_function.downstream_evaluator(hop2, ("miss",))
    assert evaluator is not None
    assert "move_2" not in {node.operation.name for node in evaluator.plan}
    for info in (hop1, hop2):
        step = out.steps[info.name]
        values = estimators.local_outcomes(step)[0].with_first(step.record.sample)
        fast = model.q_function.heads(info, x, None, out.records, values)["miss"]
        context = q_values.context(info, x, out.records)
        if info is hop2:
            slow = model.q_function.rerun_heads(info, x, None, context, values, ("miss",))["miss"]
        else:
            critic = model.training_state.critics["hop_1"]
            assert isinstance(critic.target_network, critics_lib.AllOutcomes)
            slow = critics_lib.Critic.q_outcomes(critic, context, values)[:, :, 0]
        assert fast.shape == (15, kg.max_actions + 1)
        np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rollouts", [1, 3])
def test_default_estimator_on_the_agent_matches_the_exact_gradient(rollouts):
    """critic_cv on both hops (hop 1: the learned all-outcomes critic, hop 2:
    the exact downstream Q; with several rollouts, a leave-one-out baseline
    on the residual) against enumeration of every masked 2-hop walk."""
    from test_gradients import assert_unbiased

    kg = synthetic_graph()
    agent = kg_reasoning.build_agent(kg, hops=2, dim=4, hidden=8, seed=2)
    kg_reasoning.compile_agent(agent, "auto", rollouts=rollouts)
    data = {k: v[:3] for k, v in kg_reasoning.queries(kg, "test").items()}
    exact, _ = assert_unbiased(agent.model, data, num_draws=2000)
    assert max(float(np.abs(g).max()) for g in exact) > 1e-3


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_action_dropout_thins_the_training_masks_only(jit_compile):
    """`build_agent(action_dropout=r)`: a training pass hides about a share `r`
    of each hop's allowed actions, never all of a row's and never one the
    policy's mask hides; a pass with `training=False` (and beam search, which
    reads the policy's mask) sees the whole mask; the agent trains."""
    kg = synthetic_graph()
    agent = kg_reasoning.build_agent(kg, hops=2, dim=8, hidden=16, seed=1, action_dropout=0.5)
    kg_reasoning.compile_agent(agent, "auto", rollouts=4, jit_compile=jit_compile)
    agent.model.build_training_state()
    data = {k: tf.constant(v) for k, v in kg_reasoning.queries(kg, "test").items()}
    whole = agent.model.run_forward(data, training=False).records["hop_1"].mask.numpy()
    thinned = agent.model.run_forward(data, training=True).records["hop_1"].mask.numpy()
    rows = len(data["head"])
    policy_mask = agent.policy.mask(
        data["head"], data["head"], data["relation"], data["tail"], data["exclude"], last=False
    ).numpy()
    np.testing.assert_array_equal(whole, np.repeat(policy_mask, len(whole) // rows, axis=0))
    assert np.all(thinned <= whole) and np.all(thinned.any(axis=1))
    share = thinned.sum() / whole.sum()
    assert 0.35 < share < 0.75, share
    history = agent.model.fit(kg_reasoning.train_dataset(kg, 16, 0, "test"), steps_per_epoch=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_a_policy_without_entity_embeddings_reads_relations_only():
    """`build_agent(entity_embeddings=False)` (MINERVA's `use_entity_embeddings=0`):
    the entities' vectors are zero and stay zero through training (they are not
    trainable weights), so two actions of one relation into different entities
    get the same logit; the agent trains."""
    kg = synthetic_graph()
    agent = kg_reasoning.build_agent(kg, hops=2, dim=8, hidden=16, seed=1, entity_embeddings=False)
    kg_reasoning.compile_agent(agent, "auto", rollouts=4)
    emb = agent.policy.entity_emb
    assert not emb.trainable and all(w is not emb.embeddings for w in agent.model.trainable_weights)
    history = agent.model.fit(kg_reasoning.train_dataset(kg, 16, 0, "test"), steps_per_epoch=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    np.testing.assert_array_equal(emb.embeddings.numpy(), 0.0)
    data = kg_reasoning.queries(kg, "test")
    head, relation = tf.constant(data["head"]), tf.constant(data["relation"])
    logits = agent.policy.logits(agent.policy.start(head, relation), head, relation).numpy()
    rel = kg.action_rel[data["head"]]
    for row, rels in zip(logits, rel):
        for r in np.unique(rels):
            same = row[rels == r]
            np.testing.assert_allclose(same, same[0], rtol=1e-6, atol=1e-6)


def test_agent_with_an_entropy_bonus_exports_after_training_under_xla(tmp_path):
    # The example's defaults: an entropy bonus on every hop (its `beta` is read
    # by `walk`'s forward pass) and, as the README's command, XLA on a CPU.
    kg = synthetic_graph()
    agent = kg_reasoning.build_agent(kg, hops=2, dim=8, hidden=16, seed=2, entropy_beta=0.05)
    kg_reasoning.compile_agent(agent, "auto", rollouts=4, learning_rate=0.003, steps_per_execution=2,
                               critic_dim=4, critic_hidden=8, jit_compile=True)
    agent.model.fit(kg_reasoning.train_dataset(kg, 8, 0, "test"), steps_per_epoch=4, epochs=1, verbose=0,
                    callbacks=[kg_reasoning.EntropyDecay(agent.entropy, period=2)])
    assert float(agent.entropy.beta.numpy()) < 0.05
    kg_reasoning.export_agent(agent, tmp_path / "agent", beam=4)
    loaded = tf.saved_model.load(str(tmp_path / "agent"))
    data = kg_reasoning.queries(kg, "test")
    head, relation = data["head"][:6], data["relation"][:6]
    seeds = np.arange(6, dtype=np.int64) * 13 + 5
    served = loaded.signatures["walk"](head=tf.constant(head), relation=tf.constant(relation), seed=tf.constant(seeds))
    local = kg_reasoning.sample_walk(agent, head, relation, tf.constant(seeds))
    for key in ("relations", "entities", "answer"):
        np.testing.assert_array_equal(served[key].numpy(), local[key].numpy())
    beam = loaded.signatures["beam"](head=tf.constant(head), relation=tf.constant(relation))
    expected = kg_reasoning.beam_search(agent.policy, 2, 4, head, relation)
    np.testing.assert_array_equal(beam["answers"].numpy(), expected["answers"].numpy())
