"""Learning from logged feedback: every estimator against exact enumeration on a
tiny contextual bandit whose value V(pi) and its gradient are known.

The bandit: 3 contexts (one-hot, uniform), 4 actions, known mean costs
`C[x, a]` observed with Gaussian noise, a known logging policy `MU[x, a]`. The
policy is `softmax(x @ theta)`, so `V(theta) = mean_x sum_a softmax(theta_x)_a
C[x, a]` and its gradient are computed in closed form.
"""

import os
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bpq
from keras_bpq import critics
from keras_bpq import logged

CONTEXTS, ACTIONS = 3, 4
C = np.array([[1.0, 0.2, 0.6, 0.9], [0.1, 0.8, 0.5, 0.3], [0.7, 0.4, 0.05, 1.0]], np.float32)
MU = np.array([[0.4, 0.1, 0.3, 0.2], [0.25, 0.25, 0.25, 0.25], [0.1, 0.5, 0.1, 0.3]], np.float32)
THETA = np.array([[0.5, -0.3, 0.2, 0.0], [-0.4, 0.6, 0.1, -0.2], [0.3, 0.0, -0.5, 0.4]], np.float32)
NOISE = 0.3
NUM_DRAWS = 1500


def bandit_policy(name="policy"):
    x = keras.Input((CONTEXTS,), name="x")
    logits = keras.layers.Dense(ACTIONS, use_bias=False, name="theta")(x)
    action = keras_bpq.Categorical(name="action", seed=1)(logits)
    policy = keras_bpq.BackpropQModel(inputs=x, outputs=action, name=name)
    policy.get_layer("theta").kernel.assign(THETA)
    return policy


def exact_value_and_gradient(theta=THETA, costs=C):
    """`V(theta) = mean_x sum_a softmax(theta_x)_a costs[x, a]` and its gradient."""
    theta = tf.Variable(theta)
    with tf.GradientTape() as tape:
        value = tf.reduce_mean(tf.reduce_sum(tf.nn.softmax(theta) * costs, axis=1))
    return float(value), tape.gradient(value, theta).numpy()


def draw_log(rng, n, mu=MU):
    """`n` logged rows: contexts, one-hot actions drawn from `mu`, propensities, noisy costs."""
    context = rng.integers(CONTEXTS, size=n)
    action = np.array([rng.choice(ACTIONS, p=mu[i] / mu[i].sum()) for i in context])
    x = np.eye(CONTEXTS, dtype=np.float32)[context]
    targets = {
        "action": np.eye(ACTIONS, dtype=np.float32)[action],
        "propensity": MU[context, action],
        "cost": (C[context, action] + NOISE * rng.normal(size=n)).astype(np.float32),
    }
    return x, targets


class TableCritic(critics.Critic):
    """An oracle `Q(x, a) = table[x, a]` (not trained)."""

    heads = ("cost",)

    def __init__(self, table):
        self.table = tf.constant(table, tf.float32)

    def q(self, context, values, target=True):
        rows = tf.matmul(context["inputs"], self.table)
        return tf.reduce_sum(rows * values, axis=-1, keepdims=True)


def gradient_draws(learner, n, num_draws=NUM_DRAWS, jit_compile=False, seed=0, mu=MU):
    """`[num_draws, 3, 4]` policy gradients of the estimator, one per logged batch of `n` rows."""

    @tf.function(jit_compile=jit_compile, autograph=False)
    def gradient(x, action, propensity, cost):
        with tf.GradientTape() as tape:
            out = learner.estimate(x, {"action": action, "propensity": propensity, "cost": cost})
        return tape.gradient(out["loss"], learner.policy_variables)[0], out["status"]

    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(num_draws):
        x, t = draw_log(rng, n, mu)
        grad, status = gradient(x, t["action"], t["propensity"], t["cost"])
        assert int(status) == 0
        draws.append(grad.numpy())
    return np.stack(draws)


