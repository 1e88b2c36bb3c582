"""Gradient diagnostics: exact gradients by enumeration, and estimator draws.

`exact_gradients` sums over every joint configuration `z` of the model's
discrete nodes:

    J = mean_b  sum_z  p(z | x_b) * E_eps[ sum_c c(x_b, z, eps) ]

where `p(z | x_b) = prod_X p(z_X | pa_X)` and continuous (reparameterised) nodes
are averaged over `num_continuous_draws` noise draws with their pathwise
gradient. With no continuous node the result is exact. Differentiating this sum
with ordinary backprop gives `grad J`, against which every estimator is tested.

`estimate_gradients` draws independent estimates of the same gradient with the
compiled estimators (state frozen), vectorised over draws.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from keras_bpq import _keras_compat
from keras_bpq import costs as costs_lib
from keras_bpq import critics as critics_lib
from keras_bpq import targets as targets_lib

if TYPE_CHECKING:
    from keras_bpq.model import BackpropQModel


def _tile_rows(value, repeats, interleave):
    """Repeats every row `repeats` times (`interleave`) or the whole batch."""
    if value is None:
        return None

    def tile(t):
        t = tf.convert_to_tensor(t)
        if interleave:
            return tf.repeat(t, repeats, axis=0)
        return tf.tile(t, [repeats] + [1] * (t.shape.rank - 1))

    return tf.nest.map_structure(tile, value)


# Compiled estimate functions per model, so repeated calls do not retrace.
_FUNCTIONS = weakref.WeakKeyDictionary()


def _compiled(model, fn):
    """`fn` as the model's compiled steps run: eagerly, traced, or under XLA."""
    if getattr(model, "run_eagerly", False):
        return fn
    jit = bool(getattr(model, "jit_compile", False))
    return tf.function(fn, jit_compile=jit, autograph=False)


def _as_numpy(grads, variables):
    return [
        np.zeros(v.shape, np.float32) if g is None else np.asarray(g)
        for g, v in zip(grads, variables)
    ]


def enumeration_plan(
    model: BackpropQModel,
    x: Any,
    max_configurations: int = 65536,
    only: Optional[Iterable[str]] = None,
) -> Tuple[List[str], Dict[str, np.ndarray], int]:
    """Which nodes are enumerated, and the forced samples for every configuration.

    Returns `(names, forced, num_configurations)`: the enumerated node names and,
    for each, an array
    `[num_configurations, *event_shape]` of its value in every joint configuration.
    Raises a ValueError if a node can be neither enumerated nor reparameterised,
    or if the joint support exceeds `max_configurations`.
    """
    scg = model.scg(x)
    names, supports = [], []
    for info in scg.nodes:
        if only is not None and info.name not in only:
            continue
        layer = model.node_layer(info)
        support = layer.support(info.event_shape)
        if support is not None:
            names.append(info.name)
            supports.append(np.asarray(support, np.float32))
        elif not info.reparameterized:
            raise ValueError(
                f"exact_gradients cannot handle node {info.name!r}: its {info.distribution} "
                "distribution has no small finite support to enumerate and is not "
                "reparameterised."
            )
    sizes = [s.shape[0] for s in supports]
    total = int(np.prod(sizes, dtype=np.float64)) if sizes else 1
    if total > max_configurations:
        raise ValueError(
            f"exact_gradients would enumerate {total} joint configurations of nodes "
            f"{names} (supports {sizes}), more than max_configurations="
            f"{max_configurations}. Use a smaller model or raise the limit."
        )
    index = np.stack(np.unravel_index(np.arange(total), sizes), axis=1) if sizes else None
    forced = {n: s[index[:, i]] for i, (n, s) in enumerate(zip(names, supports))}
    return names, forced, total


