"""Stochastic node layers: Keras 3 layers that wrap a TFP distribution.

A node takes the distribution's parameter tensor and returns a sample as a
float tensor, so ordinary layers consume it. Inside a `BackpropQModel` the node
also reports what it sampled to the model's recorder; outside one it is an
ordinary layer. With `training=False` a node returns its most likely value
(the mode for discrete nodes, the mean for continuous ones).

Samples are drawn with stateless seeds from a `keras.random.SeedGenerator`, so
sampling compiles under XLA, checkpoints with the model and resumes exactly.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from keras_bpq import _keras_compat
from keras_bpq import graph

tfd = tfp.distributions

# A layer's input or output shape, `None` for an unknown dimension.
Shape = Tuple[Optional[int], ...]

# Logit given to outcomes a mask forbids: exp(_MASKED_LOGIT) is exactly 0 in
# float32, yet every value stays finite, so no NaN reaches a gradient.
_MASKED_LOGIT = -1e9


def stateless_uniform(
    shape: Any, seed: tf.Tensor, minval: float = 0.0, maxval: float = 1.0
) -> tf.Tensor:
    """`U(minval, maxval)` float32 noise from an int32 stateless `seed` (`[2]`).

    Drawn with Threefry where XLA compiles the graph (`jit_compile=True`) and
    with Philox elsewhere: on CPU, XLA compiles Philox into a much slower
    loop than Threefry, and TF's own kernels have no Threefry (both are much
    faster under XLA than TFP's default `auto_select`). A seed therefore
    draws different noise with and without XLA; each is reproducible on its
    own, and a batch's first rows need not draw the noise of a smaller batch.
    """
    alg = "threefry" if _keras_compat.in_xla_context() else "philox"
    return tf.random.stateless_uniform(shape, seed=seed, minval=minval, maxval=maxval, alg=alg)


def first_argmax(values: tf.Tensor) -> tf.Tensor:
    """`argmax_k values[..., k]` (int32; the first `k` of a tie), as
    `min {k : values_k = max_j values_j}`.

    `tf.argmax` is one reduction of (value, index) pairs, and XLA on CPU
    compiles it, fused with the Threefry noise of a Gumbel-max sample over a
    few hundred outcomes, into a computation that takes minutes to build; a
    max and a min compile in under a second.
    """
    k = tf.shape(values)[-1]
    best = tf.reduce_max(values, axis=-1, keepdims=True)
    return tf.reduce_min(tf.where(values >= best, tf.range(k), k), axis=-1)


@keras.saving.register_keras_serializable(package="keras_bpq")
class StochasticNode(keras.layers.Layer):
    """A stochastic node `X ~ p(x | params)` for any TFP distribution.

    Args:
      distribution_fn: a function `params -> tfp.distributions.Distribution`,
        whose batch shape starts with the batch axis. It must be serialisable
        (a registered function, not a lambda) to save the model.
      estimator: optional name of the gradient estimator for this node (see
        `keras_bpq.estimators`); overrides `compile(estimator=...)`.
      seed: optional int seed of the node's `SeedGenerator`.
      **kwargs: Keras layer arguments; `name` is the node's name, used in the SCG
        summary, metrics and errors.

    The sample `x` is returned as a float tensor; `log p(x)` is summed over every
    axis but the batch axis, so a node with several units is one node whose
    units share the node's downstream costs.
    """

    distribution_name = "Distribution"
    # How critics sum over a sample's outcomes: "binary" (flip one unit at a
    # time), "categorical" (every outcome), or None (not supported).
    local_kind = None
    # Only Categorical takes a mask; other nodes ignore the mask Keras passes on
    # from upstream masking layers.
    accepts_mask = False

    def __init__(
        self,
        distribution_fn: Optional[Callable[[tf.Tensor], tfd.Distribution]] = None,
        estimator: Optional[str] = None,
        seed: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if distribution_fn is None and type(self) is StochasticNode:
            raise ValueError(
                f"StochasticNode {self.name!r} needs a distribution_fn: a function "
                "from the parameter tensor to a tfp.distributions.Distribution."
            )
        if distribution_fn is not None and not callable(distribution_fn):
            raise TypeError(
                f"StochasticNode {self.name!r}: distribution_fn must be a function from the "
                f"parameter tensor to a tfp.distributions.Distribution; got {distribution_fn!r}."
            )
        self.distribution_fn = distribution_fn
        self.estimator = estimator
        self.seed = _checked_seed(self, seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed, name="seed_generator")

    # -- distribution ------------------------------------------------------
    def distribution(self, params: tf.Tensor, mask: Optional[tf.Tensor] = None) -> tfd.Distribution:
        """The TFP distribution for a parameter tensor."""
        dist = self.distribution_fn(params)
        if self.distribution_name == "Distribution":
            self.distribution_name = type(dist).__name__
        return dist

    def log_prob(self, sample: tf.Tensor, params: tf.Tensor, mask: Optional[tf.Tensor] = None) -> tf.Tensor:
        """`log p(sample | params)` per example, summed over the event axes."""
        dist = self.distribution(params, mask)
        value = tf.cast(sample, dist.dtype)
        lp = tf.cast(dist.log_prob(value), tf.float32)
        return tf.reduce_sum(tf.reshape(lp, [tf.shape(lp)[0], -1]), axis=1)

    def most_likely(self, dist: tfd.Distribution) -> tf.Tensor:
        """Mode for discrete distributions, mean for continuous ones."""
        if dist.dtype.is_floating and dist.reparameterization_type == tfd.FULLY_REPARAMETERIZED:
            return dist.mean()
        return dist.mode()

    def is_reparameterized(self, params: tf.Tensor, mask: Optional[tf.Tensor] = None) -> bool:
        dist = self.distribution(params, mask)
        return dist.reparameterization_type == tfd.FULLY_REPARAMETERIZED

    def support(self, event_shape: Tuple[int, ...]) -> Optional[np.ndarray]:
        """All values of one example's sample, shape `[S, *event_shape]`, or None."""
        return None

    def support_size(self, event_shape: Tuple[int, ...]) -> Optional[int]:
        support = self.support(event_shape)
        return None if support is None else int(support.shape[0])

    def factorized_units(self, event_shape: Tuple[int, ...]) -> int:
        """How many independent units one example's sample has."""
        return 1

    # -- layer -------------------------------------------------------------
    def call(self, params: tf.Tensor, mask: Optional[tf.Tensor] = None, training: Optional[bool] = None) -> tf.Tensor:
        if not self.accepts_mask:
            mask = None
        dist = self.distribution(params, mask)
        recorder = graph.current_recorder()
        name = recorder.next_node_name(self) if recorder is not None else self.name
        noise = None
        if recorder is not None and name in recorder.forced:
            sample = tf.cast(recorder.forced[name], self.compute_dtype)
        elif recorder is not None and name in recorder.noise:
            noise = tf.cast(recorder.noise[name], tf.float32)
            sample = tf.cast(self.sample_from_noise(params, noise), self.compute_dtype)
        else:
            if (training is False and recorder is None) or (
                recorder is not None and recorder.most_likely
            ):
                value = self.most_likely(dist)
            elif recorder is not None and recorder.seeds is not None:
                value = self.sample_per_example(params, mask, recorder.seeds, len(recorder.nodes))
            else:
                seed = tf.cast(self.seed_generator.next(), tf.int32)
                context = tf.distribute.get_replica_context()
                if context is not None and context.num_replicas_in_sync > 1:
                    # Replicas share the generator's state: fold in the replica
                    # id so that each draws different samples.
                    seed = tf.random.experimental.stateless_fold_in(
                        seed, context.replica_id_in_sync_group
                    )
                value, noise = self.draw_with_noise(dist, seed)
            sample = tf.cast(self.finish_sample(value, mask), self.compute_dtype)
        raw_sample = sample
        if recorder is not None and name not in recorder.keep_gradient:
            sample = tf.stop_gradient(sample)
        if recorder is not None:
            recorder.watch(name, sample)
            recorder.add_node(graph.NodeRecord(name, self, sample, params, mask, raw_sample, noise))
        return sample

    def finish_sample(self, value: tf.Tensor, mask: Optional[tf.Tensor] = None) -> tf.Tensor:
        """The sample (or most likely value) `value` as the node returns it."""
        return value

    def draw(self, dist: tfd.Distribution, seed: tf.Tensor) -> tf.Tensor:
        """A sample of `dist` from an int32 stateless `seed` (`[2]`)."""
        return dist.sample(seed=seed)

    def draw_with_noise(self, dist: tfd.Distribution, seed: tf.Tensor) -> Tuple[tf.Tensor, Optional[tf.Tensor]]:
        """`(sample, noise)`: `draw`'s sample and the uniform noise it was
        computed from, or None where the node keeps none."""
        return self.draw(dist, seed), None

    def sample_from_noise(self, params: tf.Tensor, noise: tf.Tensor) -> tf.Tensor:
        """The sample `draw_with_noise` gives for parameters `params` and its
        recorded `noise` (common random numbers); only nodes that keep their
        noise have one."""
        raise ValueError(
            f"{_describe(self)} keeps no noise to draw a sample from: common random "
            "numbers (CriticCV(common_noise=True)) redraw Bernoulli nodes only."
        )

    def sample_per_example(
        self, params: tf.Tensor, mask: Optional[tf.Tensor], seeds: tf.Tensor, index: int
    ) -> tf.Tensor:
        """One sample per example, each drawn with its own stateless seed.

        Example `i` uses the seed `fold_in([seeds[i], 0], index)`, so its sample
        depends only on its parameters, its seed and `index` (the position of
        this node call in the forward pass), never on the rest of the batch.
        Standard TF ops only (a `tf.map_fn` over the examples).
        """
        seeds = tf.cast(tf.reshape(seeds, [-1]), tf.int64)
        elems = (params, seeds) if mask is None else (params, seeds, mask)
        full = self.distribution(params, mask)
        row_shape = tf.TensorShape(full.batch_shape).concatenate(full.event_shape)[1:]

        def one(args):
            row_params, seed = args[0], args[1]
            row_mask = None if mask is None else args[2][tf.newaxis]
            key = tf.random.experimental.stateless_fold_in(
                tf.stack([seed, tf.zeros_like(seed)]), index
            )
            dist = self.distribution(row_params[tf.newaxis], row_mask)
            return tf.cast(self.draw(dist, tf.cast(key, tf.int32)), self.compute_dtype)[0]

        return tf.map_fn(
            one, elems, fn_output_signature=tf.TensorSpec(row_shape, self.compute_dtype)
        )

    def save_own_variables(self, store: Dict[str, Any]) -> None:
        """Saves the layer's variables and then its seed generator's state, so a
        restored model draws the samples the saved one would have drawn next."""
        super().save_own_variables(store)
        store[str(len(self._own_variables()))] = self.seed_generator.state

    def load_own_variables(self, store: Mapping[str, Any]) -> None:
        own = self._own_variables()
        if len(store.keys()) == len(own) + 1:
            self.seed_generator.state.assign(store[str(len(own))])
            store = {str(i): store[str(i)] for i in range(len(own))}
        super().load_own_variables(store)

    def _own_variables(self):
        return _keras_compat.own_variables(self)

    def compute_output_shape(self, params_shape: Shape) -> Shape:
        probe = tf.zeros([1 if d is None else d for d in params_shape], self.compute_dtype)
        dist = self.distribution(probe)
        shape = tuple(dist.batch_shape) + tuple(dist.event_shape)
        return tuple(None if p is None else d for p, d in zip(params_shape, shape)) + shape[
            len(params_shape) :
        ]

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update({"estimator": self.estimator, "seed": self.seed})
        if type(self) is StochasticNode:
            config["distribution_fn"] = keras.saving.serialize_keras_object(
                self.distribution_fn
            )
        return config

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> StochasticNode:
        config = dict(config)
        if "distribution_fn" in config:
            config["distribution_fn"] = keras.saving.deserialize_keras_object(
                config["distribution_fn"]
            )
        return cls(**config)