def z_scores(draws, expected):
    mean = draws.mean(axis=0)
    stderr = draws.std(axis=0, ddof=1) / np.sqrt(len(draws))
    return (mean - expected) / (stderr + 1e-8)


UNBIASED = {
    "ips": lambda: (logged.IPS(), None),
    "doubly_robust_exact_q": lambda: (logged.DoublyRobust(), TableCritic(C)),
    "doubly_robust_wrong_q": lambda: (logged.DoublyRobust(), TableCritic(C + 0.5 * THETA)),
    "doubly_robust_untrained_mlp": lambda: (logged.DoublyRobust(), None),
    "direct_method_exact_q": lambda: (logged.DirectMethod(), TableCritic(C)),
}


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("case", sorted(UNBIASED))
def test_unbiased_estimators_match_the_exact_gradient(case, jit_compile):
    estimator, critic = UNBIASED[case]()
    learner = logged.LoggedModel(bandit_policy(), node="action", estimator=estimator, critic=critic)
    _, exact = exact_value_and_gradient()
    draws = gradient_draws(learner, n=20, jit_compile=jit_compile)
    z = z_scores(draws, exact)
    assert np.abs(z).max() < 4.5, f"{case}: max |z| = {np.abs(z).max():.2f}\n{z}"
    assert np.abs(exact).max() > 0.03  # the bandit has a gradient to find


def test_doubly_robust_with_a_good_critic_has_lower_variance_than_ips():
    ips = logged.LoggedModel(bandit_policy(), node="action", estimator=logged.IPS())
    dr = logged.LoggedModel(bandit_policy(), node="action", estimator=logged.DoublyRobust(),
                            critic=TableCritic(C))
    variance = {name: gradient_draws(m, n=20, num_draws=400).var(axis=0).sum()
                for name, m in (("ips", ips), ("dr", dr))}
    assert variance["dr"] < 0.5 * variance["ips"], variance


def test_direct_method_with_a_wrong_critic_has_the_bias_of_its_critic():
    """DM's gradient is biased by exactly grad E_x sum_a pi(a|x) (Q - C)(x, a)."""
    error = 0.5 * THETA + 0.2
    learner = logged.LoggedModel(bandit_policy(), node="action", estimator=logged.DirectMethod(),
                                 critic=TableCritic(C + error))
    _, exact = exact_value_and_gradient()
    _, biased = exact_value_and_gradient(costs=C + error)  # = exact + bias
    draws = gradient_draws(learner, n=20, num_draws=600, jit_compile=True)
    z = z_scores(draws, biased)
    assert np.abs(z).max() < 4.5, z
    assert np.abs(z_scores(draws, exact)).max() > 10, "the bias is far from noise"


# MU with actions the logging policy never tries (U = {MU_DEFICIENT == 0}).
MU_DEFICIENT = np.array([[0.5, 0.0, 0.3, 0.2], [0.25, 0.25, 0.25, 0.25], [0.0, 0.6, 0.0, 0.4]], np.float32)


def expectation_over_log(learner, mu):
    """`E[estimate]`, `E[its policy gradient]` and `E[mean_ratio]` over one-row logs
    `(x, a) ~ uniform x mu`, exactly: each estimator below is a mean over rows,
    linear in the noise-free cost, so the sum over every `(x, a)` with
    `mu(a|x) > 0`, weighted by `mu(a|x) / 3`, is its expectation."""
    value, mean_ratio, grad = 0.0, 0.0, np.zeros_like(THETA)
    for x in range(CONTEXTS):
        for a in range(ACTIONS):
            if mu[x, a] == 0:
                continue
            row = {"action": np.eye(ACTIONS, dtype=np.float32)[[a]],
                   "propensity": mu[[x], a], "cost": C[[x], a]}
            with tf.GradientTape() as tape:
                out = learner.estimate(np.eye(CONTEXTS, dtype=np.float32)[[x]], row)
            weight = mu[x, a] / CONTEXTS
            value += weight * float(out["loss"])
            mean_ratio += weight * float(out["mean_ratio"])
            grad += weight * tape.gradient(out["loss"], learner.policy_variables)[0].numpy()
    return value, grad, mean_ratio