def exact_gradients(
    model: BackpropQModel,
    x: Any,
    y: Any = None,
    sample_weight: Optional[Any] = None,
    max_configurations: int = 65536,
    num_continuous_draws: int = 1000,
    return_objective: bool = False,
) -> Union[List[np.ndarray], Tuple[List[np.ndarray], float]]:
    """The gradient of `J = E[sum_c c]` by enumerating all discrete configurations.

    Args:
      model: a compiled `BackpropQModel`.
      x: the inputs of one batch.
      y: its targets, if the costs need them.
      sample_weight: its per-example weights `[batch]`, or None.
      max_configurations: the largest joint support allowed (a clear error above).
      num_continuous_draws: noise draws per configuration for continuous nodes
        (unused when the model has none, where the result is exact).
      return_objective: also return `J`.

    Returns:
      One numpy array per variable of `model.actor_variables` (and `J` if asked).
    """
    x = tf.nest.map_structure(tf.convert_to_tensor, x)
    names, forced, num_configs = enumeration_plan(model, x, max_configurations)
    scg = model.scg(x)
    continuous = [i.name for i in scg.nodes if i.name not in names]
    draws = num_continuous_draws if continuous else 1
    passes = 1
    if continuous and _low_precision(model):
        # A bfloat16 gradient summed over many rows stagnates (a bias gradient
        # over 48,000 rows came out 10x too small): sum at most
        # _LOW_PRECISION_DRAWS draws in one pass, and the passes in float64.
        passes = -(-draws // _LOW_PRECISION_DRAWS)
        draws = -(-draws // passes)
    batch = int(tf.nest.flatten(x)[0].shape[0])
    rows_per_example = num_configs * draws
    forced_rows = {
        n: tf.constant(np.tile(np.repeat(v, draws, axis=0), (batch,) + (1,) * (v.ndim - 1)))
        for n, v in forced.items()
    }
    model.build_training_state()  # the critics are not actor variables
    variables = model.actor_variables

    def compute(x, y, sample_weight):
        x_rows = _tile_rows(x, rows_per_example, interleave=True)
        y_rows = _tile_rows(y, rows_per_example, interleave=True)
        with tf.GradientTape() as tape:
            _, _, total, records = model.record_forward(
                x_rows, y_rows, training=True, forced=forced_rows, keep_gradient=continuous
            )
            log_p = tf.zeros_like(total)
            for n in names:
                log_p += records[n].log_prob()
            weighted = tf.exp(log_p) * total / float(draws)
            per_example = tf.reduce_sum(tf.reshape(weighted, [batch, rows_per_example]), axis=1)
            objective = costs_lib.weighted_mean(per_example, sample_weight)
        return objective, tape.gradient(objective, variables)

    function = _compiled(model, compute)
    total_objective, total_grads = 0.0, [np.zeros(v.shape, np.float64) for v in variables]
    for _ in range(passes):  # fresh continuous draws every pass
        objective, grads = function(x, y, sample_weight)
        total_objective += float(objective) / passes
        for k, g in enumerate(_as_numpy(grads, variables)):
            total_grads[k] += g.astype(np.float64) / passes
    grads = [g.astype(np.float32) for g in total_grads]
    return (grads, total_objective) if return_objective else grads


# Continuous draws per pass of `exact_gradients` when layers compute in 16 bits.
_LOW_PRECISION_DRAWS = 25


def _low_precision(model):
    """Whether any layer of `model` computes in a 16-bit float type."""
    return any(
        getattr(layer, "compute_dtype", "float32") in ("bfloat16", "float16")
        for layer in _keras_compat.flatten_layers(model)
    )


def estimate_gradients(
    model: BackpropQModel, x: Any, y: Any = None, sample_weight: Optional[Any] = None, num_draws: int = 100,
    chunk_size: int = 25,
) -> List[np.ndarray]:
    """`num_draws` independent gradient estimates with the compiled estimators.

    Every draw resamples the whole batch and evaluates the surrogate loss of
    `model.compile(estimator=...)`, with estimator state (baselines, critics)
    frozen. Draws are vectorised `chunk_size` at a time (the per-draw Jacobian
    needs memory growing with the square of the draws in one pass).

    Returns:
      One numpy array per variable of `model.actor_variables`, of shape
      `[num_draws, *variable.shape]`.
    """
    x = tf.nest.map_structure(tf.convert_to_tensor, x)
    model.scg(x)
    model.build_training_state()  # the critics are not actor variables
    variables = model.actor_variables

    def compute(x, y, sample_weight, draws):
        x_rows = _tile_rows(x, draws, interleave=False)
        y_rows = _tile_rows(y, draws, interleave=False)
        w_rows = _tile_rows(sample_weight, draws, interleave=False)
        with tf.GradientTape() as tape:
            out = model.run_forward(x_rows, y_rows, training=True, sample_weight=w_rows)
            per_row = tf.reshape(out.surrogate, [draws, -1])
            if out.weights is not None:
                per_row *= tf.reshape(tf.cast(out.weights, per_row.dtype), [draws, -1])
            per_draw = tf.reduce_mean(per_row, axis=1)
        return tape.jacobian(per_draw, variables, experimental_use_pfor=True)

    chunks = []
    key = (
        bool(getattr(model, "jit_compile", False)),
        bool(getattr(model, "run_eagerly", False)),
        tuple((n, id(e)) for n, e in model.node_estimators.items()),
    )
    cache = _FUNCTIONS.setdefault(model, {})
    if key not in cache:
        cache[key] = _compiled(model, compute)
    function = cache[key]
    for start in range(0, num_draws, chunk_size):
        draws = min(chunk_size, num_draws - start)
        grads = function(x, y, sample_weight, draws)
        chunks.append(
            [
                np.zeros((draws,) + tuple(v.shape), np.float32) if g is None else np.asarray(g)
                for g, v in zip(grads, variables)
            ]
        )
    return [np.concatenate(parts, axis=0) for parts in zip(*chunks)]


def gradient_variance(draws: Sequence[np.ndarray]) -> float:
    """Total variance of an estimator: the sum over all entries of the per-entry
    variance across draws, for a list of `[num_draws, ...]` arrays."""
    return float(sum(np.var(d, axis=0, ddof=1).sum() for d in draws))


class ExactCritic(critics_lib.Critic):
    """An "oracle" critic: `Q^c_X(x, s) = E[c | X = x, s]` by enumeration.

    Re-runs the model with the context and `X` forced, summing over every joint
    configuration of the later discrete nodes (weighted by their probabilities)
    and averaging over `num_continuous_draws` draws of later continuous nodes.
    Inject it with `model.compile(critics={node: ExactCritic(model, node)})` to
    test estimators that are unbiased when their critic is exact.

    Its `heads` are fixed when it is made, from the model's discovered SCG
    (`model.scg()` first): by default every head of `node` that is not exact
    (`targets.inexact_heads`). Where the compiled estimators serve some of
    them by common noise (`CriticCV(common_noise=True)`, as `auto` does),
    pass the heads the node learns (`critics.learned_heads`) as `heads`:
    `compile` refuses a critic whose heads differ from them.
    """

    def __init__(
        self,
        model: BackpropQModel,
        node: str,
        num_continuous_draws: int = 64,
        max_configurations: int = 4096,
        heads: Optional[Sequence[str]] = None,
    ) -> None:
        if model.known_scg is None:
            raise ValueError(
                f"ExactCritic(model, {node!r}): the model's SCG is not known yet. "
                "Compile the model and call model.scg(example_inputs) first."
            )
        self.model = model
        self.node = node
        self.num_continuous_draws = num_continuous_draws
        self.max_configurations = max_configurations
        self.heads = tuple(heads) if heads is not None else targets_lib.inexact_heads(model.known_scg)[node]

    def q(self, context: Mapping[str, Any], values: tf.Tensor, target: bool = True) -> tf.Tensor:
        model, scg = self.model, self.model.known_scg
        info = scg.node(self.node)
        position = scg.node_names.index(self.node)
        later = {
            n
            for c in self.heads
            for n in scg.cost_ancestors[c]
            if scg.node_names.index(n) > position
        }
        x = context["inputs"]
        names, forced, num_configs = enumeration_plan(
            model, x, self.max_configurations, only=later
        )
        draws = self.num_continuous_draws if len(names) < len(later) else 1
        per_row = num_configs * draws
        rows = tf.shape(values)[0]
        repeat = lambda t: tf.repeat(t, per_row, axis=0)  # noqa: E731
        forced_rows = {n: repeat(context[n]) for n in info.context if n != "inputs"}
        forced_rows[self.node] = repeat(values)
        for n, v in forced.items():
            v = np.repeat(v, draws, axis=0)
            forced_rows[n] = tf.tile(tf.constant(v), [rows] + [1] * (v.ndim - 1))
        keep = {self.node} | (later - set(names))
        _, costs, _, records = model.record_forward(
            tf.nest.map_structure(repeat, x), None, training=True, forced=forced_rows, keep_gradient=keep
        )
        log_p = 0.0
        for n in names:
            log_p += records[n].log_prob()
        weight = tf.exp(log_p) / float(draws)
        heads = [
            tf.reduce_sum(tf.reshape(weight * costs[c], [rows, per_row]), axis=1) for c in self.heads
        ]
        return tf.stack(heads, axis=1)