def _describe(layer):
    return f"{type(layer).__name__} node {layer.name!r}"


def _checked_seed(layer, seed):
    """`seed` as a Python int, or None; anything else is an error naming the layer.

    Samples use int32 stateless seeds, so a seed outside the int32 range would
    silently collide with another one: it is refused.
    """
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(
            f"{_describe(layer)}: seed must be an int (or None for a random one); got "
            f"{seed!r} of type {type(seed).__name__}."
        )
    info = np.iinfo(np.int32)
    if not info.min <= int(seed) <= info.max:
        raise ValueError(
            f"{_describe(layer)}: seed must lie in the int32 range [{info.min}, {info.max}] "
            f"(samples use int32 stateless seeds); got {seed}."
        )
    return int(seed)


def _check_rank(layer, shape, what, min_rank=2):
    if len(shape) < min_rank:
        raise ValueError(
            f"{type(layer).__name__} node {layer.name!r} expects {what} of shape "
            f"[batch, ...] with rank >= {min_rank}; got shape {tuple(shape)}."
        )


@keras.saving.register_keras_serializable(package="keras_bpq")
class Bernoulli(StochasticNode):
    """Independent binary units: `x_u ~ Bernoulli(sigmoid(logits_u))`.

    Input: logits `[batch, units]` (any rank >= 2). Output: a 0/1 float sample of
    the same shape. `log p(x) = sum_u x_u * logits_u - softplus(logits_u)`.
    """

    distribution_name = "Bernoulli"
    local_kind = "binary"

    def build(self, input_shape: Shape) -> None:
        _check_rank(self, input_shape, "logits")

    def distribution(self, params: tf.Tensor, mask: Optional[tf.Tensor] = None) -> tfd.Distribution:
        return tfd.Bernoulli(logits=tf.cast(params, tf.float32), dtype=tf.float32)

    def draw(self, dist: tfd.Distribution, seed: tf.Tensor) -> tf.Tensor:
        """`x_u = [u_u < sigmoid(logits_u)]`, `u ~ U(0, 1)` from
        `stateless_uniform`: TFP's default algorithm (`auto_select`) compiles
        under XLA on CPU into a much slower fusion than Philox's
        (benchmarks/results/sbn.md, the notes on the throughput ceiling, has
        the timings of both)."""
        return self.draw_with_noise(dist, seed)[0]

    def draw_with_noise(self, dist: tfd.Distribution, seed: tf.Tensor) -> Tuple[tf.Tensor, Optional[tf.Tensor]]:
        """`(x, u)`: the sample `x = [u < sigmoid(logits)]` and its noise `u`
        (recorded, so that `disarm` reuses it instead of drawing `u` again)."""
        uniform = stateless_uniform(tf.shape(dist.logits), seed)
        return self.sample_from_noise(dist.logits, uniform), uniform

    def sample_from_noise(self, params: tf.Tensor, noise: tf.Tensor) -> tf.Tensor:
        """`x = [u < sigmoid(logits)]` for the noise `u`, float32: the same
        sample as `draw_with_noise`'s from that noise."""
        return tf.cast(noise < tf.sigmoid(tf.cast(params, tf.float32)), tf.float32)

    def most_likely(self, dist: tfd.Distribution) -> tf.Tensor:
        return tf.cast(dist.logits > 0, tf.float32)

    def support(self, event_shape: Tuple[int, ...]) -> Optional[np.ndarray]:
        units = int(np.prod(event_shape))
        if units > 20:
            return None
        values = np.array(list(itertools.product([0.0, 1.0], repeat=units)), np.float32)
        return values.reshape((-1,) + tuple(event_shape))

    def factorized_units(self, event_shape: Tuple[int, ...]) -> int:
        return int(np.prod(event_shape))

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        return tuple(input_shape)