@pytest.mark.parametrize("mu", [MU, MU_DEFICIENT], ids=["full_support", "deficient_support"])
@pytest.mark.parametrize("estimator", ["ips", "doubly_robust", "direct_method"])
def test_estimators_credit_untried_actions_exactly_as_documented(estimator, mu):
    """Without support (U(x) = {a: mu(a|x) = 0}), exactly: E[IPS] = V - E_x sum_U pi c,
    E[DR] = V + E_x sum_U pi (Q - c), E[mean_ratio] = 1 - E_x sum_U pi; with full
    support they are V, V and 1 (and so are the gradients). The direct method is
    sum_a pi Q either way (every action credited with Q)."""
    q = C + 0.5 * THETA + 0.2  # a wrong critic
    critic = None if estimator == "ips" else TableCritic(q)
    learner = logged.LoggedModel(bandit_policy(), node="action", estimator=estimator, critic=critic)
    untried = (mu == 0).astype(np.float32)
    # The estimator's expectation is V with these costs replaced by `credited`.
    replaced = np.ones_like(C) if estimator == "direct_method" else untried
    credited = np.zeros_like(C) if estimator == "ips" else q
    expected_value, expected_grad = exact_value_and_gradient(costs=C * (1 - replaced) + credited * replaced)
    value, grad, mean_ratio = expectation_over_log(learner, mu)
    assert value == pytest.approx(expected_value, abs=1e-5)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-5)
    untried_mass = float(np.mean(np.sum(tf.nn.softmax(THETA).numpy() * untried, axis=1)))
    assert mean_ratio == pytest.approx(1.0 - untried_mass, abs=1e-5)
    true_value, true_grad = exact_value_and_gradient()
    if mu is MU_DEFICIENT:
        assert untried_mass > 0.2
    if mu is MU_DEFICIENT or estimator == "direct_method":  # the bias is real, not within rounding
        assert abs(value - true_value) > 0.02
        assert np.abs(grad - true_grad).max() > 0.01
    else:
        assert value == pytest.approx(true_value, abs=1e-5)


def test_snips_bias_is_minus_the_gradient_for_one_row_and_vanishes_as_batches_grow():
    learner = logged.LoggedModel(bandit_policy(), node="action", estimator=logged.SNIPS())
    _, exact = exact_value_and_gradient()
    # One row: the estimate is c_1 whatever the policy, so its gradient (and its
    # mean) is exactly 0: bias = -grad V.
    single = gradient_draws(learner, n=1, num_draws=50)
    np.testing.assert_allclose(single, 0.0, atol=1e-6)
    # Many rows: the O(1/n) bias is lost in the noise.
    draws = gradient_draws(learner, n=500, num_draws=300, jit_compile=True)
    z = z_scores(draws, exact)
    assert np.abs(z).max() < 4.5, z


def test_snips_ignores_a_constant_shift_of_the_costs():
    learner = logged.LoggedModel(bandit_policy(), node="action", estimator=logged.SNIPS())
    rng = np.random.default_rng(3)
    x, t = draw_log(rng, 64)
    shifted = dict(t, cost=t["cost"] + 5.0)

    def value(targets):
        return float(learner.estimate(x, targets)["loss"])

    assert value(shifted) == pytest.approx(value(t) + 5.0, abs=1e-4)


def test_clipping_bounds_the_ratio():
    rng = np.random.default_rng(4)
    x, t = draw_log(rng, 256)
    t["propensity"] = np.full_like(t["propensity"], 0.01)  # ratios up to 100
    plain = logged.LoggedModel(bandit_policy(), node="action", estimator=logged.IPS())
    clipped = logged.LoggedModel(bandit_policy(), node="action", estimator=logged.IPS(clip=2.0))
    cost = np.abs(t["cost"])
    t["cost"] = cost
    assert float(plain.estimate(x, t)["loss"]) > 10.0
    assert float(clipped.estimate(x, t)["loss"]) <= 2.0 * cost.mean() + 1e-5


