"""Stochastic node layers (keras_bpq.nodes): shapes, sampling, masks, seeds and config.

Every sampling check uses seeded nodes, so each statistical assertion is
deterministic; the tolerances (4 standard errors) are what a correct sampler
passes for any seed.
"""

import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import graphs
import keras_bpq
from keras_bpq import nodes

tfd = tfp.distributions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROWS = 4000  # rows for frequency checks


@keras.saving.register_keras_serializable(package="tests")
def nodes_poisson(params):  # a distinctive name: the registry is global
    """A registered distribution_fn for the generic StochasticNode."""
    return tfd.Poisson(log_rate=params)


def softplus_inverse(y):
    return np.log(np.expm1(y)).astype(np.float32)


def softmax(logits, axis=-1):
    e = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def params(*shape, seed=0):
    return np.random.RandomState(seed).normal(size=shape).astype(np.float32)


# name -> (layer factory, parameter shape, sample shape)
NODES = {
    "bernoulli": (lambda **kw: keras_bpq.Bernoulli(**kw), (8, 3), (8, 3)),
    "bernoulli_rank3": (lambda **kw: keras_bpq.Bernoulli(**kw), (8, 2, 3), (8, 2, 3)),
    "categorical": (lambda **kw: keras_bpq.Categorical(**kw), (8, 4), (8, 4)),
    "normal": (lambda **kw: keras_bpq.Normal(**kw), (8, 4), (8, 2)),
    "normal_fixed_scale": (lambda **kw: keras_bpq.Normal(scale=0.5, **kw), (8, 3), (8, 3)),
    "stochastic_node": (lambda **kw: keras_bpq.StochasticNode(nodes_poisson, **kw), (8, 3), (8, 3)),
}


def assert_valid_sample(kind, sample):
    if kind.startswith("bernoulli"):
        assert set(np.unique(sample)) <= {0.0, 1.0}
    elif kind == "categorical":
        assert set(np.unique(sample)) <= {0.0, 1.0}
        np.testing.assert_array_equal(sample.sum(axis=-1), 1.0)
    elif kind == "stochastic_node":
        assert np.all(sample >= 0) and np.array_equal(sample, np.round(sample))
    else:
        assert np.all(np.isfinite(sample))


# -- shapes, dtypes, values -------------------------------------------------
@pytest.mark.parametrize("kind", sorted(NODES))
def test_sample_shape_dtype_and_values(kind):
    make, param_shape, sample_shape = NODES[kind]
    layer = make(seed=1, name=f"{kind}_node")
    sample = layer(params(*param_shape))
    assert tuple(sample.shape) == sample_shape
    assert keras.backend.standardize_dtype(sample.dtype) == "float32"
    assert_valid_sample(kind, np.asarray(sample))

    # Symbolic call (functional API): same shape with a free batch axis.
    symbolic = make(name=f"{kind}_symbolic")(keras.Input(param_shape[1:]))
    assert tuple(symbolic.shape) == (None,) + sample_shape[1:]
    assert keras.backend.standardize_dtype(symbolic.dtype) == "float32"


@pytest.mark.parametrize(
    "kind", sorted(k for k in NODES if k != "stochastic_node")
)
def test_compute_output_shape(kind):
    make, param_shape, sample_shape = NODES[kind]
    layer = make()
    assert tuple(layer.compute_output_shape((None,) + param_shape[1:])) == (
        (None,) + sample_shape[1:]
    )
    assert tuple(layer.compute_output_shape(param_shape)) == sample_shape


def test_stochastic_node_compute_output_shape():
    layer = keras_bpq.StochasticNode(nodes_poisson, name="counts")
    assert tuple(layer.compute_output_shape((None, 3))) == (None, 3)


