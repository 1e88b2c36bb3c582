"""Local surrogate losses: one small class per gradient estimator.

For every stochastic node `X` the model adds a per-example surrogate `L_X` to
the ordinary cost, `L = sum_X L_X + sum_c c`, with samples held fixed
(stop-gradient) unless the node is reparameterised. The gradient of `L` is an
estimate of `grad J`, `J = E[sum_c c]` (docs/method.md; each estimator's math
and when it is unbiased: docs/estimators.md). All estimators share one
interface:

* `check(info)`: raises at `compile()` if the estimator cannot serve the node;
* `keeps_gradient`: whether the node's sample keeps its pathwise gradient;
* `wants_sample_slope(info)`: whether the estimator reads the slope of the
  node's downstream cost in its sample from the recorded pass
  (`NodeStep.sample_slope`);
* `create_state(info, add_weight)`: the node's persistent state, a NamedTuple of
  Keras variables (`NoState`, `BaselineState`, ...);
* `surrogate(step)`: the per-example surrogate `L_X`, shape `[batch]`;
* `surrogate_and_deviation(step)`: the surrogate and, where the estimator
  computes it, the node's deviation `delta_X` (`CriticCV`), which earlier
  nodes subtract from their downstream cost (`NodeStep.successor_deviation`);
* `update(state, downstream_mean)`: state updates after a finite training step;
* `tuning_gradients(step)` / `apply_tuning(state, gradients)`: optional
  parameters of the estimator itself (a tuned control variate), fitted after
  every finite step on the replica-mean gradient the model computes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from keras_bpq import graph
from keras_bpq import nodes
from keras_bpq import outcomes


class NoState(NamedTuple):
    """The state of an estimator that keeps none."""


class BaselineState(NamedTuple):
    """`Reinforce`'s baseline: the EMA `m_t` of past batches' mean `c_X`, and `t`."""

    baseline: tf.Variable
    baseline_steps: tf.Variable


class TemperatureState(NamedTuple):
    """`Gumbel`'s annealed temperature."""

    temperature: tf.Variable


class RelaxState(NamedTuple):
    """`Relax(tune=True)`'s tuned control variate `(log t, eta)` and the Adam
    moments (rows: first, second; columns: log t, eta) and steps of its tuning."""

    log_temperature: tf.Variable
    eta: tf.Variable
    tune_moments: tf.Variable
    tune_steps: tf.Variable


class PassCache:
    """Values an estimator computes once per forward pass and reuses: the one
    mutable part of a `NodeStep`, filled lazily by the estimator. A new
    `NodeStep` gets a fresh, empty cache; `dataclasses.replace` of a step keeps
    the same cache, so the copies see the same values.

    Attributes:
      relax_noise: `Relax`'s two uniform noise tensors `(v, v~)`, shaped like
        the node's logits, drawn once and shared by `surrogate` and
        `tuning_gradients`; None until drawn.
    """

    def __init__(self) -> None:
        self.relax_noise: Optional[Tuple[tf.Tensor, tf.Tensor]] = None


@dataclasses.dataclass(frozen=True)
class NodeStep:
    """What an estimator sees of one node in one forward pass (immutable:
    `dataclasses.replace` makes a changed copy; the values computed lazily in
    the pass live in its `cache`, a `PassCache`)."""

    info: graph.NodeInfo
    record: graph.NodeRecord
    downstream: tf.Tensor  # c_X: realised sum of the costs in C_X, [batch]
    state: tuple  # the estimator's state NamedTuple of variables, from create_state
    # Critic Q_X = sum_c Q^c_X: values [batch, A, *event] (a tensor or
    # outcomes.UnitEdits) -> [batch, A]. Not stop-gradient (estimators add it).
    # None for critic-free estimators.
    q: Optional[Callable] = None
    num_samples: int = 1  # consecutive rows that are draws for one example
    # values [batch, A, *event] -> [batch, A]: realised c_X with the node forced.
    rerun: Optional[Callable] = None
    # Values an estimator computes once per pass and reuses (the same noise in
    # `surrogate` and `tuning_gradients`), shared by the step's replaced copies.
    cache: PassCache = dataclasses.field(default_factory=PassCache)
    # [batch]: each row's weight in `batch_mean` (for `tuning_gradients`, the
    # model sets it from the sample weights); None: every row counts alike.
    row_weights: Optional[tf.Tensor] = None
    # [batch], stop-gradient: the sum of the deviations `delta_Y` of later
    # nodes with exact heads whose costs all lie in C_X
    # (`forward.build_surrogate`; `CriticCV`): zero in expectation given
    # this node's sample and context, so `downstream - successor_deviation`
    # has the expectation of `c_X` with less of the later nodes' noise.
    # None: no such node.
    successor_deviation: Optional[tf.Tensor] = None
    # [batch, *event] float32, stop-gradient: `g = dc_X/dx`, the slope of the
    # node's realised downstream cost in its sample read as a real vector
    # (later samples held), from the recorded pass (`forward.record`). Set
    # only for estimators that ask (`Estimator.wants_sample_slope`) where
    # every head of `Q` is exact at the sample, `Q(x, s) = c_X`
    # (`forward.slope_nodes`); None elsewhere.
    sample_slope: Optional[tf.Tensor] = None

    def batch_mean(self, value: tf.Tensor) -> tf.Tensor:
        """The mean over this replica's rows of a per-row `value` (`[batch]`),
        weighted by `row_weights` when set: `sum_rows row_weights * value`. A
        row of weight 0 contributes nothing, and the mean over replicas is the
        sample-weighted mean `sum w value / sum w` of the global batch."""
        if self.row_weights is None:
            return tf.reduce_mean(value)
        return tf.reduce_sum(tf.cast(self.row_weights, value.dtype) * value)

    def seed(self) -> tf.Tensor:
        """A fresh int32 stateless seed from the node's seed generator."""
        return tf.cast(self.record.layer.seed_generator.next(), tf.int32)

    def uniform(self, shape: Any, minval: float = 0.0, maxval: float = 1.0) -> tf.Tensor:
        """`U(minval, maxval)` noise from a fresh seed (`nodes.stateless_uniform`:
        Threefry under XLA, Philox elsewhere; TFP's default algorithm compiles
        under XLA on CPU into a much slower fusion)."""
        return nodes.stateless_uniform(shape, self.seed(), minval, maxval)


class Estimator:
    """Base class: a node's local surrogate loss."""

    name: Optional[str] = None
    keeps_gradient: bool = False
    needs_critic: bool = False
    # Whether the node's heads past later Bernoulli nodes re-evaluate the cost
    # with those nodes drawn from this pass's noise (`CriticCV`'s option).
    common_noise: bool = False

    def check(self, info: graph.NodeInfo, num_samples: int = 1) -> None:
        """Raises a ValueError naming the node if this estimator cannot serve it."""

    def create_state(self, info: graph.NodeInfo, add_weight: Callable[..., tf.Variable]) -> tuple:
        """The node's state, a NamedTuple of variables made by
        `add_weight(name, shape, dtype, initializer="zeros")`."""
        return NoState()

    def wants_sample_slope(self, info: graph.NodeInfo) -> bool:
        """Whether `surrogate` reads `NodeStep.sample_slope` where the model
        can give it (every head exact at the sample)."""
        return False

    def surrogate(self, step: NodeStep) -> tf.Tensor:
        raise NotImplementedError

    def surrogate_and_deviation(self, step: NodeStep) -> Tuple[tf.Tensor, Optional[tf.Tensor]]:
        """`(surrogate, deviation)`: `surrogate(step)`, and the node's
        deviation `delta_X` (`[batch]`, stop-gradient, zero in expectation
        given the node's context; see `CriticCV`) or None where the estimator
        computes none (every estimator but `CriticCV`)."""
        return self.surrogate(step), None

    def update(self, state: tuple, downstream_mean: tf.Tensor) -> None:
        """Updates `state` after a finite training step; `downstream_mean` is
        the mean of `c_X` over the (global) batch."""

    def tuning_gradients(self, step: NodeStep) -> List[tf.Tensor]:
        """Gradients (this replica's batch) of the estimator's own tuning
        objective with respect to its tuned state, in `apply_tuning`'s order;
        `[]` when it tunes nothing. The objective should average over rows with
        `step.batch_mean`, which weighs them by the sample weights. The model
        averages the gradients over replicas."""
        return []

    def apply_tuning(self, state: tuple, gradients: Sequence[tf.Tensor]) -> None:
        """Steps the tuned state with the replica-mean `gradients` (only after
        a finite training step)."""

    def get_config(self) -> Dict[str, Any]:
        return {}

    def describe(self) -> str:
        """The name and the options that differ from the defaults, e.g.
        `critic_cv(units=4, linearize=True)`."""
        defaults = type(self)().get_config()
        changed = {k: v for k, v in self.get_config().items() if defaults.get(k) != v}
        return self.name + (f"({', '.join(f'{k}={v!r}' for k, v in changed.items())})" if changed else "")