def exact_value(policy):
    return exact_value_and_gradient(policy.get_layer("theta").kernel.numpy())[0]


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("estimator", ["ips", "snips", "direct_method", "doubly_robust"])
def test_fit_learns_a_better_policy_from_the_log(estimator, jit_compile):
    keras.utils.set_random_seed(0)
    policy = bandit_policy()
    learner = logged.LoggedModel(policy, node="action", estimator=estimator)
    learner.compile(optimizer=keras.optimizers.Adam(0.05), critic_optimizer=keras.optimizers.Adam(0.01),
                    jit_compile=jit_compile)
    x, t = draw_log(np.random.default_rng(5), 3000)
    before = exact_value(policy)
    history = learner.fit(x, t, batch_size=100, epochs=6, verbose=0)
    after = exact_value(policy)
    best = C.min(axis=1).mean()
    assert after < before - 0.15 and after < best + 0.12, (estimator, before, after, best)
    assert set(history.history) == {"loss", "critic_loss", "mean_ratio"}
    assert all(np.isfinite(v) for v in history.history["loss"])
    assert 0.0 < history.history["mean_ratio"][0] < 3.0  # MU covers every action: near 1
    if estimator in ("direct_method", "doubly_robust"):
        assert history.history["critic_loss"][-1] < history.history["critic_loss"][0]


def test_critic_gets_no_gradient_from_the_policy_objective():
    learner = logged.LoggedModel(bandit_policy(), node="action", estimator=logged.DoublyRobust())
    x, t = draw_log(np.random.default_rng(6), 32)
    with tf.GradientTape(persistent=True) as tape:
        out = learner.estimate(x, t)
    assert all(g is None for g in tape.gradient(out["loss"], learner.critic_variables))
    assert all(g is None for g in tape.gradient(out["critic_loss"], learner.policy_variables))
    assert all(g is not None for g in tape.gradient(out["critic_loss"], learner.critic_variables))


