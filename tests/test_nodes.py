"""Stochastic node layers (keras_bpq.nodes): shapes, sampling, masks, seeds and config.

Every sampling check uses seeded nodes, so each statistical assertion is
deterministic; the tolerances (4 standard errors) are what a correct sampler
passes for any seed.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow_probability as tfp

import keras_bpq

tfd = tfp.distributions

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