def test_training_false_returns_mode_or_mean():
    logits = np.array([[-1.0, 0.5, 2.0, -0.1], [3.0, -2.0, 0.2, 0.1]], np.float32)

    bern = keras_bpq.Bernoulli(seed=1)
    np.testing.assert_array_equal(bern(logits, training=False), (logits > 0).astype(np.float32))

    cat = keras_bpq.Categorical(seed=1)
    expected = np.eye(4, dtype=np.float32)[logits.argmax(axis=-1)]
    for _ in range(2):  # the mode does not depend on the seed stream
        np.testing.assert_array_equal(cat(logits, training=False), expected)

    normal = keras_bpq.Normal(seed=1)
    loc = logits[:, :2]
    np.testing.assert_allclose(normal(logits, training=False), loc, rtol=1e-6)

    fixed = keras_bpq.Normal(scale=0.5, seed=1)
    np.testing.assert_allclose(fixed(logits, training=False), logits, rtol=1e-6)

    # training=True (or None) samples instead.
    samples = fixed(np.repeat(logits, 8, axis=0), training=True)
    assert not np.allclose(samples, np.repeat(logits, 8, axis=0))


# -- sample frequencies -----------------------------------------------------
def test_bernoulli_frequencies_match_sigmoid():
    logits = np.array([[-1.0, 0.0, 2.0]], np.float32)
    sample = np.asarray(keras_bpq.Bernoulli(seed=3)(np.repeat(logits, ROWS, axis=0)))
    p = 1.0 / (1.0 + np.exp(-logits[0]))
    stderr = np.sqrt(p * (1 - p) / ROWS)
    assert np.all(np.abs(sample.mean(axis=0) - p) <= 4 * stderr), (sample.mean(axis=0), p)


def test_categorical_frequencies_match_softmax():
    logits = np.array([[-1.0, 0.0, 2.0, 0.5]], np.float32)
    sample = np.asarray(keras_bpq.Categorical(seed=3)(np.repeat(logits, ROWS, axis=0)))
    np.testing.assert_array_equal(sample.sum(axis=-1), 1.0)
    p = softmax(logits[0])
    stderr = np.sqrt(p * (1 - p) / ROWS)
    assert np.all(np.abs(sample.mean(axis=0) - p) <= 4 * stderr), (sample.mean(axis=0), p)


def test_frequencies_under_xla_match_the_distribution():
    """Under XLA the noise is Threefry's (`nodes.stateless_uniform`) and a
    Categorical sample is a Gumbel-max of it: the frequencies still match
    sigmoid / the renormalised softmax, and a masked outcome is never drawn."""
    logits = np.array([[-1.0, 0.0, 2.0, 0.5]], np.float32)
    bernoulli, categorical = keras_bpq.Bernoulli(seed=3), keras_bpq.Categorical(seed=4)
    mask = np.tile(np.array([[True, False, True, True]]), (ROWS, 1))
    draw = tf.function(
        lambda t, m: (bernoulli(t), categorical(t), categorical(t, mask=m)), jit_compile=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # see test_masked_categorical_warns_nothing
        ones, one_hot, masked = (np.asarray(v) for v in draw(np.repeat(logits, ROWS, axis=0), mask))
    for sample, p in [
        (ones, 1.0 / (1.0 + np.exp(-logits[0]))),
        (one_hot, softmax(logits[0])),
        (masked, renormalised(logits[0], mask[0])),
    ]:
        stderr = np.sqrt(p * (1 - p) / ROWS)
        assert np.all(np.abs(sample.mean(axis=0) - p) <= 4 * stderr + 1e-9), (sample.mean(axis=0), p)
    np.testing.assert_array_equal(one_hot.sum(axis=-1), 1.0)
    assert not np.any(masked[:, 1]), "a masked outcome was sampled"


def test_first_argmax_is_argmax_taking_the_first_of_a_tie():
    values = params(6, 5, 7)
    np.testing.assert_array_equal(nodes.first_argmax(values), np.argmax(values, axis=-1))
    ties = np.array([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0], [-1e9, -1e9, -1e9]], np.float32)
    np.testing.assert_array_equal(nodes.first_argmax(ties), [1, 0, 0])


