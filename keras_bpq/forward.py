"""The values a training step passes between its stages, a recorded forward
pass and the same pass with every node's estimator step and the surrogate,
and the functions that make them (`record`, `run`) from a model's Keras
call and its compiled `discovery.Setup`.

The surrogate is `L = sum_X L_X + sum_c c` per row: its gradient (with the
samples held fixed unless a node is reparameterised) estimates `grad J`,
`J = E[sum_c c]` (docs/method.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import (
    TYPE_CHECKING, AbstractSet, Any, Callable, Dict, FrozenSet, Iterable, List, Mapping, NamedTuple, Optional,
    Sequence, Set, Tuple,
)

import keras
import tensorflow as tf

from keras_bpq import _keras_compat
from keras_bpq import costs as costs_lib
from keras_bpq import distribute
from keras_bpq import estimators as estimators_lib
from keras_bpq import graph
from keras_bpq import q_values

if TYPE_CHECKING:
    from keras_bpq import discovery

# The name scopes of `run`'s two stages in a traced step: the recorded pass and
# the estimators' steps with the surrogate (`step.STAGE_SCOPES`; the actor's
# gradient of each is under `gradient_tape/<scope>`).
RECORD_SCOPE = "record"
ESTIMATORS_SCOPE = "estimators"


class Recording(NamedTuple):
    """One recorded forward pass (`record`, `BackpropQModel.record_forward`)."""

    y_pred: Any  # the model's outputs
    costs: Dict[str, tf.Tensor]  # every cost's per-example value, [batch]
    total: tf.Tensor  # their sum, with gradients along deterministic paths
    records: Dict[str, graph.NodeRecord]  # by node name


class ForwardPass(NamedTuple):
    """A recorded forward pass and its surrogate (`run`, `BackpropQModel.run_forward`).

    With `compile(num_samples=K)` every example is repeated `K` times
    (consecutive rows), so every row is one (example, draw) pair, and `x`, `y`
    and `weights` are the repeated ones.
    """

    y_pred: Any
    costs: Dict[str, tf.Tensor]
    total: tf.Tensor
    records: Dict[str, graph.NodeRecord]
    surrogate: tf.Tensor  # [rows]: total + sum_X L_X, whose gradient estimates grad J
    regularization: tf.Tensor  # the actor's Keras regularisation losses of this pass, a scalar
    weights: Optional[tf.Tensor]  # the per-row sample weights, or None
    x: Any
    y: Any
    steps: Dict[str, estimators_lib.NodeStep]  # by node name


def repeat_rows(
    num_samples: int, x: Any, y: Any = None, sample_weight: Optional[tf.Tensor] = None
) -> Tuple[Any, Any, Optional[tf.Tensor]]:
    """`(x, y, sample_weight)` with every example repeated `num_samples` times
    (consecutive rows); unchanged for one sample."""
    if num_samples == 1:
        return x, y, sample_weight
    repeat = lambda t: tf.repeat(t, num_samples, axis=0)  # noqa: E731
    x = tf.nest.map_structure(repeat, x)
    y = None if y is None else tf.nest.map_structure(repeat, y)
    sample_weight = None if sample_weight is None else repeat(sample_weight)
    return x, y, sample_weight


def record(
    call: Callable[..., Any],
    compiled_losses: costs_lib.CompiledLosses,
    cost_names: Sequence[str],
    x: Any,
    y: Any = None,
    training: bool = True,
    forced: Optional[Mapping[str, tf.Tensor]] = None,
    keep_gradient: Iterable[str] = (),
    noise: Optional[Mapping[str, tf.Tensor]] = None,
    slopes: AbstractSet[str] = frozenset(),
) -> Recording:
    """One recorded forward pass: takes the model's Keras `call` (the model
    itself, `call(x, training=...)`), its `compiled_losses` (per-example
    costs of `compile(loss=...)`), the SCG's `cost_names` and a batch, and
    gives a `Recording` whose `total` sums the named costs. `forced` fixes
    node samples by name; only the nodes in `keep_gradient` keep their
    samples' gradient; Bernoulli nodes named in `noise` draw their samples
    from that uniform noise (`graph.Recorder`).

    For the nodes named in `slopes`, one backward pass of the recorded pass
    gives `d total / dx`, per row, at each one's sample `x` read as a real
    vector (later samples held: they are stop-gradient), in their records'
    `slope`. The costs outside `C_X` do not depend on `x`, so it is the slope
    of `c_X`."""
    tape = tf.GradientTape(watch_accessed_variables=False) if slopes else contextlib.nullcontext()
    with tape:
        with graph.Recorder(
            forced=forced, keep_gradient=keep_gradient, noise=noise,
            slope_tape=tape if slopes else None, slope_nodes=slopes,
        ) as rec:
            y_pred = call(x, training=training)
        costs = {name: costs_lib.as_per_example(v) for name, v in rec.costs.items()}
        if compiled_losses.entries:
            costs.update(compiled_losses(y, y_pred))
        total = tf.add_n([costs[name] for name in cost_names])
    records = {r.name: r for r in rec.nodes}
    if rec.watched:
        names = sorted(rec.watched)
        gradients = tape.gradient(
            total, [rec.watched[n] for n in names], unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        for name, gradient in zip(names, gradients):
            slope = tf.stop_gradient(tf.cast(gradient, tf.float32))
            records[name] = dataclasses.replace(records[name], slope=slope)
    return Recording(y_pred, costs, total, records)


def build_surrogate(
    scg: graph.SCG,
    estimators: Mapping[str, estimators_lib.Estimator],
    node_state: Mapping[str, tuple],
    recording: Recording,
    q_function: q_values.QFunction,
    x: Any,
    y: Any,
    num_samples: int,
    reads_target: bool,
) -> Tuple[Dict[str, estimators_lib.NodeStep], tf.Tensor]:
    """`(steps, surrogate)`: every node's `estimators.NodeStep` in `recording`
    and the per-row surrogate `total + sum_X L_X`.

    `q_function` is the model's `q_values.QFunction`; the estimators that need
    a critic read its target copies when `reads_target`."""
    costs, total, records = recording.costs, recording.total, recording.records
    steps = {}
    result = total
    # Later nodes first: a node with exact heads passes its deviation (see
    # `estimators.CriticCV`) to the earlier nodes whose costs include all of its own.
    deviations = {}
    for info in reversed(scg.nodes):
        estimator = estimators[info.name]
        downstream = tf.add_n([costs[c] for c in info.costs]) if info.costs else tf.zeros_like(total)
        q = None
        if estimator.needs_critic and info.costs:
            q = q_function.node_q(info, x, y, records, reads_target, of_pass=True)
        # Not the deviations of costs with common-noise heads here: their
        # residual is zero (`estimators.CriticCV`'s `common_noise`).
        noise = set(q_function.common_noise_costs(info))
        later = [
            d for name, d in deviations.items()
            if set(scg.node(name).costs) <= set(info.costs) and not noise & set(scg.node(name).costs)
        ]
        step = estimators_lib.NodeStep(
            info=info,
            record=records[info.name],
            downstream=downstream,
            state=node_state[info.name],
            q=q,
            num_samples=num_samples,
            rerun=q_function.rerun(info, x, y, records),
            successor_deviation=tf.add_n(later) if later else None,
            sample_slope=records[info.name].slope,
        )
        steps[info.name] = step
        if info.costs:
            surrogate, deviation = estimator.surrogate_and_deviation(step)
            result = result + surrogate
            if deviation is not None and q_values.exact_costs(scg, info) == info.costs:
                deviations[info.name] = deviation
    return {info.name: steps[info.name] for info in scg.nodes}, result


def estimator_signals(
    scg: graph.SCG, estimators: Mapping[str, estimators_lib.Estimator], forward: ForwardPass
) -> Tuple[List[tf.Tensor], Optional[tf.Tensor], List[List[tf.Tensor]]]:
    """`(means, has_data, tuning)` of a pass for the estimators' state updates
    (`TrainingState.update_estimators`): per node the global weighted mean of
    `c_X`; whether any sample weight is non-zero (None without weights; with
    weights that are all 0, no data, the estimator state stays as it is); per
    node the replica means of the estimator's own tuning gradients (relax's
    control variate), whose rows are weighted by the sample weights as the
    means are (`NodeStep.row_weights`: `w_i` times the replicas over the
    global sum of the weights)."""
    weights, replicas = forward.weights, distribute.num_replicas()
    means = [distribute.global_weighted_mean(forward.steps[info.name].downstream, weights) for info in scg.nodes]
    has_data, steps = None, forward.steps
    if weights is not None:
        weights = tf.reshape(tf.cast(weights, tf.float32), [-1])
        has_data = distribute.global_sum(tf.reduce_sum(tf.abs(weights))) > 0
        row_weights = tf.math.divide_no_nan(weights * replicas, distribute.global_sum(tf.reduce_sum(weights)))
        steps = {n: dataclasses.replace(step, row_weights=row_weights) for n, step in steps.items()}
    tuning = [
        [distribute.global_sum(g) / replicas for g in estimators[n].tuning_gradients(steps[n])]
        for n in scg.node_names
    ]
    return means, has_data, tuning


def slope_nodes(
    scg: graph.SCG, estimators: Mapping[str, estimators_lib.Estimator], q_function: q_values.QFunction
) -> FrozenSet[str]:
    """The nodes whose recorded pass gives their samples' slopes
    (`record`, `estimators.NodeStep.sample_slope`): those whose estimator
    asks (`Estimator.wants_sample_slope`) and whose every head is exact at
    the sample, exact or common-noise (`q_values`), so that `Q(x, s) = c_X`
    and the slope of `c_X` is the slope of `Q`."""
    return frozenset(
        info.name for info in scg.nodes
        if estimators[info.name].wants_sample_slope(info)
        and set(info.costs) <= set(q_values.exact_costs(scg, info)) | set(q_function.common_noise_costs(info))
    )


def kept_gradients(scg: graph.SCG, estimators: Mapping[str, estimators_lib.Estimator]) -> Set[str]:
    """The nodes whose samples keep their gradient in a recorded pass: those
    whose estimator asks for it (`Estimator.keeps_gradient`)."""
    return {info.name for info in scg.nodes if estimators[info.name].keeps_gradient}


def record_pass(
    setup: discovery.Setup,
    scg: graph.SCG,
    call: Callable[..., Any],
    x: Any,
    y: Any = None,
    training: bool = True,
    forced: Optional[Mapping[str, tf.Tensor]] = None,
    keep_gradient: Optional[Iterable[str]] = None,
) -> Recording:
    """`record` of a model's Keras `call` with its compiled `setup`'s losses
    (a `discovery.Setup`), for the SCG of the batch's input signature (`scg`):
    `keep_gradient` is by default the nodes whose estimator asks for it
    (`kept_gradients`)."""
    if keep_gradient is None:
        keep_gradient = kept_gradients(scg, setup.node_estimators)
    return record(call, setup.compiled_losses, scg.costs, x, y, training, forced, keep_gradient)


def run(
    setup: discovery.Setup,
    scg: graph.SCG,
    call: Callable[..., Any],
    node_state: Mapping[str, tuple],
    regularization: Callable[[], tf.Tensor],
    x: Any,
    y: Any = None,
    training: bool = True,
    sample_weight: Optional[tf.Tensor] = None,
) -> ForwardPass:
    """A recorded forward pass and its surrogate loss, a `ForwardPass`, for a
    model's compiled `setup` (a `discovery.Setup`): takes the SCG of the
    batch's input signature (`scg`), the model's Keras `call`, the estimators' `node_state`
    (`TrainingState.node_state`) and `regularization`, which gives the
    actor's regularisation losses of the last call, and a batch.

    With `compile(num_samples=K)` every example is repeated `K` times
    (consecutive rows). Besides `record`'s values it holds the per-node
    `estimators.NodeStep`s, `surrogate` (`[rows]`: `total + sum_X L_X`, whose
    gradient estimates `grad J`), `regularization` (of this pass), and the
    repeated `x`, `y` and sample `weights`.
    """
    estimators = setup.node_estimators
    x, y, sample_weight = repeat_rows(setup.num_samples, x, y, sample_weight)
    with tf.name_scope(RECORD_SCOPE):
        recording = record(
            call, setup.compiled_losses, scg.costs, x, y, training, keep_gradient=kept_gradients(scg, estimators),
            slopes=slope_nodes(scg, estimators, setup.q_function),
        )
        # Read before any re-run of the model's layers replaces their losses.
        regularization = regularization()
    with tf.name_scope(ESTIMATORS_SCOPE):
        steps, surrogate = build_surrogate(
            scg, estimators, node_state, recording, setup.q_function,
            x, y, setup.num_samples, setup.critic_options.actor_reads_target,
        )
    return ForwardPass(
        *recording, surrogate=surrogate, regularization=regularization, weights=sample_weight,
        x=x, y=y, steps=steps,
    )


def regularization_loss(
    model: keras.layers.Layer, critics: keras.layers.Layer, actor_variables: Sequence[tf.Variable]
) -> tf.Tensor:
    """The scalar sum of the actor's Keras regularisation losses: `add_loss`
    terms of `model`'s layers from the last call, those of the layers inside
    `critics` (the training state) excluded, and the weight regularisers of
    `actor_variables`."""
    critic_layers = {id(layer) for layer in _keras_compat.flatten_layers(critics)}
    losses = [
        loss
        for layer in _keras_compat.flatten_layers(model)
        if id(layer) not in critic_layers
        for loss in _keras_compat.own_losses(layer)
    ]
    return costs_lib.sum_losses(losses + costs_lib.weight_penalties(actor_variables))
