"""One training step of a `BackpropQModel`, from its forward pass to its
updates (`train`).

The actor minimises the surrogate `L = sum_X L_X + sum_c c + R` of the pass
(`forward.run`), whose gradient estimates `grad J`, `J(theta) = E[sum_c c]`;
the critics regress on their targets (`critics.CriticSet`); the estimators
update their own state. The step's status (`callbacks.step_status`: a
non-finite cost or gradient, a Categorical mask row that allows no outcome, a
loss-scale overflow) decides whether any of it happens: every update of the
step is applied, or none (`distribute.apply_updates`), and a step that would
write a non-finite value is undone.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Tuple

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


def train(
    run_forward: Callable[[], forward_lib.ForwardPass],
    scg: graph.SCG,
    setup: discovery.Setup,
    training_state: state_lib.TrainingState,
    optimizer: keras.optimizers.Optimizer,
    actor_variables: Sequence[tf.Variable],
    critics: critics_lib.CriticSet,
    written: Sequence[Tuple[tf.Variable, str]],
) -> Tuple[forward_lib.ForwardPass, Optional[critics_lib.CriticEvaluation]]:
    """Runs one training step and returns its forward pass and the critics'
    evaluation of it (for the metrics).

    Takes the step's forward pass (`run_forward()`, a `forward.ForwardPass`
    of the batch, run under the gradient tape), the batch's `scg`, the
    model's compiled `setup` (`discovery.Setup`), its `training_state`, the
    actor's `optimizer` and `actor_variables`, its `critics`
    (`critics.CriticSet`) and `written`, `[(variable, role)]`, every variable
    the step may write (`callbacks.model_step_variables`), whose values it
    reads before anything writes them (the forward pass too: it may update
    statistics such as BatchNormalization's) to undo a step that would write
    a non-finite value. Reports the step's status to `training_state`.
    """
    replicas = distribute.num_replicas()
    saved = [tf.identity(v.value) for v, _ in written]
    # Forward pass and surrogate.
    with tf.GradientTape() as tape:
        forward = run_forward()
        # Optimizers sum gradients over replicas: this makes the global mean.
        loss = (costs_lib.weighted_mean(forward.surrogate, forward.weights) + forward.regularization) / replicas
        # Loss scaling (mixed_float16 wraps the optimizer in a
        # LossScaleOptimizer; or loss_scale_factor=): apply() unscales.
        scaled = optimizer.scale_loss(loss)
    # Gradients: the actor's, the critics' (on their targets), the estimators' own.
    grads = tape.gradient(scaled, actor_variables)
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
    evaluation = critics.evaluate(forward, with_gradient=True)
    values = distribute.StepValues(
        grads, [] if evaluation is None else evaluation.grads,
        *forward_lib.estimator_signals(scg, estimators, forward),
        critics.inputs(forward, evaluation) if options.steps > 1 else None,
        replay_lib.step_rows(training_state.replay_buffer, forward),
    )
    # Apply: every update of the step, or none.
    skip = distribute.global_sum(tf.cast(tf.not_equal(status, 0), tf.float32)) > 0
    updates = distribute.StepUpdates(
        critics=functools.partial(critics.update, evaluation, forward),
        actor=functools.partial(optimizer.apply, trainable_variables=actor_variables),
        state=functools.partial(training_state.update_estimators, scg.nodes, estimators),
        target_copies=critics.update_target_copies,
        actor_ready=functools.partial(training_state.past_warmup, options.warmup),
        warmup=options.warmup,
        replay=replay_lib.step_updates(training_state.replay_buffer, setup.replay, critics),
    )
    undone = distribute.apply_updates(skip, updates, values, [v for v, _ in written], saved, overflow)
    # A step that would have written a non-finite value was undone: code
    # -2 - i names the first such variable, written[i].
    status = tf.where(tf.logical_and(tf.equal(status, 0), undone >= 0), -2 - undone, status)
    training_state.report(status, row)
    return forward, evaluation