def test_save_and_load_round_trip(tmp_path):
    keras.utils.set_random_seed(1)
    learner = logged.LoggedModel(bandit_policy(), node="action", estimator=logged.DoublyRobust(clip=20.0))
    learner.compile(optimizer=keras.optimizers.Adam(0.05))
    x, t = draw_log(np.random.default_rng(7), 400)
    learner.fit(x, t, batch_size=100, epochs=1, verbose=0)
    path = str(tmp_path / "learner.keras")
    learner.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, logged.LoggedModel)
    assert isinstance(loaded.estimator, logged.DoublyRobust) and loaded.estimator.clip == 20.0
    for a, b in zip(learner.weights, loaded.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    for a, b in zip(learner.critic_optimizer.variables, loaded.critic_optimizer.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    np.testing.assert_allclose(float(loaded.estimate(x, t)["loss"]), float(learner.estimate(x, t)["loss"]),
                               rtol=1e-6)
    # It trains on, and its policy exports.
    loaded.fit(x, t, batch_size=100, epochs=1, verbose=0)
    loaded.policy.export(str(tmp_path / "policy"), verbose=False)


def test_estimators_serialise():
    for estimator in (logged.IPS(clip=3.0), logged.SNIPS(), logged.DirectMethod(), logged.DoublyRobust(clip=5)):
        copy = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(estimator))
        assert type(copy) is type(estimator) and copy.get_config() == estimator.get_config()
    assert isinstance(logged.get("doubly_robust"), logged.DoublyRobust)
    with pytest.raises(ValueError, match="clip must be finite and > 0"):
        logged.IPS(clip=0.0)
    with pytest.raises(ValueError, match="Unknown logged-feedback estimator 'dr'"):
        logged.get("dr")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop("propensity"), r"exactly the keys \['action', 'propensity', 'cost'\]; missing \['propensity'\]"),
        (lambda t: t.update(reward=t["cost"]), r"unknown \['reward'\]"),
        (lambda t: t.update(action=np.argmax(t["action"], axis=1)), r"`action` must hold one sample of node 'action' per row, shape \[batch, 4\] \(one-hot"),
        (lambda t: t.update(cost=t["cost"][:, None, None]), r"`cost` must hold one number per row"),
    ],
)
def test_malformed_logs_fail_naming_the_input(change, message):
    learner = logged.LoggedModel(bandit_policy(), node="action", estimator="ips")
    learner.compile()
    x, t = draw_log(np.random.default_rng(8), 40)
    change(t)
    with pytest.raises(ValueError, match=message):
        learner.fit(x, t, batch_size=20, epochs=1, verbose=0)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize(
    "column, value, message",
    [
        ("propensity", 0.0, r"row 3 of batch 1 .* `propensity` must be finite, > 0 and <= 1"),
        ("propensity", 1.5, r"row 3 of batch 1 .* `propensity` must be finite, > 0 and <= 1"),
        ("propensity", np.nan, r"row 3 of batch 1 .* `propensity` must be finite, > 0 and <= 1"),
        ("action", 0.5, r"row 3 of batch 1 .* `action` is not an outcome of node 'action'"),
        ("cost", np.inf, r"row 3 of batch 1 .* `cost` is not finite"),
    ],
)
def test_invalid_values_skip_the_step_and_fail_naming_the_row(column, value, message, jit_compile):
    learner = logged.LoggedModel(bandit_policy(), node="action")
    learner.compile(jit_compile=jit_compile)
    x, t = draw_log(np.random.default_rng(9), 40)
    learner.fit(x[:20], {k: v[:20] for k, v in t.items()}, batch_size=20, epochs=1, verbose=0)
    before = [keras.ops.convert_to_numpy(v).copy() for v in learner.weights]
    t[column][23] = value
    with pytest.raises(ValueError, match=message):
        learner.fit(x, t, batch_size=20, epochs=1, verbose=0, shuffle=False)
    # Batch 0 trained; batch 1 changed nothing and left every weight finite.
    after = [keras.ops.convert_to_numpy(v) for v in learner.weights]
    assert all(np.all(np.isfinite(v)) for v in after if v.dtype.kind == "f")
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


def everything(learner):
    """Every variable of the learner, both optimizers' slots included."""
    return list(learner.weights) + list(learner.optimizer.variables) + list(learner.critic_optimizer.variables)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_a_step_that_would_write_a_non_finite_value_is_undone_and_named(jit_compile):
    """A cost of 1e30 is finite, and so are the estimate and the gradient, but
    Adam's squared gradient overflows: the step is undone whole and fit and
    train_on_batch raise a FloatingPointError naming the slot."""
    learner = logged.LoggedModel(bandit_policy(), node="action", estimator="ips", name="ipsm")
    learner.compile(optimizer=keras.optimizers.Adam(0.01), jit_compile=jit_compile)
    x, t = draw_log(np.random.default_rng(11), 40)
    learner.fit(x[:20], {k: v[:20] for k, v in t.items()}, batch_size=20, epochs=1, verbose=0)
    x, t = x[20:], {k: v[20:].copy() for k, v in t.items()}
    before = [keras.ops.convert_to_numpy(v).copy() for v in everything(learner)]
    assert before and any(v.path.endswith("_velocity") for v in everything(learner))

    def unchanged():
        for variable, value in zip(everything(learner), before):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value, err_msg=variable.path)

    t["cost"][3] = 1e30
    message = (
        r"'ipsm': the update would have written a non-finite value \(NaN or inf\) into policy optimizer "
        r"variable '\w+/theta_kernel_velocity', although every cost was finite"
    )
    with pytest.raises(FloatingPointError, match=message):
        learner.fit(x, t, batch_size=20, epochs=1, verbose=0)
    unchanged()
    with pytest.raises(FloatingPointError, match=message):
        learner.train_on_batch(x, t)
    unchanged()
    t["cost"][3] = np.nan  # refused before any update, naming the row
    with pytest.raises(ValueError, match=r"row 3 of batch 0 .* `cost` is not finite"):
        learner.fit(x, t, batch_size=20, epochs=1, verbose=0, shuffle=False)
    unchanged()
    t["cost"][3] = 1.0  # the guard's report was read: training goes on
    learner.fit(x, t, batch_size=20, epochs=1, verbose=0)
    after = [keras.ops.convert_to_numpy(v) for v in everything(learner)]
    assert any(not np.array_equal(a, b) for a, b in zip(after, before))
    assert all(np.all(np.isfinite(v)) for v in after if v.dtype.kind == "f")