def empty_row_message(layer_name: str, row: Any) -> List[Any]:
    """The error message of a `Categorical` node `layer_name` whose mask allows
    no outcome in row `row`, as the parts `[text, row, text]`: the node's
    assertion prints them (`row` a tensor), and with `row` an int (an index
    array for a mask of rank 3 or more) `" ".join(map(str, parts))` is the same
    message for a check made after XLA dropped that assertion
    (`callbacks.empty_mask_row_error`)."""
    # No quotes in the message: an assertion prints them escaped.
    return [
        f"Categorical node `{layer_name}`: row",
        row,
        "of its mask allows no outcome (every entry is False). Every row of "
        "the mask must allow at least one outcome: allow one (e.g. a stay "
        "or no-op outcome) or leave such rows out of the batch.",
    ]


@keras.saving.register_keras_serializable(package="keras_bpq")
class Categorical(StochasticNode):
    """One of `K` outcomes, returned one-hot: `x ~ OneHotCategorical(softmax(logits))`.

    Call as `node(logits)` or `node(logits, mask=allowed)` with a boolean
    `[batch, K]` mask (like `keras.layers.Softmax`): outcomes where the mask is
    False get probability zero and are never sampled,
    `p(k) = m_k exp(logits_k) / sum_j m_j exp(logits_j)`.

    Logits `[batch, *factors, K]` of rank 3 or more (and a mask of that
    shape) make `n = prod(factors)` independent choices per example, each
    one-hot along the last axis: `p(x) = prod_i p_i(x_i)`. Critic estimators
    then sum each factor's outcomes with the others held at their samples
    (`estimators.local_outcomes`).

    Every row of the mask must allow at least one outcome: a row that allows
    none raises `tf.errors.InvalidArgumentError` naming the node and the row
    (eagerly, in a traced step, in `predict` and in an exported SavedModel).
    Under XLA (`jit_compile=True`), which drops assertions, such a row's
    sample (or mode) is NaN instead, so no forbidden outcome is ever returned;
    a `BackpropQModel` training step then is skipped and `fit` raises a
    `FloatingPointError` naming the node and the row, and its `predict` and
    `evaluate` raise the assertion's error after their loop.
    """

    distribution_name = "Categorical"
    local_kind = "categorical"
    accepts_mask = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True  # takes `mask=`; passes no mask on

    def build(self, params_shape: Shape, mask_shape: Optional[Shape] = None) -> None:
        _check_rank(self, params_shape, "logits")
        if params_shape[-1] is not None and params_shape[-1] < 2:
            raise ValueError(
                f"Categorical node {self.name!r} needs at least 2 outcomes on the "
                f"last axis of its logits; got shape {tuple(params_shape)}."
            )

    def __call__(self, *args, **kwargs):
        # Keras passes no mask shape to build(): check it here, when the node is
        # called on symbolic tensors, before any graph is made of it.
        params = args[0] if args else kwargs.get("params")
        mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
        if mask is not None and getattr(params, "shape", None) is not None and hasattr(mask, "shape"):
            self._check_mask_shape(params.shape, mask.shape)
        if mask is not None and hasattr(mask, "dtype"):
            self._check_mask_dtype(mask.dtype)
        return super().__call__(*args, **kwargs)

    def call(self, params: tf.Tensor, mask: Optional[tf.Tensor] = None, training: Optional[bool] = None) -> tf.Tensor:
        if mask is not None:
            mask = self.checked_mask(params, mask)
        return super().call(params, mask=mask, training=training)

    def checked_mask(self, params: tf.Tensor, mask: Optional[tf.Tensor]) -> Optional[tf.Tensor]:
        """`mask` as a bool tensor that carries the check that every row allows an outcome.

        Raises at once for a mask of the wrong dtype or shape; the row check is a
        `tf.debugging.Assert` that the returned mask depends on, so it runs
        wherever the mask is used (eagerly, in graphs and in SavedModels).
        """
        mask = tf.convert_to_tensor(mask)
        self._check_mask_dtype(mask.dtype)
        self._check_mask_shape(tf.TensorShape(params.shape), mask.shape)
        empty = self.empty_rows(mask)
        flat = tf.reshape(empty, [-1])
        # The first empty row's index along each axis but the last (XLA-compatible ops).
        first = tf.argmax(tf.cast(flat, tf.int32), output_type=tf.int64)
        dims = tf.shape(empty, out_type=tf.int64)
        index, rest = [], first
        for axis in reversed(range(empty.shape.rank)):
            index.append(rest % dims[axis])
            rest = rest // dims[axis]
        row = index[0] if len(index) == 1 else tf.stack(index[::-1])
        check = tf.debugging.Assert(
            tf.logical_not(tf.reduce_any(flat)), empty_row_message(self.name, row), name="check_mask_rows"
        )
        with tf.control_dependencies([check]):
            return tf.identity(mask)

    @staticmethod
    def empty_rows(mask: tf.Tensor) -> tf.Tensor:
        """Boolean `mask.shape[:-1]`: the rows of `mask` that allow no outcome."""
        return tf.logical_not(tf.reduce_any(mask, axis=-1))

    def finish_sample(self, value: tf.Tensor, mask: Optional[tf.Tensor] = None) -> tf.Tensor:
        """NaN for the rows that allow no outcome (reached under XLA only, where
        the assertion of `checked_mask` is dropped), so that no forbidden outcome
        is ever returned."""
        if mask is None:
            return value
        empty = self.empty_rows(mask)[..., tf.newaxis]
        return tf.where(empty, tf.constant(np.nan, value.dtype), value)

    def _check_mask_dtype(self, dtype):
        if tf.as_dtype(dtype) != tf.bool:
            raise TypeError(
                f"Categorical node {self.name!r}: the mask must be boolean (True where an "
                f"outcome is allowed); got dtype {tf.as_dtype(dtype).name}. Pass e.g. "
                "`mask=values > 0`."
            )

    def _check_mask_shape(self, params_shape, mask_shape):
        """Raises unless the mask has the logits' rank and (known) sizes."""
        params_shape, mask_shape = tf.TensorShape(params_shape), tf.TensorShape(mask_shape)
        if params_shape.rank is None or mask_shape.rank is None:
            return
        if mask_shape.rank != params_shape.rank or not mask_shape[1:].is_compatible_with(params_shape[1:]):
            raise ValueError(
                f"Categorical node {self.name!r}: mask shape {tuple(mask_shape.as_list())} does "
                f"not match logits shape {tuple(params_shape.as_list())}; pass a boolean mask "
                "with one entry per logit."
            )

    def _masked_logits(self, params, mask):
        logits = tf.cast(params, tf.float32)
        if mask is None:
            return logits
        mask = tf.convert_to_tensor(mask)
        self._check_mask_dtype(mask.dtype)
        self._check_mask_shape(logits.shape, mask.shape)
        return tf.where(mask, logits, _MASKED_LOGIT)

    def distribution(self, params: tf.Tensor, mask: Optional[tf.Tensor] = None) -> tfd.Distribution:
        return tfd.OneHotCategorical(logits=self._masked_logits(params, mask), dtype=tf.float32)

    def draw(self, dist: tfd.Distribution, seed: tf.Tensor) -> tf.Tensor:
        """A one-hot sample by the Gumbel-max trick, `argmax_k (l_k + g_k)` with
        `g_k = -log(-log u_k)`, `u ~ U(0, 1)` from `stateless_uniform`, `l` the
        masked logits (a forbidden outcome's logit is so low that it never
        wins). TFP's categorical sampler compiles under XLA on CPU into a very
        slow computation, and so does `tf.argmax` of Threefry noise there
        (over 100 s for `[128, 200]` logits): the argmax is `first_argmax`'s
        two plain reductions (0.4 s)."""
        logits = dist.logits
        uniform = stateless_uniform(tf.shape(logits), seed, minval=np.finfo(np.float32).tiny)
        index = first_argmax(logits - tf.math.log(-tf.math.log(uniform)))
        return tf.one_hot(index, tf.shape(logits)[-1], dtype=tf.float32)

    def most_likely(self, dist: tfd.Distribution) -> tf.Tensor:
        return tf.one_hot(tf.argmax(dist.logits, axis=-1), tf.shape(dist.logits)[-1])

    def support(self, event_shape: Tuple[int, ...]) -> Optional[np.ndarray]:
        """`eye(K)`; for `n` factors every joint choice, `[K^n, *factors, K]`
        (None above `2^20` of them, as a Bernoulli node's 20 units)."""
        k = event_shape[-1]
        if len(event_shape) == 1:
            return np.eye(k, dtype=np.float32)
        factors = self.factorized_units(event_shape)
        if k**factors > 2**20:
            return None
        choices = np.array(list(itertools.product(range(k), repeat=factors)))
        return np.eye(k, dtype=np.float32)[choices].reshape((-1,) + tuple(event_shape))

    def factorized_units(self, event_shape: Tuple[int, ...]) -> int:
        return int(np.prod(event_shape[:-1]))

    def compute_output_shape(self, params_shape: Shape, mask_shape: Optional[Shape] = None) -> Shape:
        return tuple(params_shape)

    def compute_mask(self, inputs: Any, previous_mask: Any = None) -> None:
        return None