class Reinforce(Estimator):
    """Score function with an exponential-moving-average baseline.

    `L_X = log p(x | pa) * sg[c_X - b]`, where `c_X` sums only the costs the node
    influences and `b` is a bias-corrected EMA of past batches' mean `c_X`
    (`b_t = m_t / (1 - decay^t)`, `m_t = decay * m_{t-1} + (1 - decay) * mean c_X`;
    0 before the first update). The baseline never sees the current sample, so
    the estimator is unbiased.

    `normalize=True` standardises the advantage `c_X - b` over the global batch,
    `(a - mean a) / (std a + epsilon)`, as MINERVA (Das et al. 2018) does; that
    rescales the step and couples the batch's draws (no longer unbiased).
    """

    name = "reinforce"

    def __init__(self, decay: float = 0.99, normalize: bool = False, epsilon: float = 1e-6) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"reinforce: decay must be in [0, 1); got {decay}.")
        self.decay = float(decay)
        self.normalize = bool(normalize)
        self.epsilon = float(epsilon)

    def create_state(self, info: graph.NodeInfo, add_weight: Callable[..., tf.Variable]) -> tuple:
        return BaselineState(
            baseline=add_weight(f"{info.name}_baseline", (), "float32"),
            baseline_steps=add_weight(f"{info.name}_baseline_steps", (), "float32"),
        )

    def baseline(self, state: BaselineState) -> tf.Tensor:
        steps = state.baseline_steps
        correction = 1.0 - tf.pow(self.decay, steps)
        return tf.where(steps > 0, state.baseline / tf.maximum(correction, 1e-12), 0.0)

    def surrogate(self, step: NodeStep) -> tf.Tensor:
        advantage = step.downstream - self.baseline(step.state)
        if self.normalize:
            advantage = self.standardize(advantage, self.epsilon)
        return step.record.log_prob() * tf.stop_gradient(advantage)

    def update(self, state: tuple, downstream_mean: tf.Tensor) -> None:
        mean = downstream_mean
        state.baseline.assign(self.decay * state.baseline + (1.0 - self.decay) * mean)
        state.baseline_steps.assign_add(1.0)

    def get_config(self) -> Dict[str, Any]:
        return {"decay": self.decay, "normalize": self.normalize, "epsilon": self.epsilon}

    @staticmethod
    def standardize(value: tf.Tensor, epsilon: float) -> tf.Tensor:
        """`(value - mean) / (std + epsilon)` with moments over the global batch
        (all replicas under a `tf.distribute` strategy)."""
        stats = tf.stack([tf.reduce_sum(value), tf.reduce_sum(tf.square(value)),
                          tf.cast(tf.size(value), value.dtype)])
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            stats = context.all_reduce(tf.distribute.ReduceOp.SUM, stats)
        mean = stats[0] / stats[2]
        variance = tf.maximum(stats[1] / stats[2] - tf.square(mean), 0.0)
        return (value - mean) / (tf.sqrt(variance) + epsilon)


class Reparam(Estimator):
    """Reparameterised sample: `x = g(eta, eps)` keeps its gradient and ordinary
    backprop runs through the real downstream graph (`L_X = 0`).

    Unbiased when every path from the sample to a cost is differentiable or
    passes through another node's surrogate (a later node's `log p` carries the
    gradient through its parameters).
    """

    name = "reparam"
    keeps_gradient = True

    def check(self, info: graph.NodeInfo, num_samples: int = 1) -> None:
        _check_reparameterized(self.name, info, "'reinforce' (or 'auto')")

    def surrogate(self, step: NodeStep) -> tf.Tensor:
        return tf.zeros_like(step.downstream)


def _flat(value):
    """`[batch, ...]` -> `[batch, units]`, keeping the static unit count."""
    return tf.reshape(value, [tf.shape(value)[0], int(np.prod(value.shape[1:]))])


class LocalSum(NamedTuple):
    """A node's local outcomes and their weights (`local_outcomes`)."""

    values: outcomes.UnitEdits
    weights: tf.Tensor
    current: tf.Tensor
    scale: tf.Tensor


def local_outcomes(
    step: NodeStep, units: Optional[int] = None, unit_sampling: str = "uniform", sizes: Optional[tf.Tensor] = None
) -> LocalSum:
    """The outcomes a critic is summed over, and their weights.

    Returns a `LocalSum`:
    * `values`: `outcomes.UnitEdits`, `[batch, A, *event]` outcomes at which `Q`
      is evaluated;
    * `weights`: `[batch, A]`, differentiable, such that the local expectation
      is `E_loc = current * Q(x) + sum_a weights_a * Q(values_a)`;
    * `current`: `[batch]` weight of the realised sample `x`;
    * `scale`: `[batch, A]`, each outcome's weight in the sum over units
      (`subset_units`; ones when every outcome is summed).

    Binary (factorised) nodes: one unit at a time, the others held at their
    sampled values: `E_loc = sum_u [p_u(x_u) Q(x) + p_u(1 - x_u) Q(x with u flipped)]`.
    With `units = S` below the node's `U` units, the sum runs over `S` units
    per example, each term scaled by one over its expected count
    (`subset_units`, which reads `unit_sampling` and `sizes`): its gradient
    is still unbiased, at `S + 1` outcomes instead of `U + 1`.
    Categorical nodes: every outcome, `E_loc = sum_k p_k Q(e_k)`.
    Factorised categorical nodes (`n` independent choices of `K` outcomes,
    a sample `[batch, *factors, K]` of rank 3 or more): one factor at a time,
    the others held at their sampled values, as for Bernoulli units:
    `E_loc = sum_i [p_i(x_i) Q(x) + sum_{k != x_i} p_ik Q(x with factor i set to k)]`
    (`_factor_outcomes`), at `n (K - 1) + 1` outcomes.
    """
    record, info = step.record, step.info
    x = record.sample
    if _factorised(info):
        return _factor_outcomes(record)
    if info.local_kind == "binary":
        flat, p_current = _bernoulli_sample_and_probability(record)
        total = flat.shape[1]
        if units is None or units >= total:
            values = outcomes.UnitEdits.each_unit(flat, 1.0 - 2.0 * flat, x.shape[1:])
            scale = tf.ones_like(p_current)
        else:
            unit, scale = subset_units(step, units, unit_sampling, sizes)
            p_current = tf.gather(p_current, unit, batch_dims=1)
            values = outcomes.UnitEdits(flat, unit, 1.0 - 2.0 * tf.gather(flat, unit, batch_dims=1), x.shape[1:])
        return LocalSum(values, scale * (1.0 - p_current), tf.reduce_sum(scale * p_current, axis=1), scale)
    if info.local_kind == "categorical":
        k = x.shape[-1]
        batch = tf.shape(x)[0]
        values = outcomes.UnitEdits.each_unit(tf.zeros([batch, k]), tf.ones([batch, k]), x.shape[1:])
        probs = tf.nn.softmax(record.layer.distribution(record.params, record.mask).logits)
        return LocalSum(values, probs, tf.zeros_like(probs[:, 0]), tf.ones_like(probs))
    raise ValueError(f"Node {info.name!r} has no local outcomes to sum a critic over.")


def _factorised(info):
    """Whether `info` is a factorised categorical node: its sample
    `[batch, *factors, K]` holds several independent one-hot choices."""
    return info.local_kind == "categorical" and len(info.event_shape) > 1


def _categorical_outcomes(info):
    """How many outcomes besides the sample a categorical node's local sum
    (`local_outcomes`) evaluates the critic at: `K`, or `n (K - 1)` for a
    factorised node of `n` factors."""
    if not _factorised(info):
        return info.event_shape[-1]
    return int(np.prod(info.event_shape[:-1])) * (info.event_shape[-1] - 1)