def test_evaluate_reports_the_estimate_and_refuses_invalid_rows():
    learner = logged.LoggedModel(bandit_policy(), node="action", estimator="ips")
    learner.compile()
    x, t = draw_log(np.random.default_rng(10), 40)
    logs = learner.evaluate(x, t, batch_size=40, verbose=0, return_dict=True)
    assert logs["loss"] == pytest.approx(float(learner.estimate(x, t)["loss"]), rel=1e-5)
    t["propensity"][5] = -0.1
    with pytest.raises(ValueError, match=r"row 5 of a batch .* `propensity` must be finite, > 0 and <= 1"):
        learner.evaluate(x, t, batch_size=40, verbose=0)


def test_policies_it_cannot_learn_are_refused():
    with pytest.raises(ValueError, match=r"calls no node 'act'; its nodes are \['action'\]"):
        logged.LoggedModel(bandit_policy(), node="act")
    x = keras.Input((3,))
    z = keras_bpq.Bernoulli(name="z")(keras.layers.Dense(2)(x))
    a = keras_bpq.Categorical(name="a")(keras.layers.Dense(4)(z))
    with pytest.raises(ValueError, match=r"node 'a''s parameters depend on the samples of nodes \['z'\]"):
        logged.LoggedModel(keras.Model(x, a), node="a")
    n = keras_bpq.Normal(name="n", scale=1.0)(keras.layers.Dense(2)(x))
    with pytest.raises(ValueError, match=r"node 'n' \(Normal\[2\]\) has no finite support"):
        logged.LoggedModel(keras.Model(x, n), node="n", estimator="ips")
    with pytest.raises(ValueError, match="uses no critic"):
        logged.LoggedModel(bandit_policy(), node="action", estimator="ips", critic=TableCritic(C))


def test_serve_log_learn_example(tmp_path):
    """examples/serve_log_learn.py: the policy learned from the served log beats the logging policy
    when both are served from their SavedModels."""
    root = pathlib.Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "examples/serve_log_learn.py", f"--out_dir={tmp_path}"], cwd=root,
        capture_output=True, text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    found = re.search(r"logging policy reward ([\d.]+), learned policy reward ([\d.]+)", result.stdout)
    assert found, result.stdout
    logging_reward, learned_reward = (float(v) for v in found.groups())
    assert learned_reward > logging_reward + 0.2, result.stdout
    for name in ("logging", "learned"):
        assert (tmp_path / name / "1" / "saved_model.pb").exists()


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_critic_warmup_trains_only_the_critic_and_critic_steps_repeat_its_update(jit_compile):
    learner = logged.LoggedModel(bandit_policy(), node="action", estimator=logged.DoublyRobust())
    learner.compile(optimizer=keras.optimizers.Adam(0.05), critic_steps=3, critic_warmup_steps=2,
                    jit_compile=jit_compile)
    x, t = draw_log(np.random.default_rng(8), 64)
    theta = learner.policy.get_layer("theta").kernel
    critic_before = [v.numpy() for v in learner.critic_variables]
    for step in (1, 2, 3):
        learner.train_on_batch(x, t)
        assert int(learner.steps.numpy()) == step
        assert int(learner.critic_optimizer.iterations.numpy()) == 3 * step
        assert int(learner.optimizer.iterations.numpy()) == max(0, step - 2)
        assert np.array_equal(theta.numpy(), THETA) == (step <= 2)
    assert all(not np.allclose(a, b.numpy()) for a, b in zip(critic_before, learner.critic_variables))