def test_a_categorical_of_hundreds_of_outcomes_compiles_under_xla_in_seconds():
    """`tf.argmax` of Threefry noise over 200 outcomes took XLA on CPU over
    100 s to compile, `nodes.first_argmax` takes under a second. In a child
    process, so that a regression fails at the timeout instead of hanging."""
    code = (
        "import numpy as np, tensorflow as tf, keras_bpq\n"
        "sample = tf.function(keras_bpq.Categorical(seed=1), jit_compile=True)(np.zeros((128, 200), np.float32))\n"
        "np.testing.assert_array_equal(np.sum(sample, axis=-1), 1.0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_the_num_samples_draws_of_an_example_are_independent(mode):
    """With `compile(num_samples=2)` the two rows of an example draw
    independently: given their parameters `p` and `p'`, they agree with
    probability `sum_k p_k p'_k` (per Bernoulli unit, `p p' + (1 - p)(1 - p')`),
    not more often (shared or correlated noise) and not less."""
    model, x = graphs.tree()  # Bernoulli z1 and a; a 3-way Categorical b, which depends on z1
    model.compile(estimator="reinforce", num_samples=2, jit_compile=mode == "xla")
    data = tf.constant(np.repeat(x, ROWS // len(x), axis=0))

    def draws(data):
        """`{node: (sample, probabilities)}` of one pass."""
        records = model.run_forward(data).records
        return {
            name: (r.sample, r.layer.distribution(r.params).probs_parameter()) for name, r in records.items()
        }

    run = draws if mode == "eager" else tf.function(draws, jit_compile=mode == "xla")
    for name, (sample, probs) in run(data).items():
        sample, probs = np.asarray(sample), np.asarray(probs)
        if name != "b":  # each unit a two-outcome choice
            probs, sample = np.stack([1 - probs, probs], -1), np.stack([1 - sample, sample], -1)
        agree = np.sum(sample[0::2] * sample[1::2], axis=-1).ravel()
        expected = np.sum(probs[0::2] * probs[1::2], axis=-1).ravel()
        stderr = np.sqrt(np.sum(expected * (1 - expected))) / len(expected)
        assert abs(agree.mean() - expected.mean()) <= 4 * stderr, (name, agree.mean(), expected.mean())


# -- Categorical masks ------------------------------------------------------
MASK_LOGITS = np.array([[1.0, 4.0, 0.0, 0.5], [2.0, 0.0, 3.0, -1.0]], np.float32)
MASK = np.array([[True, False, True, True], [False, True, False, True]])


def renormalised(logits, mask):
    p = np.where(mask, np.exp(logits), 0.0)
    return p / p.sum(axis=-1, keepdims=True)


def test_categorical_mask_is_never_sampled_and_renormalises():
    # The forbidden outcomes have the largest logits, so a broken mask shows.
    logits = np.tile(MASK_LOGITS, (ROWS // 2, 1))
    mask = np.tile(MASK, (ROWS // 2, 1))
    layer = keras_bpq.Categorical(seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # see test_masked_categorical_warns_nothing
        sample = np.asarray(layer(logits, mask=mask))
    np.testing.assert_array_equal(sample.sum(axis=-1), 1.0)
    assert not np.any(sample[~mask]), "a masked outcome was sampled"
    for row in range(2):
        rows = sample[row::2]
        p = renormalised(MASK_LOGITS[row], MASK[row])
        stderr = np.sqrt(p * (1 - p) / rows.shape[0])
        assert np.all(np.abs(rows.mean(axis=0) - p) <= 4 * stderr + 1e-9), (rows.mean(0), p)


def test_categorical_mask_mode_and_log_prob():
    layer = keras_bpq.Categorical(seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mode = np.asarray(layer(MASK_LOGITS, mask=MASK, training=False))
    np.testing.assert_array_equal(mode, np.eye(4, dtype=np.float32)[[0, 1]])

    with np.errstate(divide="ignore"):
        expected = np.log(renormalised(MASK_LOGITS, MASK))
    for k in range(4):
        allowed = MASK[:, k]
        one_hot = np.tile(np.eye(4, dtype=np.float32)[k], (2, 1))
        log_p = np.asarray(layer.log_prob(one_hot, MASK_LOGITS, MASK))
        assert log_p.shape == (2,)
        np.testing.assert_allclose(log_p[allowed], expected[allowed, k], rtol=1e-5, atol=1e-6)
        # A forbidden outcome is (numerically) impossible, yet stays finite.
        assert np.all(np.isfinite(log_p)) and np.all(log_p[~allowed] < -1e6)


def test_masked_categorical_warns_nothing():
    logits = keras.Input((4,))
    mask = keras.Input((4,), dtype="bool")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keras_bpq.Categorical(name="masked")(logits, mask=mask)
        keras_bpq.Categorical(name="masked_eager")(MASK_LOGITS, mask=MASK)
    messages = [str(w.message) for w in caught if "mask" in str(w.message)]
    assert not messages, messages


EMPTY_ROW_MASK = np.array([[True, False, True, True], [False, False, False, False]])


def test_categorical_mask_row_without_outcome_is_an_error_naming_node_and_row():
    layer = keras_bpq.Categorical(name="picky", seed=5)
    message = r"(?s)Categorical node `picky`: row.*\b1\b.*of its mask allows no outcome"
    for training in (True, False):  # a sample, and the mode
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            layer(MASK_LOGITS, mask=EMPTY_ROW_MASK, training=training)
        traced = tf.function(lambda logits, mask: layer(logits, mask=mask, training=training))
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            traced(MASK_LOGITS, EMPTY_ROW_MASK)
    # Rank 3: the row is given along every axis but the outcomes'.
    mask = np.ones((2, 3, 4), bool)
    mask[1, 2] = False
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)`picky`: row.*1,? 2.*allows no outcome"):
        layer(np.zeros((2, 3, 4), np.float32), mask=mask)


def test_categorical_mask_row_without_outcome_is_nan_under_xla():
    """XLA drops assertions: such a row then comes back NaN, never a forbidden outcome."""
    layer = keras_bpq.Categorical(name="picky_xla", seed=5)
    for training in (True, False):
        fn = tf.function(lambda logits, mask: layer(logits, mask=mask, training=training), jit_compile=True)
        sample = np.asarray(fn(MASK_LOGITS, EMPTY_ROW_MASK))
        assert np.all(np.isnan(sample[1])), sample
        assert sample[0].sum() == 1.0 and not np.any(sample[0][~EMPTY_ROW_MASK[0]]), sample


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_model_with_a_mask_row_without_outcome_never_trains_on_it(jit_compile):
    """fit stops before any update, naming the node and row (under XLA too: the
    step is skipped and reported); predict raises naming them."""
    model, queries = graphs.walk_task()
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit_compile)
    x = queries[:8].copy()
    x[5, :10] = 0.0  # this walk starts nowhere: hop1 may go nowhere
    before = [v.numpy().copy() for v in model.weights]
    if jit_compile:
        with pytest.raises(FloatingPointError, match="Categorical node 'hop1': row 5 of its mask allows no outcome"):
            model.fit(x, batch_size=8, epochs=1, shuffle=False, verbose=0)
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"Categorical node `hop1`: row\] \[5\]"):
            model.fit(x, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for variable, value in zip(model.weights, before):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"Categorical node `hop1`: row\]? \[?5\b"):
        model.predict(x, batch_size=8, verbose=0)
    # The rows that allow an outcome still train and predict.
    good = np.delete(x, 5, axis=0)
    model.fit(good, batch_size=7, epochs=1, verbose=0)
    assert np.all(np.isfinite(model.predict(good, verbose=0)))


EMPTY_ROW_TEXT = (
    "of its mask allows no outcome (every entry is False). Every row of the mask must allow at "
    "least one outcome: allow one (e.g. a stay or no-op outcome) or leave such rows out of the batch."
)


def inference_errors(model, x, good):
    """`{call: message}` of the InvalidArgumentError that predict, evaluate and
    their `_on_batch` forms raise on `x` (its second batch of 8 holds a mask
    row without outcome); then checks that rows `good` still predict."""
    calls = {
        "predict": lambda: model.predict(x, batch_size=8, verbose=0),
        "evaluate": lambda: model.evaluate(x, batch_size=8, verbose=0),
        "predict_on_batch": lambda: model.predict_on_batch(x[8:]),
        "test_on_batch": lambda: model.test_on_batch(x[8:]),
    }
    messages = {}
    for name, call in calls.items():
        with pytest.raises(tf.errors.InvalidArgumentError) as error:
            call()
        messages[name] = error.value.message
    assert np.all(np.isfinite(model.predict(good, batch_size=8, verbose=0)))
    return messages


def test_inference_under_xla_raises_the_assertion_error_for_a_mask_row_without_outcome():
    """XLA drops the masks' assertions: predict, evaluate, predict_on_batch and
    test_on_batch then raise after their loop the error, with the same message,
    that they raise without XLA, naming the node and the row of the batch."""
    _, queries = graphs.walk_task()
    x = queries[:16].copy()
    x[13, :10] = 0.0  # row 5 of the second batch: hop1 may go nowhere
    good = np.delete(x, 13, axis=0)
    for jit_compile in (False, True):
        model, _ = graphs.walk_task()
        model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit_compile)
        for name, message in inference_errors(model, x, good).items():
            assert "Categorical node `hop1`: row" in message and "allows no outcome" in message, (name, message)
            if jit_compile:
                assert message == f"Categorical node `hop1`: row 5 {EMPTY_ROW_TEXT}", (name, message)
            else:  # the assertion prints each part in brackets
                assert f"[Categorical node `hop1`: row] [5] [{EMPTY_ROW_TEXT}]" in message, (name, message)


def _grid_model():
    """A Categorical node of 3 independent choices of 4 outcomes per example
    (logits and mask `[batch, 3, 4]`), and 16 inputs whose position (5, 2) of
    the second batch of 8 allows no outcome (row 13 of the inputs)."""
    x = keras.Input((3, 4))
    logits = keras.layers.Dense(4, name="grid_logits")(x)
    grid = keras_bpq.Categorical(name="grid", seed=3)(logits, mask=keras.ops.greater(x, 0.0))
    model = keras_bpq.BackpropQModel(
        inputs=x, outputs=grid, costs={"c": keras.ops.sum(grid * x, axis=(1, 2))}, name="gridm"
    )
    inputs = np.random.RandomState(0).uniform(0.1, 1.0, (16, 3, 4)).astype("float32")
    inputs[13, 2] = -1.0
    return model, inputs


def test_inference_under_xla_names_the_row_of_a_rank_3_mask_as_its_assertion_does():
    model, inputs = _grid_model()
    good = np.delete(inputs, 13, axis=0)
    messages = {}
    for jit_compile in (False, True):
        model.compile(optimizer="sgd", jit_compile=jit_compile)  # auto: critic_cv
        messages[jit_compile] = inference_errors(model, inputs, good)
    for name, message in messages[True].items():
        assert message == f"Categorical node `grid`: row [5 2] {EMPTY_ROW_TEXT}", (name, message)
        assert f"[Categorical node `grid`: row] [5 2] [{EMPTY_ROW_TEXT}]" in messages[False][name], messages[False][name]


def test_fit_under_xla_names_the_row_of_a_rank_3_mask_as_inference_does():
    """fit's FloatingPointError gives the row's index along every axis but the
    last, as predict and evaluate (and the assertion outside XLA) do, and the
    step is skipped; the default estimator (critic_cv) serves the node."""
    model, inputs = _grid_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=True)
    assert model.node_estimators["grid"].name == "critic_cv"
    before = [v.numpy().copy() for v in model.weights]
    message = r"Categorical node 'grid': row \[5 2\] of its mask allows no outcome in a training step \(its index"
    with pytest.raises(FloatingPointError, match=message):
        model.fit(inputs[8:], batch_size=8, epochs=1, shuffle=False, verbose=0)
    for variable, value in zip(model.weights, before):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)


@pytest.mark.parametrize("dtype", ["float32", "int32"])
def test_categorical_mask_must_be_boolean(dtype):
    mask = MASK.astype(dtype) * 2  # 0/2: a cast would quietly read "allowed"
    with pytest.raises(TypeError, match=r"'mask_dtype'.*must be boolean.*got dtype " + dtype):
        keras_bpq.Categorical(name="mask_dtype")(MASK_LOGITS, mask=mask)
    with pytest.raises(TypeError, match=r"'mask_dtype_symbolic'.*must be boolean"):
        keras_bpq.Categorical(name="mask_dtype_symbolic")(keras.Input((4,)), mask=keras.Input((4,), dtype=dtype))


# -- Normal -----------------------------------------------------------------
def test_normal_loc_and_softplus_scale():
    loc = np.array([1.0, -2.0], np.float32)
    scale = np.array([0.5, 2.0], np.float32)
    raw = softplus_inverse(scale - 1e-5)
    inputs = np.tile(np.concatenate([loc, raw])[None], (ROWS, 1))
    layer = keras_bpq.Normal(seed=7)
    assert tuple(layer.compute_output_shape((None, 4))) == (None, 2)
    assert tuple(layer.compute_output_shape((None, 3, 6))) == (None, 3, 3)
    sample = np.asarray(layer(inputs))
    assert sample.shape == (ROWS, 2)
    assert np.all(np.abs(sample.mean(axis=0) - loc) <= 4 * scale / np.sqrt(ROWS))
    std_err = scale / np.sqrt(2 * ROWS)
    assert np.all(np.abs(sample.std(axis=0, ddof=1) - scale) <= 4 * std_err)


def test_normal_fixed_scale_takes_loc_alone():
    loc = np.array([0.0, 3.0, -1.0], np.float32)
    layer = keras_bpq.Normal(scale=0.5, seed=7)
    assert tuple(layer.compute_output_shape((None, 3))) == (None, 3)
    sample = np.asarray(layer(np.tile(loc[None], (ROWS, 1))))
    assert sample.shape == (ROWS, 3)
    assert np.all(np.abs(sample.mean(axis=0) - loc) <= 4 * 0.5 / np.sqrt(ROWS))
    assert np.all(np.abs(sample.std(axis=0, ddof=1) - 0.5) <= 4 * 0.5 / np.sqrt(2 * ROWS))


@pytest.mark.parametrize(
    "scale, error",
    [
        (0.0, ValueError), (-0.5, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
        (1e300, ValueError), (1e-50, ValueError), ([0.5, -1.0], ValueError), ([], ValueError),
        ("0.5", TypeError), (True, TypeError), ({"scale": 1.0}, TypeError),
    ],
    ids=["zero", "negative", "nan", "inf", "inf_in_float32", "zero_in_float32", "one_negative",
         "empty", "string", "bool", "dict"],
)
def test_normal_refuses_an_invalid_fixed_scale_naming_the_node(scale, error):
    with pytest.raises(error, match=r"Normal node 'fixed': scale must be"):
        keras_bpq.Normal(scale=scale, name="fixed")


def test_normal_fixed_scale_per_unit():
    layer = keras_bpq.Normal(scale=np.array([0.5, 2.0], np.float32), seed=3, name="per_unit")
    assert layer.scale == [0.5, 2.0]
    loc = params(6, 2, seed=1)
    sample = np.asarray(layer(loc))
    expected = tfd.Normal(loc, [0.5, 2.0]).log_prob(sample).numpy().sum(axis=1)
    np.testing.assert_allclose(layer.log_prob(sample, loc), expected, rtol=1e-5)
    assert keras_bpq.Normal.from_config(layer.get_config()).scale == [0.5, 2.0]


@pytest.mark.parametrize(
    "seed, error",
    [("7", TypeError), (1.0, TypeError), (True, TypeError), (2**31, ValueError), (-(2**31) - 1, ValueError)],
    ids=["string", "float", "bool", "above_int32", "below_int32"],
)
def test_bad_seed_is_an_error_naming_the_node(seed, error):
    with pytest.raises(error, match=r"Bernoulli node 'seeded': seed must"):
        keras_bpq.Bernoulli(seed=seed, name="seeded")


def test_numpy_integer_seed_is_the_same_seed():
    inputs = params(8, 3, seed=2)
    first = np.asarray(keras_bpq.Bernoulli(seed=np.int64(11))(inputs))
    np.testing.assert_array_equal(first, keras_bpq.Bernoulli(seed=11)(inputs))
    assert keras_bpq.Bernoulli(seed=np.int64(11)).get_config()["seed"] == 11


def test_distribution_fn_must_be_callable():
    with pytest.raises(TypeError, match=r"StochasticNode 'counts': distribution_fn must be a function"):
        keras_bpq.StochasticNode("poisson", name="counts")


# -- seeds ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bernoulli", "categorical", "normal", "stochastic_node"])
def test_seed_reproduces_first_sample_and_then_advances(kind):
    make, param_shape, _ = NODES[kind]
    inputs = params(*param_shape, seed=2)
    first = make(seed=11, name="a")
    twin = make(seed=11, name="b")
    other = make(seed=12, name="c")
    a1 = np.asarray(first(inputs))
    np.testing.assert_array_equal(a1, np.asarray(twin(inputs)))
    assert not np.array_equal(a1, np.asarray(other(inputs))), "the seed is ignored"
    a2 = np.asarray(first(inputs))
    assert not np.array_equal(a1, a2), "consecutive calls gave the same sample"
    np.testing.assert_array_equal(a2, np.asarray(twin(inputs)))


# -- Keras citizenship ------------------------------------------------------
@pytest.mark.parametrize(
    "cls, extra",
    [
        (keras_bpq.Bernoulli, {}),
        (keras_bpq.Categorical, {}),
        (keras_bpq.Normal, {}),
        (keras_bpq.Normal, {"scale": 0.5}),
    ],
    ids=["bernoulli", "categorical", "normal", "normal_fixed_scale"],
)
def test_get_config_round_trip(cls, extra):
    layer = cls(estimator="reinforce", seed=5, name="node", **extra)
    config = layer.get_config()
    assert config["estimator"] == "reinforce" and config["seed"] == 5
    clone = cls.from_config(config)
    assert type(clone) is cls
    assert clone.name == "node" and clone.estimator == "reinforce" and clone.seed == 5
    assert clone.get_config() == config
    if cls is keras_bpq.Normal:
        assert clone.scale == extra.get("scale")
    # Same seed, so the clone draws what the original draws.
    inputs = params(8, 4, seed=3)
    np.testing.assert_array_equal(layer(inputs), clone(inputs))

    # Registered: generic Keras serialisation finds the class by name.
    assert keras.saving.get_registered_object(f"keras_bpq>{cls.__name__}") is cls
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is cls and restored.get_config() == config


def test_stochastic_node_is_registered():
    assert (
        keras.saving.get_registered_object("keras_bpq>StochasticNode")
        is keras_bpq.StochasticNode
    )


def test_stochastic_node_round_trips_registered_distribution_fn():
    layer = keras_bpq.StochasticNode(nodes_poisson, estimator="reinforce", seed=9, name="counts")
    serialized = keras.saving.serialize_keras_object(layer)
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is keras_bpq.StochasticNode
    assert restored.distribution_fn is nodes_poisson
    assert restored.name == "counts" and restored.estimator == "reinforce" and restored.seed == 9
    clone = keras_bpq.StochasticNode.from_config(layer.get_config())
    assert clone.distribution_fn is nodes_poisson
    inputs = params(8, 3, seed=4)
    first = np.asarray(layer(inputs))  # all three start from seed 9
    np.testing.assert_array_equal(first, restored(inputs))
    np.testing.assert_array_equal(first, clone(inputs))


def test_bernoulli_after_masking_layer_ignores_keras_mask():
    tokens = keras.Input((4,), dtype="int32")
    embedded = keras.layers.Embedding(10, 3, mask_zero=True)(tokens)
    h = keras.layers.Dense(2, name="to_logits")(embedded)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        z = keras_bpq.Bernoulli(name="z", seed=1)(h)
    model = keras_bpq.BackpropQModel(
        inputs=tokens, outputs=z, costs={"cost": keras.ops.sum(z, axis=(1, 2))}
    )
    model.compile(optimizer="sgd")
    assert model.scg().node_names == ("z",)


@pytest.mark.filterwarnings("ignore:Layer 'c' .* does not support masking:UserWarning")
def test_functional_model_with_bernoulli_and_masked_categorical_predicts():
    x = keras.Input((3,), name="x")
    allowed = keras.Input((4,), dtype="bool", name="allowed")
    z = keras_bpq.Bernoulli(name="z", seed=1)(keras.layers.Dense(2, name="enc")(x))
    c = keras_bpq.Categorical(name="c", seed=2)(keras.layers.Dense(4, name="pick")(z), mask=allowed)
    cost = keras.ops.sum(c * keras.ops.concatenate([x, z[:, :1]], axis=-1), axis=-1)
    model = keras_bpq.BackpropQModel(inputs=[x, allowed], outputs=[z, c], costs={"cost": cost})
    model.compile(optimizer="sgd")
    assert model.scg().node_names == ("z", "c")

    xs = params(8, 3, seed=5)
    mask = np.ones((8, 4), bool)
    mask[:, 1] = False
    mask[::2, 3] = False
    z_pred, c_pred = model.predict([xs, mask], batch_size=8, verbose=0)
    assert z_pred.shape == (8, 2) and c_pred.shape == (8, 4)

    # predict runs with training=False: every node returns its mode.
    enc, pick = model.get_layer("enc"), model.get_layer("pick")
    z_mode = (xs @ enc.kernel.numpy() + enc.bias.numpy() > 0).astype(np.float32)
    logits = z_mode @ pick.kernel.numpy() + pick.bias.numpy()
    c_mode = np.eye(4, dtype=np.float32)[np.where(mask, logits, -np.inf).argmax(axis=-1)]
    np.testing.assert_array_equal(z_pred, z_mode)
    np.testing.assert_array_equal(c_pred, c_mode)
    assert not np.any(c_pred[~mask])


# -- log-prob ---------------------------------------------------------------
def tfp_log_prob(kind, sample, inputs):
    if kind.startswith("bernoulli"):
        dist = tfd.Bernoulli(logits=inputs)
    elif kind == "categorical":
        return tfd.OneHotCategorical(logits=inputs).log_prob(sample).numpy()
    elif kind == "normal":
        loc, raw = np.split(inputs, 2, axis=-1)
        dist = tfd.Normal(loc, np.log1p(np.exp(raw)) + 1e-5)
    elif kind == "normal_fixed_scale":
        dist = tfd.Normal(inputs, 0.5)
    else:
        dist = tfd.Poisson(log_rate=inputs)
    lp = dist.log_prob(sample).numpy()
    return lp.reshape(lp.shape[0], -1).sum(axis=1)


@pytest.mark.parametrize("kind", sorted(NODES))
def test_log_prob_sums_tfp_log_prob_over_units(kind):
    make, param_shape, _ = NODES[kind]
    layer = make(seed=3)
    inputs = params(*param_shape, seed=6)
    sample = np.asarray(layer(inputs))
    log_p = np.asarray(layer.log_prob(sample, inputs))
    assert log_p.shape == (param_shape[0],)
    np.testing.assert_allclose(log_p, tfp_log_prob(kind, sample, inputs), rtol=1e-5, atol=1e-5)