@keras.saving.register_keras_serializable(package="keras_bpq")
class Normal(StochasticNode):
    """Gaussian units: `x = loc + scale * eps`, `eps ~ N(0, 1)`, reparameterised.

    Args:
      scale: a fixed standard deviation: a positive finite number, or a list of
        them broadcast against `loc`. When None (the default) the input's last
        axis holds `[loc, raw_scale]` halves and `scale = softplus(raw_scale) + 1e-5`;
        otherwise the input is `loc` alone.
    """

    distribution_name = "Normal"

    def __init__(self, scale: Union[None, float, Sequence[float]] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale = self._checked_scale(scale)

    def _checked_scale(self, scale):
        """`scale` as a float (or nested list of floats); an error naming the node
        unless every value is a finite number > 0."""
        if scale is None:
            return None
        try:
            value = np.asarray(scale)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"Normal node {self.name!r}: scale must be a positive finite number (or a "
                f"list of them); got {scale!r}."
            ) from error
        if value.dtype == bool or value.dtype.kind not in "iuf":
            raise TypeError(
                f"Normal node {self.name!r}: scale must be a positive finite number (or a "
                f"list of them); got {scale!r} of type {type(scale).__name__}."
            )
        # The node computes in float32: the scale must be finite and > 0 there too.
        with np.errstate(over="ignore", under="ignore"):
            as_float32 = value.astype(np.float32)
        if value.size == 0 or not np.all(np.isfinite(as_float32)) or np.any(as_float32 <= 0):
            raise ValueError(
                f"Normal node {self.name!r}: scale must be finite and > 0 in float32 (a "
                f"standard deviation); got {scale!r}. Pass scale=None to feed "
                "[loc, raw_scale] and learn it."
            )
        value = value.astype(np.float64)
        return float(value) if value.ndim == 0 else value.tolist()

    def build(self, input_shape: Shape) -> None:
        _check_rank(self, input_shape, "parameters")
        if self.scale is None and input_shape[-1] is not None and input_shape[-1] % 2:
            raise ValueError(
                f"Normal node {self.name!r} expects its last axis to hold [loc, raw_scale] "
                f"halves (an even size); got shape {tuple(input_shape)}. Pass "
                "Normal(scale=...) to feed loc alone."
            )

    def distribution(self, params: tf.Tensor, mask: Optional[tf.Tensor] = None) -> tfd.Distribution:
        params = tf.cast(params, tf.float32)
        if self.scale is not None:
            return tfd.Normal(loc=params, scale=tf.cast(self.scale, tf.float32))
        loc, raw_scale = tf.split(params, 2, axis=-1)
        return tfd.Normal(loc=loc, scale=tf.math.softplus(raw_scale) + 1e-5)

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        if self.scale is not None:
            return tuple(input_shape)
        last = input_shape[-1]
        return tuple(input_shape[:-1]) + (None if last is None else last // 2,)

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config["scale"] = self.scale
        return config
