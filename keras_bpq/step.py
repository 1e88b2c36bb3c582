"""The stages of a `BackpropQModel`'s training step, from its forward pass to
its updates; `BackpropQModel.train_step` runs them in order.

The actor minimises the surrogate `L = sum_X L_X + sum_c c + R` of the pass
(`forward.run`), whose gradient estimates `grad J`, `J(theta) = E[sum_c c]`;
the critics regress on their targets (`critics.CriticSet`); the estimators
update their own state. The stages:

1. `Snapshot.read`: the values of every variable the step may write, read
   before anything writes them (the forward pass too: it may update
   statistics such as BatchNormalization's);
2. the forward pass and its surrogate under a gradient tape, and
   `actor_loss`, the loss whose gradient the actor's optimizer takes;
3. the actor's gradients (`tape.gradient`) and the critics' evaluation of
   the pass (`critics.CriticSet.evaluate`; with `critic_update_period=k`
   only on the steps that train the critics, `critics.CriticSet.due`);
4. `apply`: the step's status (`callbacks.step_status`: a non-finite cost
   or gradient, a Categorical mask row that allows no outcome, a loss-scale
   overflow) decides whether any update happens: every update of the step is
   applied, or none (`distribute.apply_updates`), and a step that would
   write a non-finite value is undone from the snapshot.

A traced step names each stage's operations by a name scope, `STAGE_SCOPES`
(the actor's gradient of a stage under `gradient_tape/<scope>`), so a
profile of the compiled step says what each stage costs
(`benchmarks/profile_step.py`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from keras_bpq import _keras_compat
from keras_bpq import callbacks as callbacks_lib
from keras_bpq import costs as costs_lib
from keras_bpq import distribute
from keras_bpq import forward as forward_lib
from keras_bpq import replay as replay_lib

if TYPE_CHECKING:
    from keras_bpq import critics as critics_lib
    from keras_bpq import discovery
    from keras_bpq import graph
    from keras_bpq import state as state_lib


CRITICS_SCOPE = "critics"  # the critics' evaluation of the pass
UPDATE_SCOPE = "update"  # `apply`: the status, the snapshot and every update
METRICS_SCOPE = "metrics"
STAGE_SCOPES = (forward_lib.RECORD_SCOPE, forward_lib.ESTIMATORS_SCOPE, CRITICS_SCOPE, UPDATE_SCOPE, METRICS_SCOPE)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The values of every variable a step may write, taken before it writes
    any: `variables[i]` held `values[i]`."""

    variables: List[tf.Variable]
    values: List[tf.Tensor]

    @classmethod
    def read(cls, written: Sequence[Tuple[tf.Variable, str]]) -> Snapshot:
        """Reads `written`, `[(variable, role)]` (`callbacks.model_step_variables`)."""
        variables = [v for v, _ in written]
        return cls(variables, [tf.identity(v.value) for v in variables])


def actor_loss(forward: forward_lib.ForwardPass, optimizer: keras.optimizers.Optimizer) -> tf.Tensor:
    """The loss whose gradient the actor's `optimizer` applies: the weighted
    mean of the pass's surrogate plus its regularisation, divided by the
    number of replicas (optimizers sum gradients over replicas: this makes
    the global mean), and scaled by the optimizer's loss scale (a
    `LossScaleOptimizer` under mixed_float16, or `loss_scale_factor=`;
    `apply` unscales)."""
    loss = costs_lib.weighted_mean(forward.surrogate, forward.weights) + forward.regularization
    return optimizer.scale_loss(loss / distribute.num_replicas())


def apply(
    scg: graph.SCG,
    setup: discovery.Setup,
    training_state: state_lib.TrainingState,
    optimizer: keras.optimizers.Optimizer,
    actor_variables: Sequence[tf.Variable],
    critics: critics_lib.CriticSet,
    forward: forward_lib.ForwardPass,
    grads: Sequence[Optional[tf.Tensor]],
    evaluation: Optional[critics_lib.CriticEvaluation],
    snapshot: Snapshot,
) -> None:
    """Applies every update of one step, or none, and reports the step's
    status to `training_state`.

    Takes the batch's `scg`, the model's compiled `setup`
    (`discovery.Setup`), its `training_state`, the actor's `optimizer`,
    `actor_variables` and their `grads` (of `actor_loss`), its `critics`
    (`critics.CriticSet`) and their `evaluation` of the step's `forward`
    pass, and the `snapshot` read before the step, from which a step that
    would write a non-finite value is undone.
    """
    # A LossScaleOptimizer skips steps whose scaled gradient overflows, and
    # lowers its scale: the step is skipped whole then (`overflow`), and
    # reported only when it overflowed at a scale of at most 1.
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    status = callbacks_lib.step_status(scg, forward.costs, [] if loss_scaled else grads)
    status, row = callbacks_lib.mask_status(scg, forward.records, status)
    overflow = None
    options, estimators = setup.critic_options, setup.node_estimators
    if loss_scaled:
        status, row, overflow = callbacks_lib.loss_scale_status(
            scg, forward.costs, grads, _keras_compat.loss_scale(optimizer),
            training_state.past_warmup(options.warmup), status, row,
        )
    values = distribute.StepValues(
        grads, [] if evaluation is None else evaluation.grads,
        *forward_lib.estimator_signals(scg, estimators, forward),
        critics.inputs(forward, evaluation) if options.steps > 1 else None,
        replay_lib.step_rows(training_state.replay_buffer, forward),
    )
    skip = distribute.global_sum(tf.cast(tf.not_equal(status, 0), tf.float32)) > 0
    updates = distribute.StepUpdates(
        critics=functools.partial(critics.update, evaluation, forward),
        actor=functools.partial(optimizer.apply, trainable_variables=actor_variables),
        state=functools.partial(training_state.update_estimators, scg.nodes, estimators),
        target_copies=critics.update_target_copies,
        actor_ready=functools.partial(training_state.past_warmup, options.warmup),
        warmup=options.warmup,
        replay=replay_lib.step_updates(training_state.replay_buffer, setup.replay, critics),
        critics_due=critics.due if options.every > 1 else None,
    )
    undone = distribute.apply_updates(skip, updates, values, snapshot.variables, snapshot.values, overflow)
    # A step that would have written a non-finite value was undone: code
    # -2 - i names the first such variable, written[i].
    status = tf.where(tf.logical_and(tf.equal(status, 0), undone >= 0), -2 - undone, status)
    training_state.report(status, row)