def _factor_outcomes(record):
    """A factorised categorical node's local sum (`local_outcomes`): for
    factor `i` (of `n`, in the order of the flattened factor axes) and each
    outcome `k != x_i` (of `K`), the sample with factor `i` set to `k`, two
    edits of the sample: `+1` at `(i, k)`, `-1` at `(i, x_i)`. Its weight is
    `p_ik`, differentiable, zero where the mask forbids `k`; the sample's
    weight is `sum_i p_i(x_i)`.

    Unbiased in `CriticCV` by the Bernoulli argument, factor by factor: the
    factors are independent given the node's parameters, so
    `E[grad log p_i(x_i) Q(x)] = E_{x_-i}[sum_k grad p_ik Q(x_-i, k)]`, the
    expected gradient of factor `i`'s term of `E_loc`, and
    `grad log p(x) = sum_i grad log p_i(x_i)`."""
    log_p = tf.nn.log_softmax(record.layer.distribution(record.params, record.mask).logits)
    k = log_p.shape[-1]
    factors = int(np.prod(log_p.shape[1:-1]))
    batch = tf.shape(log_p)[0]
    probs = tf.reshape(tf.exp(log_p), [batch, factors, k])
    sample = tf.reshape(_float32(record.sample), [batch, factors, k])
    chosen = tf.argmax(sample, axis=-1, output_type=tf.int32)[..., None]  # x_i, [batch, n, 1]
    others = tf.range(k - 1)[None, None, :]
    others += tf.cast(others >= chosen, tf.int32)  # the K - 1 outcomes k != x_i, [batch, n, K - 1]
    first = (tf.range(factors) * k)[None, :, None]  # factor i's first unit, i K
    unit = tf.stack([first + others, tf.broadcast_to(first + chosen, tf.shape(others))], axis=-1)
    unit = tf.reshape(unit, [batch, factors * (k - 1), 2])
    change = tf.broadcast_to(tf.constant([1.0, -1.0]), tf.shape(unit))
    values = outcomes.UnitEdits(tf.reshape(sample, [batch, factors * k]), unit, change, record.sample.shape[1:])
    weights = tf.reshape(tf.gather(probs, others, batch_dims=2), [batch, factors * (k - 1)])
    current = tf.reduce_sum(sample * probs, axis=[1, 2])
    return LocalSum(values, weights, current, tf.ones_like(weights))


UNIT_SAMPLING = ("uniform", "importance")
# The uniform share of `subset_units`' importance draws: every weight is at
# most `U / (S IMPORTANCE_FLOOR)`, whatever the logits.
IMPORTANCE_FLOOR = 1e-3


def subset_units(
    step: NodeStep, units: int, unit_sampling: str = "uniform", sizes: Optional[tf.Tensor] = None
) -> Tuple[tf.Tensor, tf.Tensor]:
    """`(unit, scale)`, both `[batch, S]`: `S = units` units of a Bernoulli
    node per example, and each one's weight `1 / E[n_u]` in the local sum
    (`n_u` the times unit `u` is drawn), so that
    `E[sum_s scale_s f(unit_s)] = sum_u f(u)` for any per-unit `f`.

    * `"uniform"`: a uniform subset without replacement (the top `S` of iid
      uniform scores), `scale = U / S`.
    * `"importance"`: systematic sampling with probability `pi_u` (one
      uniform offset, `S` evenly spaced points on the CDF: `n_u` is the floor
      or the ceiling of `S pi_u`), `scale = 1 / (S pi_u)`, where

          pi_u = (1 - eps) q_u + eps / U,   q_u  proportional to  w_u (s_u + mean_v s_v),

      `w_u = p_u (1 - p_u)`, and `s = sizes` (`[batch, U]`, e.g. `|D^_u|`,
      the expanded flips; ones when None). Unit `u`'s term in the local sum's
      gradient is `grad p_u(x_u) D_u`, `grad p_u(x_u) = +-w_u grad logit_u`,
      so its share of the subset's variance grows with `w_u |D_u|`
      (`|D_u - D^_u|` with `linearize`), and a draw in proportion to it is the
      variance-minimising one. Units near saturation (most units, late in
      training) carry almost none; adding the mean size keeps every unit with
      `w_u > 0` drawable whatever `sizes` says. The uniform share
      `eps = IMPORTANCE_FLOOR` bounds every weight by `U / (S eps)`: a unit
      saturated in float32 (`w_u` about `exp(-|logit_u|)`) would otherwise
      get a weight that overflows when a draw reaches it (its term is about
      zero). `pi_u` is the width of unit `u`'s interval of the CDF as float32
      holds it (the CDF ends at exactly 1), the probability the draw really
      gives it. `pi` is held fixed (stop-gradient): the identity above holds
      for any `pi`.
    """
    record = step.record
    logits = _flat(tf.cast(record.params, tf.float32))
    total = logits.shape[1]
    if unit_sampling == "uniform":
        unit = tf.math.top_k(step.uniform(tf.shape(logits)), k=units).indices
        return unit, tf.fill(tf.shape(unit), total / units)
    # log w_u, finite for finite logits; q, normalised in log space.
    log_w = tf.stop_gradient(tf.math.log_sigmoid(logits) + tf.math.log_sigmoid(-logits))
    if sizes is not None:
        mean = tf.reduce_mean(sizes, axis=1, keepdims=True)
        log_w += tf.math.log(tf.where(mean > 0, sizes + mean, 1.0))
    q = tf.exp(log_w - tf.reduce_logsumexp(log_w, axis=1, keepdims=True))
    pi = (1.0 - IMPORTANCE_FLOOR) * q + IMPORTANCE_FLOOR / total
    return systematic_draw(pi, step.uniform([tf.shape(logits)[0], 1]), units)


def systematic_draw(pi: tf.Tensor, offset: tf.Tensor, units: int) -> Tuple[tf.Tensor, tf.Tensor]:
    """`(unit, scale)`, both `[batch, S]` (`S = units`): systematic sampling
    of `S` units per row of `pi` (`[batch, U]`, probabilities summing to 1)
    with `offset` (`[batch, 1]`, uniform on `[0, 1)`): the `S` evenly spaced
    points `(offset + k) / S` on the CDF of `pi`, so unit `u` is drawn the
    floor or the ceiling of `S pi_u` times, `S pi_u` in expectation, and its
    weight `scale = 1 / (S pi_u)` makes `E[sum_s scale_s f(unit_s)] = sum_u
    f(u)`. Float32 rounding leaves the running sum of `pi` a little off 1:
    the CDF is the running sum over its total, ending at exactly 1, the
    points stay below 1, and `pi_u` is read back as the width of unit `u`'s
    interval, the probability the draw gives it (a drawn unit's is never
    zero), so no point falls past the end and no weight inverts a
    probability that rounding changed."""
    cumulative = _running_sum(pi)
    cdf = tf.concat([cumulative[:, :-1] / cumulative[:, -1:], tf.ones_like(cumulative[:, -1:])], axis=1)
    width = cdf - tf.concat([tf.zeros_like(cdf[:, :1]), cdf[:, :-1]], axis=1)
    below_one = np.nextafter(np.float32(1.0), np.float32(0.0))
    points = tf.minimum((offset + tf.range(units, dtype=tf.float32)[None]) / units, below_one)
    unit = tf.reduce_sum(tf.cast(cdf[:, None, :] <= points[:, :, None], tf.int32), axis=2)
    return unit, 1.0 / (units * tf.gather(width, unit, batch_dims=1))


