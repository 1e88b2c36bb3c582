"""Property-based tests (hypothesis) of the node layers, the estimators and the train step.

Invariants, over random shapes, Categorical masks, logits in [-1e4, 1e4], costs
up to 1e30, batch sizes from 1 and precision policies:

* every sample, log-probability and gradient is finite;
* a masked outcome is never sampled and never given gradient;
* estimators are unbiased against exact enumeration on tiny graphs;
* a training step leaves every weight, critic, target copy, optimizer slot and
  estimator state finite, or is skipped whole with a message that is true.

The CI profile (tests/conftest.py, the default) keeps the file under a minute;
run more examples by hand with `--hypothesis-profile=long`. Every profile runs
the train step's extremes (`EXTREME_LOGITS`, costs of 1e30, both 16-bit
policies) as explicit examples.
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import keras_bpq
from keras_bpq import diagnostics

POLICIES = ["float32", "mixed_float16", "mixed_bfloat16"]
# The train-step and unbiasedness properties build and trace models: they run
# a fifth of the profile's examples.
SLOW_EXAMPLES = max(2, settings.default.max_examples // 5)

logit = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@st.composite
def logits_and_mask(draw, outcomes=None):
    """`[batch, K]` logits in [-1e4, 1e4] (K from 2 to 6 unless given) and a
    boolean mask allowing at least one outcome per row."""
    batch = draw(st.integers(1, 5))
    outcomes = outcomes or draw(st.integers(2, 6))
    logits = np.array(draw(st.lists(logit, min_size=batch * outcomes, max_size=batch * outcomes)))
    mask = np.array(draw(st.lists(st.booleans(), min_size=batch * outcomes, max_size=batch * outcomes)))
    mask = mask.reshape(batch, outcomes)
    allowed = draw(st.lists(st.integers(0, outcomes - 1), min_size=batch, max_size=batch))
    mask[np.arange(batch), allowed] = True
    return logits.reshape(batch, outcomes).astype(np.float32), mask


def with_policy(policy, build):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        return build()
    finally:
        keras.mixed_precision.set_global_policy(previous)


# -- node layers -----------------------------------------------------------------
@given(logits_and_mask(), st.sampled_from(POLICIES), st.integers(0, 2**16))
def test_categorical_never_samples_or_gives_gradient_to_a_masked_outcome(data, policy, seed):
    logits, mask = data
    node = with_policy(policy, lambda: keras_bpq.Categorical(seed=seed))
    params = tf.constant(logits)
    sample = node(params, mask=tf.constant(mask), training=True).numpy().astype(np.float32)
    np.testing.assert_array_equal(sample.sum(axis=-1), 1.0)
    assert not np.any(sample[~mask]), "a masked outcome was sampled"
    with tf.GradientTape() as tape:
        tape.watch(params)
        log_prob = node.log_prob(tf.constant(sample), params, tf.constant(mask))
    grad = tape.gradient(log_prob, params).numpy()
    assert np.all(np.isfinite(log_prob.numpy())) and np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[~mask], 0.0)
    mode = node(params, mask=tf.constant(mask), training=False).numpy()
    assert not np.any(mode[~mask]), "the mode is a masked outcome"


@given(
    st.integers(1, 5),
    st.integers(1, 4),
    st.sampled_from(["bernoulli", "normal"]),
    st.sampled_from(POLICIES),
    st.data(),
)
def test_bernoulli_and_normal_stay_finite_at_extreme_parameters(batch, units, kind, policy, data):
    width = units if kind == "bernoulli" else 2 * units  # Normal: [loc, raw_scale]
    values = data.draw(st.lists(logit, min_size=batch * width, max_size=batch * width))
    params = tf.constant(np.array(values, np.float32).reshape(batch, width))
    node = with_policy(policy, keras_bpq.Bernoulli if kind == "bernoulli" else keras_bpq.Normal)
    sample = node(params, training=True)
    with tf.GradientTape() as tape:
        tape.watch(params)
        log_prob = node.log_prob(tf.stop_gradient(sample), params)
    grad = tape.gradient(log_prob, params)
    for name, value in (("sample", sample), ("log_prob", log_prob), ("gradient", grad)):
        assert np.all(np.isfinite(tf.cast(value, tf.float32).numpy())), name


# -- the train step ----------------------------------------------------------------
OUTCOMES = 3
_STEP_MODELS = {}


def step_model(estimator, policy):
    """x [batch, 3] -> Dense (identity) -> logits -> masked Categorical 'c' and
    Bernoulli 'b' -> cost `scale * (|c - sigmoid(x)|^2 + |b - sigmoid(x)|^2)`,
    computed in float32: at most `6 * scale`, so finite for every scale drawn."""
    key = (estimator, policy)
    if key not in _STEP_MODELS:

        def build():
            x = keras.Input((OUTCOMES,), name="x")
            mask = keras.Input((OUTCOMES,), dtype="bool", name="mask")
            scale = keras.Input((1,), name="scale")
            logits = keras.layers.Dense(OUTCOMES, kernel_initializer="identity", name="enc")(x)
            c = keras_bpq.Categorical(name="c", seed=1)(logits, mask=mask)
            b = keras_bpq.Bernoulli(name="b", seed=2)(keras.layers.Dense(OUTCOMES, name="enc_b")(c))
            target = keras.ops.sigmoid(x)
            cost = keras.ops.sum(
                keras.ops.square(keras.ops.cast(c, "float32") - target)
                + keras.ops.square(keras.ops.cast(b, "float32") - target),
                axis=-1,
            ) * scale[:, 0]
            model = keras_bpq.BackpropQModel(
                inputs={"x": x, "mask": mask, "scale": scale}, outputs=b, costs={"cost": cost}, name="prop"
            )
            model.compile(optimizer=keras.optimizers.Adam(0.01), estimator=estimator)
            model.build_training_state()
            return model

        _STEP_MODELS[key] = with_policy(policy, build)
    return _STEP_MODELS[key]


def step_variables(model):
    variables = list(model.weights) + list(model.optimizer.variables)
    if model.critic_optimizer is not None:
        variables += list(model.critic_optimizer.variables)
    return [v for v in variables if v.path != "training_state/status"]


TRUE_SKIPS = (
    r"the gradient was not finite although every cost was",
    r"the update would have written a non-finite value \(NaN or inf\) into .* although every cost was finite",
)


def cost_can_overflow(policy, scale):
    """Whether the cost of `step_model` can be non-finite: its inputs are cast
    to the compute dtype, where `scale` may not fit (float16 tops at 65504)."""
    return policy == "mixed_float16" and scale > float(np.finfo(np.float16).max)


# The extremes, run on every profile besides the drawn examples (the CI
# profile draws only SLOW_EXAMPLES): logits of +-1e4 with the largest one
# masked, costs of 1e30, under both 16-bit policies.
EXTREME_LOGITS = np.array([[1e4, -1e4, 1e4], [-1e4, 1e4, -1e4]], np.float32)
EXTREME_MASK = np.array([[False, True, True], [True, False, True]])


@settings(max_examples=SLOW_EXAMPLES)
@given(
    st.sampled_from([("reinforce", "float32"), ("critic_cv", "float32"), ("reinforce", "mixed_float16"),
                     ("critic_cv", "mixed_bfloat16")]),
    logits_and_mask(outcomes=OUTCOMES),
    st.integers(0, 30),
)
@example(("reinforce", "mixed_float16"), (EXTREME_LOGITS, EXTREME_MASK), 30)
@example(("critic_cv", "mixed_bfloat16"), (EXTREME_LOGITS, EXTREME_MASK), 30)
def test_a_train_step_leaves_everything_finite_or_is_skipped_truthfully(setting, data, exponent):
    logits, mask = data
    model = step_model(*setting)
    batch = len(logits)
    inputs = {
        "x": np.clip(logits, -1e4, 1e4).astype(np.float32),
        "mask": mask,
        "scale": np.full((batch, 1), 10.0**exponent, np.float32),
    }
    variables = step_variables(model)
    before = [v.numpy().copy() for v in variables]
    loss_scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    scale = float(model.optimizer.dynamic_scale.numpy()) if loss_scaled else None
    try:
        model.train_on_batch(inputs)
    except FloatingPointError as error:
        true_skips = TRUE_SKIPS + ((r"cost 'cost' was not finite",) if cost_can_overflow(setting[1], 10.0**exponent) else ())
        if loss_scaled and scale <= 1.0:
            # The cached model's loss scale fell to 1 over earlier examples.
            true_skips += (r"the actor's gradient was not finite in a training step at a loss scale of at most 1",)
        assert any(re.search(p, str(error)) for p in true_skips), str(error)
        for variable, value in zip(variables, before):
            np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)
    else:
        if loss_scaled and float(model.optimizer.dynamic_scale.numpy()) < scale:
            # The LossScaleOptimizer skipped the update (and halved its
            # scale): the step is skipped whole, its step counter included.
            kept = {id(model.optimizer.dynamic_scale), id(model.optimizer.step_counter)}
            for variable, value in zip(variables, before):
                if id(variable) not in kept:
                    np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)
    for variable in variables:
        value = variable.numpy()
        if value.dtype.kind == "f":
            assert np.all(np.isfinite(value)), variable.path


# -- unbiasedness against enumeration --------------------------------------------------
_TINY_MODELS = {}


def tiny_model(estimator):
    """x [batch, 3] -> Dense 'enc' -> masked Categorical 'c' (3 outcomes) ->
    Dense 'dec' -> cost |dec(c) - x|^2: enumerable, with a deterministic path."""
    if estimator not in _TINY_MODELS:
        x = keras.Input((OUTCOMES,), name="x")
        mask = keras.Input((OUTCOMES,), dtype="bool", name="mask")
        c = keras_bpq.Categorical(name="c", seed=3)(keras.layers.Dense(OUTCOMES, name="enc")(x), mask=mask)
        h = keras.layers.Dense(OUTCOMES, name="dec")(c)
        cost = keras.ops.sum(keras.ops.square(h - x), axis=-1)
        model = keras_bpq.BackpropQModel(inputs={"x": x, "mask": mask}, outputs=h, costs={"cost": cost})
        model.compile(optimizer="sgd", estimator=estimator, num_samples=2 if estimator == "rloo" else 1)
        _TINY_MODELS[estimator] = model
    return _TINY_MODELS[estimator]


DRAWS = 400
# Kernels within +-0.25 on inputs within +-1 keep every allowed outcome's
# probability above 0.07: each is drawn about 30 times in DRAWS, so the draws'
# standard error is a fair yardstick (a rarer outcome, never drawn, would bias
# the sample mean beyond it without any estimator bias).

@settings(max_examples=SLOW_EXAMPLES)
@given(
    st.sampled_from(["reinforce", "critic_cv", "local_expectation", "rloo"]),
    st.lists(st.floats(-0.25, 0.25, width=32), min_size=2 * OUTCOMES * OUTCOMES, max_size=2 * OUTCOMES * OUTCOMES),
    st.lists(st.booleans(), min_size=2 * OUTCOMES, max_size=2 * OUTCOMES),
)
def test_estimators_are_unbiased_and_masked_outcomes_get_no_gradient(estimator, weights, mask_bits):
    model = tiny_model(estimator)
    weights = np.array(weights, np.float32)
    model.get_layer("enc").kernel.assign(weights[: OUTCOMES * OUTCOMES].reshape(OUTCOMES, OUTCOMES))
    model.get_layer("dec").kernel.assign(weights[OUTCOMES * OUTCOMES :].reshape(OUTCOMES, OUTCOMES))
    mask = np.array(mask_bits).reshape(2, OUTCOMES)
    mask[:, 0] = True  # every row allows an outcome
    x = {"x": np.random.RandomState(0).uniform(-1, 1, size=(2, OUTCOMES)).astype(np.float32), "mask": mask}
    exact = diagnostics.exact_gradients(model, x)
    draws = diagnostics.estimate_gradients(model, x, num_draws=DRAWS, chunk_size=DRAWS)
    never = ~mask.any(axis=0)  # outcomes masked in every row
    for variable, truth, samples in zip(model.actor_variables, exact, draws):
        assert np.all(np.isfinite(samples)), variable.path
        mean = samples.mean(axis=0)
        stderr = samples.std(axis=0, ddof=1) / np.sqrt(DRAWS)
        assert np.all(np.abs(mean - truth) <= 5 * stderr + 1e-4), (variable.path, mean, truth)
        if variable.path == "enc/kernel":
            assert not np.any(samples[:, :, never]), "a masked outcome got gradient"
        if variable.path == "enc/bias":
            assert not np.any(samples[:, never]), "a masked outcome got gradient"