def test_critic_schedule_is_saved_and_checked(tmp_path):
    learner = logged.LoggedModel(bandit_policy(), node="action")
    learner.compile(critic_steps=2, critic_warmup_steps=5)
    x, t = draw_log(np.random.default_rng(9), 100)
    learner.fit(x, t, batch_size=50, epochs=1, verbose=0)
    path = str(tmp_path / "learner.keras")
    learner.save(path)
    loaded = keras.saving.load_model(path)
    assert (loaded.critic_steps, loaded.critic_warmup_steps, int(loaded.steps.numpy())) == (2, 5, 2)
    for bad in ({"critic_steps": 0}, {"critic_warmup_steps": -1}, {"critic_steps": 1.5}):
        with pytest.raises(ValueError, match="must be an integer"):
            learner.compile(**bad)
    with pytest.raises(ValueError, match="no trainable critic"):
        logged.LoggedModel(bandit_policy(), node="action", estimator="ips").compile(critic_warmup_steps=10)


# -- saving: atomic, never a NaN or inf ---------------------------------------------
def trained_learner():
    keras.utils.set_random_seed(2)
    learner = logged.LoggedModel(bandit_policy(), node="action", name="savem")
    learner.compile(optimizer=keras.optimizers.Adam(0.05))
    x, t = draw_log(np.random.default_rng(12), 40)
    learner.fit(x, t, batch_size=20, epochs=1, verbose=0)
    return learner


def theta_of(path):
    """The policy kernel of the `LoggedModel` saved in `path` (`.keras` or `.weights.h5`)."""
    if str(path).endswith(".keras"):
        return keras.saving.load_model(path).policy.get_layer("theta").kernel.numpy()
    reader = trained_learner()
    reader.load_weights(path)
    return reader.policy.get_layer("theta").kernel.numpy()