def _running_sum(values: tf.Tensor) -> tf.Tensor:
    """`tf.math.cumsum(values, axis=1)` for `[batch, U]` `values` with a static
    `U`, as two small matrix products: the sums within blocks of `k =
    ceil(sqrt(U))` columns (`[batch, U / k, k] @ [k, k]`, upper-triangular
    ones) plus the totals of the blocks before (`[batch, U / k] @ [U / k, U /
    k]`, strictly upper-triangular): O(U sqrt U) work and O(U) constants.
    XLA compiles a cumulative sum into a reduce-window, which on a CPU is
    slower than these products."""
    total = values.shape[1]
    if total is None:
        return tf.math.cumsum(values, axis=1)
    k = int(np.ceil(np.sqrt(total)))
    blocks = -(-total // k)
    padded = tf.reshape(tf.pad(values, [[0, 0], [0, blocks * k - total]]), [-1, blocks, k])
    within = tf.einsum("bnk,kj->bnj", padded, tf.constant(np.triu(np.ones((k, k))), values.dtype))
    before = tf.matmul(within[:, :, -1], tf.constant(np.triu(np.ones((blocks, blocks)), 1), values.dtype))
    return tf.reshape(within + before[:, :, None], [-1, blocks * k])[:, :total]


def _bernoulli_sample_and_probability(record):
    """`(x, p_u(x_u))`, both `[batch, U]` float32: a Bernoulli node's flattened
    sample and each unit's probability of its sampled value."""
    flat = tf.cast(_flat(record.sample), tf.float32)
    p_one = tf.sigmoid(_flat(tf.cast(record.params, tf.float32)))
    return flat, flat * p_one + (1.0 - flat) * (1.0 - p_one)


def _check_binary(name, info):
    if info.local_kind != "binary":
        raise ValueError(
            f"Estimator {name!r} cannot serve node {info.name!r}: it needs a "
            f"Bernoulli node, not {info.distribution}."
        )


def _check_reparameterized(name, info, instead):
    if not info.reparameterized:
        raise ValueError(
            f"Estimator {name!r} cannot serve node {info.name!r}: its "
            f"{info.distribution} distribution is not reparameterised. Use {instead}."
        )


def _check_local(name, info):
    if info.local_kind is None:
        raise ValueError(
            f"Estimator {name!r} cannot serve node {info.name!r}: it needs a Bernoulli "
            f"or Categorical node, not {info.distribution}. Use 'reinforce' (or 'auto')."
        )


def _local_expectation(q_x, q_alt, weights, current):
    """`E_loc = current * Q(x) + sum_a weights_a * Q(values_a)` (see
    `local_outcomes`), with the critic's values held fixed. Outcomes of
    probability zero (masked) contribute nothing, whatever their `Q`."""
    q_x, q_alt = tf.stop_gradient(q_x), tf.stop_gradient(q_alt)
    return current * q_x + tf.reduce_sum(tf.where(weights > 0, weights * q_alt, 0.0), axis=1)


def _q_at_sample_and_outcomes(step, units=None):
    local = local_outcomes(step, units)
    q_values = step.q(local.values.with_first(step.record.sample))
    return q_values[:, 0], q_values[:, 1:], local.weights, local.current


def expanded_flips(step):
    """`(Q(x), D^)`, `[batch]` and `[batch, U]`, stop-gradient: the heads at
    the sample and `D^_u = g_u (2 x_u - 1)`, the first-order expansion of
    `Q(x) - Q(x with unit u flipped)` around the sample, with `g = dQ/dx`.
    Where every head is exact at the sample, `Q(x) = c_X` and `g` is the
    recorded pass's `NodeStep.sample_slope`: no pass of its own. Else `g`
    comes from one backward pass through the heads at `x`."""
    sample = step.record.sample
    flat = tf.cast(_flat(sample), tf.float32)
    if step.sample_slope is not None:
        slope = tf.cast(_flat(step.sample_slope), tf.float32)
        return tf.stop_gradient(step.downstream), tf.stop_gradient(slope * (2.0 * flat - 1.0))
    with tf.GradientTape() as tape:
        tape.watch(flat)
        q = step.q(tf.reshape(flat, [-1, 1] + list(sample.shape[1:])))
    slope = tape.gradient(q, flat, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return tf.stop_gradient(q[:, 0]), tf.stop_gradient(slope * (2.0 * flat - 1.0))


def _expansion_correction(step, expanded, unit, scale):
    """`sum_u p_u(x_u) D^_u - sum_s scale_s p_s(x_s) D^_s` (`CriticCV`'s
    `linearize`; `expanded` is `D^`, `expanded_flips`): the expansion summed
    over every unit, less its weighted sum over the drawn subset `unit`
    (`[batch, S]`, weights `scale` from `subset_units`), whose exact flips
    replace it in the local sum."""
    _, p_current = _bernoulli_sample_and_probability(step.record)
    weighted = p_current * expanded
    return tf.reduce_sum(weighted, axis=1) - tf.reduce_sum(scale * tf.gather(weighted, unit, batch_dims=1), axis=1)


def _deviation(q_x, q_alt, weights):
    """`delta = sum_a weights_a (Q(x) - Q(values_a))` (`[batch]`, see
    `local_outcomes`): the sample's `Q` less its local expectation, summed
    over units (factors); outcomes of probability zero contribute nothing."""
    q_x, q_alt = tf.stop_gradient(q_x), tf.stop_gradient(q_alt)
    return tf.reduce_sum(tf.where(weights > 0, weights * (q_x[:, None] - q_alt), 0.0), axis=1)


def _leave_one_out_mean(values, k):
    """`[rows]` -> for each row, the mean of the other `k - 1` rows of its
    example (rows come in consecutive groups of `k` draws per example)."""
    grouped = tf.reshape(values, [-1, k])
    others = (tf.reduce_sum(grouped, axis=1, keepdims=True) - grouped) / (k - 1.0)
    return tf.reshape(others, [-1])


class CriticCV(Estimator):
    """The critic as a control variate (unbiased whatever the critic's state).

    `L_X = sum_x' p(x') sg[Q(x', s)] + log p(x) sg[c_X - Q(x, s)]`, the first sum
    exact over a categorical node's outcomes, and per unit (the other units
    held at their sampled values) for a factorised Bernoulli node. Its
    expectation is the score-function gradient for any `Q` independent of the
    node's own parameters; a good `Q` removes most of its variance.

    With `compile(num_samples=K)`, `K >= 2`, the residual `c_X - Q(x, s)` also
    gets a leave-one-out baseline, the mean residual of the example's other
    draws: independent of this draw, so still unbiased, and it removes a
    learned `Q`'s per-example offset, which makes the residual noisy while
    the critic is untrained (on the KG agent, 9x `rloo`'s gradient noise).

    With `linearize=True` (Bernoulli nodes, `units=S`), every unit's flip
    first gets the first-order expansion of `Q` around the sample, from one
    backward pass through the heads (`g = dQ/dx` at `x`, the sample read as a
    real vector; where every head is exact at the sample, `Q(x) = c_X` and
    `g` is the slope of `c_X` that one backward pass of the recorded forward
    pass gives every such node, `NodeStep.sample_slope`):

        D^_u = Q(x) - Q(x with u flipped) ~= g_u (2 x_u - 1),

    and the `S` drawn units' exact flips correct it:

        D~_u = D^_u + (n_u / E[n_u]) (D_u - D^_u),   D_u = Q(x) - Q(x with u flipped),

    `n_u` the number of times unit `u` is drawn (`subset_units`: `E[n_u] = S / U`
    for a uniform subset, `S pi_u` for `unit_sampling="importance"`).
    Given `x`, `E_S[D~_u] = D_u` for every unit, whatever `D^` is, so the local
    sum `sum_u p_u(x_u) sg[D~_u]` has the gradient of the full local
    expectation in expectation: the estimator stays unbiased, and its extra
    variance over the full sum shrinks with the expansion's error
    `D_u - D^_u` rather than with `D_u` itself, as with `units` alone.

    The node's deviation: where every head of `Q` is exact (the node is the
    last stochastic ancestor of each of its costs, so `Q(x', s)` is the
    downstream cost itself at `x'`), the estimator also gives

        delta_X = sum_a w_a (Q(x) - Q(x'_a)) = sum_u [Q(x) - E_{x_u} Q(x)],

    over the local sum's outcomes `x'_a` and weights `w_a` (for a Bernoulli
    node `w_u = 1 - p_u(x_u)`: each unit's `Q` less its expectation over that
    unit's value, the other units held; for a categorical node
    `Q(x) - sum_k p_k Q(e_k)`). Given the node's context, `E[delta_X] = 0`
    whatever `Q`. An earlier node `W` whose costs include all of `C_X`
    subtracts `delta_X` from its realised cost: its residual is
    `c_W - delta_X - Q_W(w, s)`, with the same expectation given `w`, and
    `delta_X` takes `X`'s sampling noise out of `c_W` (for a categorical node
    `c_W - delta_X` holds `sum_k p_k Q(e_k)` in place of `Q(x)`, its
    conditional expectation; for a Bernoulli node, all of it where the costs
    are linear in `x`, else the first-order part). Backprop-Q's value signal
    passed from a stochastic node to the ones before it, at no cost beyond
    the heads already evaluated. Only a local sum over every unit gives it:
    over a drawn subset of units (`units=S`) its estimate is noisier than the
    noise it removes (benchmarks/results/variance_per_second.md).

    Args:
      units: for Bernoulli nodes, sum the flips of this many drawn units per
        example (each scaled by one over its expected count; unbiased), not
        of all `U`: the critic is evaluated at `units + 1` outcomes instead
        of `U + 1`. None: every unit.
      linearize: with `units`, add the first-order expansion of every unit's
        flip and correct it on the drawn units (above). Needs a `Q` that is
        differentiable in the node's sample (a zero gradient only makes it
        `units` alone).
      unit_sampling: with `units`, how the units are drawn (`subset_units`):
        `"uniform"`, a uniform subset without replacement; `"importance"`,
        systematic sampling in proportion to `p_u (1 - p_u)` times (with
        `linearize`) the expanded flip's size `|D^_u|` plus its mean: about
        each unit's share of the subset's variance, which matters most once
        many units are near saturation.
      successor_deviations: subtract the deviations of later nodes with exact
        heads (`NodeStep.successor_deviation`) from the realised cost.
      common_noise: for each cost whose stochastic ancestors after this node
        are all Bernoulli nodes, a common-noise head instead of a learned one
        (`q_values`): the cost re-evaluated at every outcome `x'` with those
        later nodes drawn again from the uniform noise `u` of this pass,
        `y' = [u < sigmoid(logits_y(x', ...))]` (common random numbers).
        Given `u`, `c(x', s, u)` is a fixed function of `x'` and equals the
        realised cost at the sample, so the residual `c_X - Q(x, s)` of those
        costs is zero and the local sum `sum_x' p(x') c(x', s, u)` is the whole
        estimate; `u` is independent of `x`, so its expectation over `u` is the
        exact gradient: unbiased, with no critic to train for those heads, at
        the price of evaluating every later node's downstream operations at
        the outcomes. A later deviation (`successor_deviations`) of a cost
        served so is not subtracted (it would only add noise to a zero
        residual). The first-order expansion (`linearize`) sees a common-noise
        head's change through the later samples as zero (a step function of
        the logits): its expansion holds them fixed.
    """

    name = "critic_cv"
    needs_critic = True

    def __init__(
        self,
        units: Optional[int] = None,
        linearize: bool = False,
        unit_sampling: str = "uniform",
        successor_deviations: bool = True,
        common_noise: bool = False,
    ) -> None:
        if units is not None and (isinstance(units, bool) or not isinstance(units, int) or units < 1):
            raise ValueError(f"CriticCV(units={units!r}): units must be a positive int or None.")
        if not isinstance(linearize, bool):
            raise ValueError(f"CriticCV(linearize={linearize!r}): linearize must be True or False.")
        if linearize and units is None:
            raise ValueError(
                "CriticCV(linearize=True) needs units=S: with every unit's flip exact, "
                "the expansion cancels. Pass units=S (auto uses 4) or linearize=False."
            )
        if unit_sampling not in UNIT_SAMPLING:
            raise ValueError(
                f"CriticCV(unit_sampling={unit_sampling!r}): unit_sampling must be one of {UNIT_SAMPLING}."
            )
        if not isinstance(successor_deviations, bool):
            raise ValueError(
                f"CriticCV(successor_deviations={successor_deviations!r}): successor_deviations must be True or False."
            )
        if not isinstance(common_noise, bool):
            raise ValueError(f"CriticCV(common_noise={common_noise!r}): common_noise must be True or False.")
        self.units = units
        self.linearize = linearize
        self.unit_sampling = unit_sampling
        self.successor_deviations = successor_deviations
        self.common_noise = common_noise

    def check(self, info: graph.NodeInfo, num_samples: int = 1) -> None:
        _check_local(self.name, info)
        if self.units is not None and info.local_kind != "binary":
            raise ValueError(
                f"Estimator 'critic_cv' with units={self.units} cannot serve node {info.name!r}: "
                f"a random subset of units needs a Bernoulli node, not {info.distribution}. "
                "Leave units=None for it (a per-node dict of estimators)."
            )

    def wants_sample_slope(self, info: graph.NodeInfo) -> bool:
        return self.linearize and not self._every_unit(info)

    def _every_unit(self, info):
        return self.units is None or self.units >= int(np.prod(info.event_shape))

    def surrogate(self, step: NodeStep) -> tf.Tensor:
        return self.surrogate_and_deviation(step)[0]

    def surrogate_and_deviation(self, step: NodeStep) -> Tuple[tf.Tensor, Optional[tf.Tensor]]:
        every_unit = self._every_unit(step.info)
        expanded = None
        if self.linearize and not every_unit:  # the heads at the sample come with the expansion
            q_x, expanded = expanded_flips(step)
        sizes = tf.abs(expanded) if expanded is not None and self.unit_sampling == "importance" else None
        local = local_outcomes(step, self.units, self.unit_sampling, sizes)
        if expanded is not None:
            q_alt = step.q(local.values)
        else:
            q_values = step.q(local.values.with_first(step.record.sample))
            q_x, q_alt = q_values[:, 0], q_values[:, 1:]
        cost = step.downstream
        if self.successor_deviations and step.successor_deviation is not None:
            cost -= step.successor_deviation
        residual = cost - q_x
        if step.num_samples > 1:
            residual -= _leave_one_out_mean(residual, step.num_samples)
        surrogate = _local_expectation(q_x, q_alt, local.weights, local.current)
        if expanded is not None:
            surrogate += _expansion_correction(step, expanded, local.values.unit, local.scale)
        deviation = _deviation(q_x, q_alt, local.weights) if every_unit else None
        return surrogate + step.record.log_prob() * tf.stop_gradient(residual), deviation

    def get_config(self) -> Dict[str, Any]:
        return {
            "units": self.units,
            "linearize": self.linearize,
            "unit_sampling": self.unit_sampling,
            "successor_deviations": self.successor_deviations,
            "common_noise": self.common_noise,
        }


class CriticAdvantage(Estimator):
    """Score function with the critic's advantage: the pure Backprop-Q form.

    Categorical: `L_X = log p(x) sg[Q(x, s) - V(s)]`, `V = sum_k p_k Q(e_k, s)`.
    Factorised Bernoulli or categorical, per unit (factor):
    `L_X = sum_u log p_u(x_u) sg[Q(x) - V_u]`,
    `V_u = sum_{x'_u} p_u(x'_u) Q(x'_u, x_-u)`, so that
    `Q(x) - V_u = sum_{x'_u != x_u} p_u(x'_u) (Q(x) - Q(x'_u, x_-u))`. Unbiased
    when `Q` is exact; biased while a learned critic is wrong.
    """

    name = "critic"
    needs_critic = True

    def check(self, info: graph.NodeInfo, num_samples: int = 1) -> None:
        _check_local(self.name, info)

    def surrogate(self, step: NodeStep) -> tf.Tensor:
        q_x, q_alt, weights, current = _q_at_sample_and_outcomes(step)
        q_x, q_alt = tf.stop_gradient(q_x), tf.stop_gradient(q_alt)
        record = step.record
        if step.info.local_kind == "categorical" and not _factorised(step.info):
            value = _local_expectation(q_x, q_alt, weights, current)
            return record.log_prob() * tf.stop_gradient(q_x - value)
        unit_log_p = _unit_log_probs(step)
        # The outcomes come unit by unit (`local_outcomes`); masked ones (p = 0) add nothing.
        per_outcome = tf.where(weights > 0, weights * (q_x[:, None] - q_alt), 0.0)
        advantage = tf.reduce_sum(tf.reshape(per_outcome, [tf.shape(q_x)[0], unit_log_p.shape[1], -1]), axis=2)
        return tf.reduce_sum(unit_log_p * tf.stop_gradient(advantage), axis=1)


def _unit_log_probs(step):
    """`[batch, U]`, differentiable: `log p_u(x_u)` of each unit of a
    Bernoulli node, or of each factor of a factorised categorical node."""
    record = step.record
    sample = _float32(record.sample)
    if step.info.local_kind == "binary":
        logits = _flat(_float32(record.params))
        return _flat(sample) * logits - tf.math.softplus(logits)
    log_p = tf.nn.log_softmax(record.layer.distribution(record.params, record.mask).logits)
    # x_ik log p_ik is 0, not NaN, at a masked k (log p_ik about -1e9, finite).
    return _flat(tf.reduce_sum(sample * log_p, axis=-1))


class Pathwise(Estimator):
    """Reparameterised sample through the critic (SVG(0) / DDPG style).

    `L_X = sg[dQ_X/dx](x) . g(eta, eps)`: the gradient of `Q_X(x, sg[s])` with
    respect to the parameters, through the reparameterised sample only. For
    nodes whose downstream path is not differentiable; unbiased when `Q` is exact.
    """

    name = "pathwise"
    needs_critic = True

    def check(self, info: graph.NodeInfo, num_samples: int = 1) -> None:
        _check_reparameterized(self.name, info, "'critic_cv' or 'reinforce' (or 'auto')")

    def surrogate(self, step: NodeStep) -> tf.Tensor:
        record = step.record
        x = tf.stop_gradient(record.raw_sample)
        with tf.GradientTape() as tape:
            tape.watch(x)
            q = tf.reduce_sum(step.q(x[:, None]))
        slope = _float32(tf.stop_gradient(tape.gradient(q, x)))
        return tf.reduce_sum(_flat(slope * _float32(record.raw_sample)), axis=1)


def _float32(value):
    """`value` as float32. A node's parameters and samples are in its compute
    dtype (float16 or bfloat16 under a mixed-precision policy); estimators do
    their own arithmetic in float32 and return a float32 surrogate."""
    return tf.cast(value, tf.float32)


def _slope_surrogate(step, value):
    """`sg[dQ/dv](v) . v`: the gradient of `Q(v, sg[s])` through `v` only, so the
    critic's (or an exact head's re-run) own parameters get no gradient.
    `value` is float32; the slope comes back in float32 whatever dtype `Q`
    computes in."""
    point = tf.stop_gradient(value)
    with tf.GradientTape() as tape:
        tape.watch(point)
        q = tf.reduce_sum(step.q(point[:, None]))
    slope = _float32(tf.stop_gradient(tape.gradient(q, point)))
    return tf.reduce_sum(_flat(slope * value), axis=1)


def _uniform_given_sample(step, sample, p):
    """Uniform noise `u` consistent with a Bernoulli sample `b = 1[u > 1 - p]`:
    `u ~ U(1 - p, 1)` where `b = 1`, `U(0, 1 - p)` where `b = 0` (float32, the
    sample cast from the node's compute dtype)."""
    b = _float32(sample)
    v = step.uniform(tf.shape(b))
    return b * (1.0 - p + v * p) + (1.0 - b) * v * (1.0 - p)


class LocalExpectation(Estimator):
    """Exact local expectation under the critic (Titsias and Lazaro-Gredilla).

    `L_X = sum_u sum_{x'_u} p_u(x'_u) sg[Q(x'_u, x_-u, s)]`: for each unit, the
    sum over its outcomes with the other units held at their sampled values
    (one categorical unit sums every outcome). Unbiased when `Q` is exact; no
    score-function term, so its variance is only that of the other units.
    """

    name = "local_expectation"
    needs_critic = True

    def check(self, info: graph.NodeInfo, num_samples: int = 1) -> None:
        _check_local(self.name, info)

    def surrogate(self, step: NodeStep) -> tf.Tensor:
        return _local_expectation(*_q_at_sample_and_outcomes(step))


class Expected(LocalExpectation):
    """The whole support of a small categorical node: `L_X = sum_k p_k sg[Q(e_k, s)]`.
    Unbiased when `Q` is exact."""

    name = "expected"

    def check(self, info: graph.NodeInfo, num_samples: int = 1) -> None:
        if info.local_kind != "categorical":
            raise ValueError(
                f"Estimator 'expected' cannot serve node {info.name!r}: it sums a "
                f"Categorical node's outcomes, not a {info.distribution} node's. Use "
                "'local_expectation' or 'critic_cv'."
            )
        if _factorised(info):
            raise ValueError(
                f"Estimator 'expected' cannot serve node {info.name!r}: it sums the whole "
                f"support of one categorical choice, and the node's samples "
                f"{list(info.event_shape)} hold {int(np.prod(info.event_shape[:-1]))} "
                "independent choices. Use 'local_expectation' (each choice's outcomes, "
                "the others held) or 'critic_cv'."
            )
        if info.event_shape[-1] > MAX_SUPPORT:
            raise ValueError(
                f"Estimator 'expected' cannot serve node {info.name!r}: its "
                f"{info.event_shape[-1]} outcomes exceed {MAX_SUPPORT} critic "
                "evaluations per example. Use 'rloo' or 'reinforce'."
            )


class RLOO(Estimator):
    """Leave-one-out over `K = num_samples` draws per example (Kool et al. 2019).

    `L_X = log p(x_k) * sg[c_X,k - mean_{j != k} c_X,j]` for each draw `k`;
    the baseline uses only the other draws, so it is unbiased.
    """

    name = "rloo"

    def check(self, info: graph.NodeInfo, num_samples: int = 1) -> None:
        if num_samples < 2:
            raise ValueError(
                f"Estimator 'rloo' for node {info.name!r} needs several draws per "
                "example: compile(num_samples=K) with K >= 2."
            )

    def surrogate(self, step: NodeStep) -> tf.Tensor:
        advantage = step.downstream - _leave_one_out_mean(step.downstream, step.num_samples)
        return step.record.log_prob() * tf.stop_gradient(advantage)


class DisARM(Estimator):
    """DisARM for binary nodes (Dong, Mnih and Tucker 2020).

    With `u` the uniform noise behind the sample `b = 1[u > 1 - p]` and the
    antithetic `b~ = 1[u < p]`, the gradient with respect to the logits is
    `1/2 (f(b) - f(b~)) (-1)^{b~} 1[b != b~] sigmoid(|logits|)` per unit, where
    `f` is the realised downstream cost; `f(b~)` re-runs the downstream graph
    with the node forced to `b~`. Unbiased. `u` is the noise the node drew
    `b` from (`graph.NodeRecord.noise`); where the node kept none (a forced
    sample), `u` is drawn from its distribution given `b`.
    """

    name = "disarm"

    def check(self, info: graph.NodeInfo, num_samples: int = 1) -> None:
        _check_binary(self.name, info)

    def surrogate(self, step: NodeStep) -> tf.Tensor:
        record = step.record
        b = _flat(_float32(record.sample))
        logits = _flat(_float32(record.params))
        p = tf.stop_gradient(tf.sigmoid(logits))
        if record.noise is not None:  # b = [noise < p] = [u > 1 - p]: the noise b came from
            u = 1.0 - _flat(_float32(record.noise))
        else:
            u = _uniform_given_sample(step, b, p)
        b_anti = tf.cast(u < p, b.dtype)
        f_anti = step.rerun(tf.reshape(b_anti, tf.shape(record.sample))[:, None])[:, 0]
        weight = (
            tf.where(tf.equal(b_anti, 1.0), -1.0, 1.0)
            * tf.cast(tf.not_equal(b, b_anti), b.dtype)
            * tf.sigmoid(tf.abs(logits))
        )
        grad = tf.stop_gradient(0.5 * (step.downstream - f_anti)[:, None] * weight)
        return tf.reduce_sum(grad * logits, axis=1)


class Gumbel(Estimator):
    """Concrete / Gumbel-softmax relaxation through the critic (biased by design).

    `L_X = sg[dQ/dv](v) . v`, the gradient of `Q(v, sg[s])` through the relaxed
    sample `v` only, with
    * Categorical nodes: `v = softmax((logits + g) / t)`, `g_k = -log(-log u_k)`
      iid Gumbel noise (Maddison et al. 2017; Jang et al. 2017); a masked
      outcome's logit is about `-1e9`, so `v_k = 0` there, it is never the
      argmax, and its logit gets no gradient;
    * Bernoulli nodes: `v = sigmoid((logits + log u - log(1 - u)) / t)` per unit
      (logistic noise).
    `straight_through=True` evaluates `Q` at the hard value `h = onehot(argmax v)`
    (or `v > 1/2`) and passes the gradient of `v`: `h + v - sg[v]`. The
    temperature `t` is a variable annealed as `t <- max(min_temperature,
    t * anneal_rate)` after every step.

    `E[L_X]`'s gradient is that of `E[Q(v)]`, not of `E[Q(x)]`: the estimator
    is biased whenever `Q` is not linear in `x` (even with an exact critic),
    less so as `t -> 0`, where its variance grows.
    """

    name = "gumbel"
    needs_critic = True

    def __init__(
        self,
        temperature: float = 0.5,
        straight_through: bool = False,
        anneal_rate: float = 1.0,
        min_temperature: float = 0.1,
    ) -> None:
        if temperature <= 0 or min_temperature <= 0:
            raise ValueError(
                f"gumbel: temperature and min_temperature must be positive; got "
                f"temperature={temperature}, min_temperature={min_temperature}."
            )
        if anneal_rate <= 0:
            raise ValueError(f"gumbel: anneal_rate must be positive; got {anneal_rate}.")
        self.temperature = float(temperature)
        self.straight_through = bool(straight_through)
        self.anneal_rate = float(anneal_rate)
        self.min_temperature = float(min_temperature)

    def check(self, info: graph.NodeInfo, num_samples: int = 1) -> None:
        _check_local(self.name, info)

    def create_state(self, info: graph.NodeInfo, add_weight: Callable[..., tf.Variable]) -> tuple:
        return TemperatureState(
            temperature=add_weight(
                f"{info.name}_temperature", (), "float32",
                initializer=keras.initializers.Constant(self.temperature),
            )
        )

    def relaxed(self, step: NodeStep) -> tf.Tensor:
        """The relaxed sample `v` (or its straight-through value), float32,
        shaped like the node's sample."""
        record = step.record
        t = step.state.temperature
        if step.info.local_kind == "binary":
            logits = _float32(record.params)
            u = step.uniform(tf.shape(logits), minval=1e-6, maxval=1 - 1e-6)
            soft = tf.sigmoid((logits + tf.math.log(u) - tf.math.log1p(-u)) / t)
            hard = tf.cast(soft > 0.5, soft.dtype)
        else:
            logits = record.layer.distribution(record.params, record.mask).logits
            g = -tf.math.log(-tf.math.log(
                step.uniform(tf.shape(logits), minval=1e-6, maxval=1 - 1e-6)))
            soft = tf.nn.softmax((logits + g) / t)
            hard = tf.one_hot(tf.argmax(soft, axis=-1), tf.shape(soft)[-1])
        if self.straight_through:
            return hard + soft - tf.stop_gradient(soft)
        return soft

    def surrogate(self, step: NodeStep) -> tf.Tensor:
        return _slope_surrogate(step, self.relaxed(step))

    def update(self, state: tuple, downstream_mean: tf.Tensor) -> None:
        t = state.temperature
        t.assign(tf.maximum(self.min_temperature, t * self.anneal_rate))

    def get_config(self) -> Dict[str, Any]:
        return {
            "temperature": self.temperature,
            "straight_through": self.straight_through,
            "anneal_rate": self.anneal_rate,
            "min_temperature": self.min_temperature,
        }


def _conditional_gumbel(log_p, sample, v):
    """`z ~ p(z | argmax z = b)` for `z_k = log_p_k + G_k`, `G_k` iid Gumbel(0, 1)
    and `b` the one-hot `sample`, from uniform noise `v` (RELAX, Grathwohl et al.
    2018, appendix; REBAR, Tucker et al. 2017), all along the last axis:

    `z_b = -log(-log v_b)` (the maximum of the `z_k` is a standard Gumbel,
    independent of the argmax, when `log_p` is normalised), and for `k != b`
    the Gumbel of location `log_p_k` truncated below `z_b`,
    `z_k = -log(-log(v_b) - log(v_k) / p_k)
         = -logaddexp(log(-log v_b), log(-log v_k) - log_p_k)`,
    the second form finite and differentiable even where `p_k = 0` (a masked
    outcome, `log_p_k` about `-1e9`, gets `z_k` about `-1e9`).
    Differentiable in `log_p` with `v` held fixed."""
    e = tf.math.log(-tf.math.log(v))  # log E_k, E_k = -log v_k ~ Exp(1)
    e_b = tf.reduce_sum(sample * e, axis=-1, keepdims=True)
    a = e - log_p
    other = -(tf.maximum(a, e_b) + tf.math.softplus(-tf.abs(a - e_b)))
    return tf.where(sample > 0, -e_b, other)


class Relax(Estimator):
    """RELAX (Grathwohl et al. 2018) for Bernoulli and Categorical nodes, with
    the critic on relaxed inputs as the control variate
    `c(z) = eta * Q(sigma_t(z), s)`:

    `g = [f(b) - c(z~)] d log p(b) + d c(z) - d c(z~)`,

    where `z` is the relaxed sample behind the node's sample `b = H(z)`,
    `z~ ~ p(z | b)` is reparameterised given `b` (REBAR), and `d` is the
    derivative with respect to the node's parameters with the noise held fixed.
    The realised downstream cost `f(b)` is the signal, so `g` is unbiased
    whatever the critic's state and whatever `(t, eta)`, provided `c` is
    continuous in `z` (the pathwise terms differentiate it): a learned critic
    is; an exact head re-runs the downstream graph at the relaxed value, which
    must then not threshold the node's value (into a mask, say).

    * Bernoulli (per unit, `p = sigmoid(logits)`): `z = logits + log u -
      log(1 - u)`, `b = 1[z > 0]`, `sigma_t(z) = sigmoid(z / t)`; `z~ = logits +
      logit(u~)` with `u~ = 1 - p + v p` where `b = 1` and `v (1 - p)` where
      `b = 0`, `v ~ U(0, 1)`.
    * Categorical (`K` outcomes, `log_p = log_softmax(logits)` with a mask's
      forbidden outcomes at about `-1e9`, so `p_k = 0`): `z_k = log_p_k + G_k`,
      `G_k` iid Gumbel, `b = onehot(argmax z)`, `sigma_t(z) = softmax(z / t)`;
      `z~` by truncated Gumbels (`_conditional_gumbel`): `z~_b = -log(-log v_b)`,
      `z~_k = -log(-log(v_b) - log(v_k) / p_k)` for `k != b`. A masked outcome
      is never the argmax, has `sigma_t(z)_k = 0` and its logit gets no gradient.

    The node draws `b` itself, so `z` is drawn given `b` too (the same
    constructions with fresh noise), and then held as `z = log_p + G` (or
    `logits + logit(u)`) with its noise `G` (`u`) fixed: `(b, z, z~)` have
    RELAX's joint law and `dz/dlog_p = 1`.

    `tune=False`: fixed `t = temperature`, `eta = 1`. `tune=True` (REBAR's
    tuning): `log t` and `eta` are node state (`<node>_log_temperature`,
    `<node>_eta`, initially `log(temperature)` and 1), and after every finite
    training step they take an Adam step (`tune_learning_rate`; moments in
    `<node>_tune_moments`) down the single-sample variance estimate
    `d/d(log t, eta) mean_rows sum_u g_u^2`, `g` the gradient with respect to
    the node's parameters and the mean weighted by the sample weights. Since
    `E[g]` does not depend on `(t, eta)`, `d Var[g] = d E[g^2]`: the step
    lowers the estimator's variance.
    """

    name = "relax"
    needs_critic = True

    def __init__(self, temperature: float = 0.5, tune: bool = False, tune_learning_rate: float = 0.01) -> None:
        if temperature <= 0:
            raise ValueError(f"relax: temperature must be positive; got {temperature}.")
        self.temperature = float(temperature)
        self.tune = bool(tune)
        self.tune_learning_rate = float(tune_learning_rate)

    def check(self, info: graph.NodeInfo, num_samples: int = 1) -> None:
        _check_local(self.name, info)

    def create_state(self, info: graph.NodeInfo, add_weight: Callable[..., tf.Variable]) -> tuple:
        if not self.tune:
            return NoState()
        return RelaxState(
            log_temperature=add_weight(
                f"{info.name}_log_temperature", (), "float32",
                initializer=keras.initializers.Constant(np.log(self.temperature)),
            ),
            eta=add_weight(
                f"{info.name}_eta", (), "float32", initializer=keras.initializers.Constant(1.0)
            ),
            # Adam's first and second moments (rows) of (log t, eta) (columns).
            tune_moments=add_weight(f"{info.name}_tune_moments", (2, 2), "float32"),
            tune_steps=add_weight(f"{info.name}_tune_steps", (), "float32"),
        )

    def control(self, state: RelaxState) -> Tuple[tf.Tensor, tf.Tensor]:
        """`(t, eta)`: the temperature and scale of the control variate."""
        if self.tune:
            return tf.exp(state.log_temperature), state.eta
        return tf.constant(self.temperature), tf.constant(1.0)

    def _logits(self, step, params):
        """What the relaxation is built on, float32 and differentiable in
        `params`: a Bernoulli node's logits, `[batch, units]`; a Categorical
        node's normalised (masked) log-probabilities, shaped like its sample."""
        if step.info.local_kind == "binary":
            return _flat(_float32(params))
        record = step.record
        return tf.nn.log_softmax(record.layer.distribution(params, record.mask).logits)

    def _relaxed_inputs(self, step, logits):
        """`(z, z~)` for `logits` (`_logits`), with this pass's noise (drawn
        once per pass, shared by `surrogate` and `tuning_gradients`)."""
        sample = _float32(step.record.sample)
        if step.cache.relax_noise is None:
            # Categorical noise above float32's smallest normal, so -log v is finite.
            low = 0.0 if step.info.local_kind == "binary" else np.finfo(np.float32).tiny
            step.cache.relax_noise = tuple(
                step.uniform(tf.shape(logits), minval=low) for _ in range(2)
            )
        noise, noise_cond = step.cache.relax_noise
        if step.info.local_kind == "binary":
            b = _flat(sample)
            p = tf.sigmoid(logits)
            eps = 1e-6

            def given_sample(v):  # u consistent with b = 1[u > 1 - p]
                return tf.clip_by_value(b * (1.0 - p + v * p) + (1.0 - b) * v * (1.0 - p), eps, 1 - eps)

            u = tf.stop_gradient(given_sample(noise))
            u_cond = given_sample(noise_cond)
            z = logits + tf.math.log(u) - tf.math.log1p(-u)
            z_cond = logits + tf.math.log(u_cond) - tf.math.log1p(-u_cond)
            return z, z_cond
        # z = log_p + G with G = sg[z_drawn - log_p], without the cancellation.
        z = tf.stop_gradient(_conditional_gumbel(logits, sample, noise)) + logits - tf.stop_gradient(logits)
        return z, _conditional_gumbel(logits, sample, noise_cond)

    def _relaxed(self, step, value, t):
        """`sigma_t(value)`, shaped like the node's sample."""
        if step.info.local_kind == "binary":
            return tf.reshape(tf.sigmoid(value / t), tf.shape(step.record.sample))
        return tf.nn.softmax(value / t, axis=-1)

    def surrogate(self, step: NodeStep) -> tf.Tensor:
        record = step.record
        logits = self._logits(step, record.params)
        t, eta = (tf.stop_gradient(v) for v in self.control(step.state))
        z, z_cond = self._relaxed_inputs(step, logits)
        c_cond = tf.stop_gradient(eta * _float32(step.q(self._relaxed(step, z_cond, t)[:, None])[:, 0]))
        score = record.log_prob() * tf.stop_gradient(step.downstream - c_cond)
        return score + eta * (
            _slope_surrogate(step, self._relaxed(step, z, t))
            - _slope_surrogate(step, self._relaxed(step, z_cond, t))
        )

    def logit_gradient(self, step: NodeStep, t: tf.Tensor, eta: tf.Tensor) -> tf.Tensor:
        """`g`, `[batch, units]` (`units` the node's parameters per example):
        this pass's estimate (the same noise as `surrogate`) of the gradient
        with respect to the node's parameters, as a differentiable function of
        `(t, eta)`:
        `g = (b - mean) [f(b) - c(z~)] + d/dparams [c(z) - c(z~)]`, `mean =
        sigmoid(logits)` (Bernoulli) or `softmax(logits)` (Categorical, zero at
        masked outcomes), the second term by a nested tape."""
        params = tf.stop_gradient(_float32(step.record.params))
        with tf.GradientTape() as tape:
            tape.watch(params)
            logits = self._logits(step, params)
            z, z_cond = self._relaxed_inputs(step, logits)
            q = _float32(step.q(tf.stack([self._relaxed(step, z, t), self._relaxed(step, z_cond, t)], axis=1)))
            difference = eta * tf.reduce_sum(q[:, 0] - q[:, 1])
        pathwise = _flat(tape.gradient(difference, params))
        b = _flat(_float32(step.record.sample))
        mean = tf.sigmoid(logits) if step.info.local_kind == "binary" else _flat(tf.exp(logits))
        return (b - mean) * (step.downstream - eta * q[:, 1])[:, None] + pathwise

    def tuning_gradients(self, step: NodeStep) -> List[tf.Tensor]:
        """`d/d(log t, eta) mean_rows sum_u g_u^2` (`logit_gradient`): the
        single-sample gradient of `E[|g|^2]`, hence of `Var[g]`. The mean over
        rows weighs them by the sample weights (`NodeStep.batch_mean`): a row
        of weight 0 contributes nothing, as in the surrogate."""
        if not self.tune or not step.info.costs:
            return []
        phi = [tf.convert_to_tensor(v) for v in (step.state.log_temperature, step.state.eta)]
        with tf.GradientTape() as tape:
            tape.watch(phi)
            g = self.logit_gradient(step, tf.exp(phi[0]), phi[1])
            variance = step.batch_mean(tf.reduce_sum(tf.square(g), axis=1))
        return tape.gradient(variance, phi, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def apply_tuning(
        self,
        state: RelaxState,
        gradients: Sequence[tf.Tensor],
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
    ) -> None:
        """One Adam step on `(log t, eta)`; a non-finite gradient changes nothing."""
        if not self.tune:
            return
        grad = tf.stack([tf.convert_to_tensor(g, tf.float32) for g in gradients])
        finite = tf.reduce_all(tf.math.is_finite(grad))
        grad = tf.where(finite, grad, 0.0)
        moments, steps = state.tune_moments, state.tune_steps
        new_steps = steps + 1.0
        m = beta_1 * moments[0] + (1.0 - beta_1) * grad
        v = beta_2 * moments[1] + (1.0 - beta_2) * tf.square(grad)
        m_hat = m / (1.0 - tf.pow(beta_1, new_steps))
        v_hat = v / (1.0 - tf.pow(beta_2, new_steps))
        delta = tf.where(finite, self.tune_learning_rate * m_hat / (tf.sqrt(v_hat) + epsilon), 0.0)
        state.log_temperature.assign_sub(delta[0])
        state.eta.assign_sub(delta[1])
        moments.assign(tf.where(finite, tf.stack([m, v]), moments))
        steps.assign(tf.where(finite, new_steps, steps))

    def get_config(self) -> Dict[str, Any]:
        return {
            "temperature": self.temperature,
            "tune": self.tune,
            "tune_learning_rate": self.tune_learning_rate,
        }


ESTIMATORS = {
    cls.name: cls
    for cls in (
        Reinforce, Reparam, CriticCV, CriticAdvantage, Pathwise, LocalExpectation,
        Expected, RLOO, DisARM, Gumbel, Relax,
    )
}

# The largest categorical support that estimators summing over every outcome
# accept, and the most outcomes of a categorical node's local sum for which
# `auto` picks `CriticCV` (they evaluate the critic once per outcome).
MAX_SUPPORT = 1024


# Bernoulli nodes with more units than this get `auto`'s first-order expansion
# of every flip, corrected by this many exact flips per example drawn by
# importance (`CriticCV(units=AUTO_EXACT_FLIPS, linearize=True,
# unit_sampling="importance")`); the choice is measured on
# benchmarks/results/variance_per_second.md.
AUTO_EXACT_FLIPS = 4


def auto(info: graph.NodeInfo, num_samples: int = 1) -> Estimator:
    """The default estimator for a node. Only estimators that stay unbiased
    whatever the critic's state are chosen:

    * `Reparam` for reparameterised nodes;
    * for Bernoulli nodes `CriticCV(common_noise=True)` (the costs past later
      Bernoulli nodes re-evaluated with those nodes redrawn from this pass's
      noise, so no critic is learned for them): with at most `AUTO_EXACT_FLIPS` units,
      every unit's flip exact; with more, every flip expanded to first order
      and `AUTO_EXACT_FLIPS` exact flips per example correcting it
      (`linearize=True`), the units drawn where the correction's variance
      lies (`unit_sampling="importance"`), which keeps most of the full sum's
      variance reduction at a small fraction of its cost on wide layers;
    * `CriticCV(common_noise=True)` for Categorical nodes whose local sum has at most
      `MAX_SUPPORT` outcomes (exact sums over every outcome; for a factorised
      node of `n` choices of `K` outcomes, over each factor's `K - 1` other
      outcomes, `n (K - 1)` in all);
    * otherwise `RLOO` when `num_samples >= 2`, else `Reinforce`.
    """
    if info.reparameterized:
        return Reparam()
    if info.local_kind == "binary":
        if int(np.prod(info.event_shape)) > AUTO_EXACT_FLIPS:
            return CriticCV(units=AUTO_EXACT_FLIPS, linearize=True, unit_sampling="importance", common_noise=True)
        return CriticCV(common_noise=True)
    if info.local_kind == "categorical" and _categorical_outcomes(info) <= MAX_SUPPORT:
        return CriticCV(common_noise=True)
    return RLOO() if num_samples >= 2 else Reinforce()


def get(identifier: Union[None, str, Estimator], info: graph.NodeInfo, num_samples: int = 1) -> Estimator:
    """Resolves a name, `"auto"` or an `Estimator` instance for one node."""
    if isinstance(identifier, Estimator):
        estimator = identifier
    elif identifier in (None, "auto"):
        estimator = auto(info, num_samples)
    elif identifier in ESTIMATORS:
        estimator = ESTIMATORS[identifier]()
    else:
        raise ValueError(
            f"Unknown estimator {identifier!r} for node {info.name!r}. Choose one "
            f"of {sorted(ESTIMATORS)} or 'auto'."
        )
    estimator.check(info, num_samples)
    return estimator


def resolve(
    option: Union[str, Estimator, Mapping[str, Union[str, Estimator]]],
    scg: graph.SCG,
    layer_of: Callable[[graph.NodeInfo], Any],
    num_samples: int = 1,
    created: Optional[Mapping[str, Estimator]] = None,
) -> Dict[str, Estimator]:
    """`{node: Estimator}` for every node of `scg` from `compile(estimator=option)`
    (a name, `"auto"`, an `Estimator` or a dict by node or layer name; a node
    layer's own `estimator=` wins over a global name). `layer_of(info)` is the
    node's layer. `created`: the estimators the nodes' state was created for
    (None before): changing one's kind is then an error."""
    if isinstance(option, dict):
        unknown = set(option) - set(scg.node_names) - {i.layer_name for i in scg.nodes}
        if unknown:
            raise ValueError(
                f"compile(estimator=...) names unknown nodes {sorted(unknown)}; the "
                f"model's nodes are {list(scg.node_names)}."
            )
    resolved = {}
    for info in scg.nodes:
        layer = layer_of(info)
        if isinstance(option, dict):
            choice = option.get(info.name, option.get(info.layer_name))
            choice = choice or layer.estimator or "auto"
        else:
            choice = layer.estimator or option
        resolved[info.name] = get(choice, info, num_samples)
    for name, est in resolved.items():
        if created is not None and est.name != created[name].name:
            raise ValueError(
                f"Node {name!r} was set up for estimator "
                f"{created[name].name!r} when it first ran; changing "
                f"it to {est.name!r} afterwards is not supported. Build a new model."
            )
        if created is not None and est.common_noise != created[name].common_noise:
            raise ValueError(
                f"Node {name!r} was set up with common_noise={created[name].common_noise} "
                "when it first ran (its critic's heads depend on it); changing it afterwards "
                "is not supported. Build a new model."
            )
    return resolved
