"""Mixed precision: keras.mixed_precision policies around a BackpropQModel."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import graphs
from keras_bpq import diagnostics

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
        for name, record in out["records"].items():
            assert record.layer.compute_dtype == "bfloat16"
            assert record.sample.dtype == tf.bfloat16, name
            assert record.log_prob().dtype == tf.float32, name
        assert {c.dtype for c in out["costs"].values()} == {tf.float32}
        assert out["total"].dtype == tf.float32 and out["surrogate"].dtype == tf.float32
        critics = model._evaluate_critics(out, out["x"], out["y"], with_gradient=True)
        assert critics["targets"] and all(t.dtype == tf.float32 for t in critics["targets"].values())
        for loss, td_error in critics["per_node"].values():
            assert loss.dtype == tf.float32 and td_error.dtype == tf.float32
        assert all(g is not None and g.dtype == tf.float32 for g in critics["grads"])
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