@pytest.mark.parametrize("name", ["learner.keras", "learner.weights.h5"])
def test_logged_model_saves_atomically_and_refuses_non_finite_values(tmp_path, name):
    """A `LoggedModel` saves as a `BackpropQModel` does (`saving.AtomicCheckpoints`):
    Keras writes a temporary file beside the target, which is renamed over it;
    an interrupted save leaves the previous file and nothing else; a NaN or inf
    in a weight, critic weight or optimizer slot is refused, naming it."""
    learner = trained_learner()
    path = tmp_path / name
    method = "save" if name.endswith(".keras") else "save_weights"
    save = getattr(learner, method)
    original = getattr(keras.Model, method)
    written = []

    def recording(self, filepath, *args, **kwargs):
        written.append(os.fspath(filepath))
        return original(self, filepath, *args, **kwargs)

    def interrupted(self, filepath, *args, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    theta = learner.policy.get_layer("theta").kernel
    saved = theta.numpy()
    setattr(keras.Model, method, recording)
    try:
        save(path)
    finally:
        setattr(keras.Model, method, original)
    (temporary,) = written
    assert temporary != os.fspath(path) and os.path.basename(temporary) == name
    assert os.path.basename(os.path.dirname(temporary)).startswith(".tmp-keras_bpq-")
    assert os.listdir(tmp_path) == [name]
    before = path.read_bytes()

    theta.assign(saved + 1.0)
    setattr(keras.Model, method, interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            save(path)
    finally:
        setattr(keras.Model, method, original)
    assert path.read_bytes() == before and os.listdir(tmp_path) == [name]

    slot = next(v for v in learner.critic_optimizer.variables if v.path.endswith("_momentum"))
    for variable in (theta, learner.critic_variables[0], slot):
        good = variable.numpy()
        variable.assign(np.full(good.shape, np.nan, good.dtype))
        with pytest.raises(ValueError, match=rf"Refusing to save .* of 'savem': variables \['{re.escape(variable.path)}'\] hold NaN or inf"):
            save(path)
        variable.assign(good)
    assert path.read_bytes() == before and os.listdir(tmp_path) == [name]
    np.testing.assert_array_equal(theta_of(path), saved)


KILLED = r'''
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import keras
import test_logged as tl

path = sys.argv[2]
learner = tl.trained_learner()
learner.policy.get_layer("theta").kernel.assign(tl.THETA + 1.0)
method = "save" if path.endswith(".keras") else "save_weights"

def dying(self, filepath, *args, **kwargs):  # killed while Keras writes the file
    with open(filepath, "wb") as f:
        f.write(b"half")
    os.kill(os.getpid(), signal.SIGKILL)

setattr(keras.Model, method, dying)
getattr(learner, method)(path)
'''


@pytest.mark.parametrize("name", ["learner.keras", "learner.weights.h5"])
def test_logged_model_save_killed_midway_leaves_the_previous_file(tmp_path, name):
    learner = trained_learner()
    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / name
    method = "save" if name.endswith(".keras") else "save_weights"
    getattr(learner, method)(path)
    saved = learner.policy.get_layer("theta").kernel.numpy()
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(p for p in (os.path.dirname(tests), os.environ.get("PYTHONPATH")) if p))
    killed = subprocess.run([sys.executable, str(script), tests, str(path)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    np.testing.assert_array_equal(theta_of(path), saved)  # the previous file, whole
    assert set(os.listdir(folder)) != {name}  # the kill left its temporary folder
    getattr(learner, method)(path)  # the next save removes it
    assert os.listdir(folder) == [name]


def trained_under(policy_name, costs_scale=1.0, jit_compile=False, estimator="ips"):
    """`(theta - THETA, learner)` after two epochs of SGD on the bandit's log under
    the dtype policy `policy_name` (restored after), the logged costs times
    `costs_scale`."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy_name)
    try:
        keras.utils.set_random_seed(0)
        policy = bandit_policy()
        learner = logged.LoggedModel(policy, node="action", estimator=estimator)
        learner.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit_compile)
        x, t = draw_log(np.random.default_rng(5), 1000)
        t["cost"] = t["cost"] * np.float32(costs_scale)
        learner.fit(x, t, batch_size=100, epochs=2, verbose=0)
        return policy.get_layer("theta").kernel.numpy() - THETA, learner
    finally:
        keras.mixed_precision.set_global_policy(previous)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_mixed_float16_updates_the_policy_as_float32_does(jit_compile):
    # The LossScaleOptimizer of mixed_float16 unscales the gradient: the
    # estimate must be scaled before it is differentiated, else every update
    # is 1/32768 of float32's (the step ran, and nothing was learned).
    change32, _ = trained_under("float32", jit_compile=jit_compile)
    change16, learner = trained_under("mixed_float16", jit_compile=jit_compile)
    assert isinstance(learner.optimizer, keras.optimizers.LossScaleOptimizer)
    assert np.abs(change32).sum() > 0.1
    np.testing.assert_allclose(change16, change32, rtol=0.05, atol=2e-3)
    # Steps the optimizer skipped for overflow (none expected here) are skipped whole.
    assert int(learner.steps.numpy()) == int(learner.optimizer.iterations.numpy())


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_mixed_float16_huge_costs_stop_fit_at_a_loss_scale_of_one_and_change_nothing(jit_compile):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        policy = bandit_policy()
        learner = logged.LoggedModel(policy, node="action", estimator="ips")
        learner.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit_compile)
        x, t = draw_log(np.random.default_rng(5), 1000)
        t["cost"] = t["cost"] * np.float32(1e20)
        with pytest.raises(FloatingPointError, match="loss scale of at most 1.*Scale the logged costs down"):
            learner.fit(x, t, batch_size=10, epochs=3, verbose=0)
        np.testing.assert_array_equal(policy.get_layer("theta").kernel.numpy(), THETA)
        assert int(learner.steps.numpy()) == 0
        assert float(keras.ops.convert_to_numpy(learner.optimizer.dynamic_scale)) <= 1.0
    finally:
        keras.mixed_precision.set_global_policy(previous)
