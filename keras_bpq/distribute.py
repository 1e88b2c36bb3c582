"""A training step's updates under `tf.distribute`, applied whole or not at all.

A step updates, in this order, the critics (then replays and stores the step's
rows, with `compile(replay=...)`), the actor (after the critics' warm-up),
every node's estimator state and the critics' target copies; a step
that met a non-finite cost or gradient on any replica applies none of them, and
a step whose updates wrote a NaN or inf anywhere is set back to the values
before it. Under a strategy that synchronises through `merge_call` (a
`MirroredStrategy`, even on one device) the decision runs in cross-replica
context and every update on each replica, as Keras' `LossScaleOptimizer` does.

The reductions here make global-batch means out of per-replica values.
"""

from typing import Callable, NamedTuple, Optional, Sequence

import tensorflow as tf

from keras_bpq import _keras_compat


def num_replicas() -> int:
    """Replicas in sync (1 outside `tf.distribute`)."""
    context = tf.distribute.get_replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def global_sum(value: tf.Tensor) -> tf.Tensor:
    """Sum over replicas (the value itself outside tf.distribute)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def global_mean(value: tf.Tensor) -> tf.Tensor:
    """Mean of a per-example tensor over the global batch (equal replica batches)."""
    return global_sum(tf.reduce_mean(value)) / num_replicas()


def global_weighted_mean(value: tf.Tensor, sample_weight: Optional[tf.Tensor]) -> tf.Tensor:
    """`sum_i w_i v_i / sum_i w_i` over the global batch (the plain mean without
    weights; 0 where every weight is 0)."""
    if sample_weight is None:
        return global_mean(value)
    weight = tf.reshape(tf.cast(sample_weight, value.dtype), [-1])
    sums = global_sum(tf.stack([tf.reduce_sum(value * weight), tf.reduce_sum(weight)]))
    return tf.math.divide_no_nan(sums[0], sums[1])


def zero_products(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """`[len(tensors)]` float32: for each floating tensor `T`, read as a matrix
    `[rows, n]`, the sum of `T 0` (`0` a zero column): exactly 0 where `T` is
    finite and NaN where it holds a NaN or an inf (`inf * 0 = NaN`), whatever
    the finite magnitudes; 0 for a tensor that is empty or not floating.

    A matrix product reads each tensor once with the BLAS kernels and writes
    nothing of its size: under XLA on CPU it is much cheaper than one
    concatenation of every tensor checked with `is_finite` (the step's cost:
    `benchmarks/overhead.py`), and it costs few operations to trace (a step
    checks every variable it may write)."""
    zeros, products = {}, []
    for t in tensors:
        if not t.dtype.is_floating or t.shape.num_elements() == 0:
            products.append(tf.constant(0.0))
            continue
        columns = t.shape[-1] if t.shape.rank else 1
        matrix = t if t.shape.rank == 2 else tf.reshape(t, [-1, columns])
        key = (columns, t.dtype)
        if key not in zeros:
            zeros[key] = tf.zeros([columns, 1], t.dtype)
        products.append(tf.cast(tf.reduce_sum(tf.linalg.matmul(matrix, zeros[key])), tf.float32))
    return tf.stack(products) if products else tf.zeros([0])


def finite(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """Whether every floating tensor in `tensors` holds finite values only
    (`zero_products`)."""
    return all_finite(zero_products(tensors))


def variable_products(variables: Sequence[tf.Variable]) -> tf.Tensor:
    """`zero_products` of the variables' values: NaN at each one holding a
    NaN or inf (`all_finite`, `first_nonfinite`)."""
    return zero_products([v.value for v in variables])


def all_finite(products: tf.Tensor) -> tf.Tensor:
    """Whether the variables of `products` (`variable_products`) hold finite values only."""
    return tf.math.is_finite(tf.reduce_sum(products))


def first_nonfinite(products: tf.Tensor) -> tf.Tensor:
    """The index of the first variable of `products` (`variable_products`)
    holding a NaN or inf, or -1."""
    if products.shape[0] == 0:
        return tf.constant(-1)
    bad = tf.logical_not(tf.math.is_finite(products))
    first = tf.cast(tf.argmax(tf.cast(bad, tf.int32)), tf.int32)
    return tf.where(tf.reduce_any(bad), first, -1)


def overflow(grads: Sequence[Optional[tf.Tensor]], ready: tf.Tensor) -> tf.Tensor:
    """Whether the actor's `LossScaleOptimizer` skips this step's update: some
    replica's gradient `grads` (scaled; a `tf.IndexedSlices` checked on its
    values) holds a NaN or inf, and `ready` (the critics' warm-up is over, so
    the actor is updated). The same boolean on every replica."""
    values = [getattr(g, "values", g) for g in grads if g is not None]
    overflowed_here = tf.cast(tf.logical_not(finite(values)), tf.float32)
    return tf.logical_and(global_sum(overflowed_here) > 0, ready)


def overflowed(grads: Sequence[Optional[tf.Tensor]]) -> list:
    """`grads` with NaN in every value (None stays None; a `tf.IndexedSlices`
    keeps its indices): what a replica gives the actor's `LossScaleOptimizer`
    on a step whose gradient overflowed on some replica, so that it skips the
    update and lowers its loss scale whichever replica overflowed."""
    nan = float("nan")
    return [
        None if g is None
        else tf.IndexedSlices(g.values + tf.cast(nan, g.values.dtype), g.indices, g.dense_shape)
        if isinstance(g, tf.IndexedSlices) else g + tf.cast(nan, g.dtype)
        for g in grads
    ]


class StepUpdates(NamedTuple):
    """What a training step writes, as functions `apply_updates` calls in order:
    bound methods (or `functools.partial`s of them) of the objects that own
    each update (the `critics.CriticSet`, the actor's optimizer, the
    `state.TrainingState`, the `replay.ReplayBuffer`), not closures over the
    model.

    `critics(critic_grads, critic_inputs)`, `actor(grads)` and
    `state(means, tuning, has_data)` run on every replica with that replica's
    values; `target_copies()` runs once. `actor_ready()` (a boolean tensor) says
    whether the critics' warm-up is over; `warmup` is its length in steps.
    `replay` (`ReplayUpdates`, None without replay) gives the critics their
    replayed updates and stores the step's rows. `critics_due()` (a boolean
    tensor; None for every step) says whether `critics` runs this step
    (`critics.CriticSet.due`).
    """

    critics: Callable[..., None]
    actor: Callable[..., None]
    state: Callable[..., None]
    target_copies: Callable[[], None]
    actor_ready: Callable[[], tf.Tensor]
    warmup: int
    replay: Optional["ReplayUpdates"] = None
    critics_due: Optional[Callable[[], tf.Tensor]] = None


class ReplayUpdates(NamedTuple):
    """The replay part of a step: `ready()` (a boolean tensor, the same on
    every replica) says whether the buffer holds rows; then `update(rows)`
    runs the critics' replayed updates on every replica, and `store(rows)`
    writes each replica's rows of the step into its buffer. The decision is
    taken outside the replicas' functions: an optimizer's update inside a
    replica's control flow cannot synchronise under `merge_call`."""

    ready: Callable[[], tf.Tensor]
    update: Callable[..., None]
    store: Callable[..., None]


class StepValues(NamedTuple):
    """A replica's values for `StepUpdates`: the actor's and critics' gradients,
    `means` (per node, the global mean of `c_X`), `has_data` (a boolean, or None
    without sample weights: false when every weight is 0, and the estimator
    state then stays as it is), `tuning` (per node, the estimators' own
    replica-mean tuning gradients), `critic_inputs` (`critics.CriticInputs`
    of this replica, for repeated critic updates from cross-replica context;
    None otherwise) and `replay_rows` (`replay.ReplayRows`, this replica's rows
    of the step for its replay buffer; None without replay)."""

    grads: list
    critic_grads: list
    means: list
    has_data: Optional[tf.Tensor]
    tuning: list
    critic_inputs: object = None
    replay_rows: object = None


def apply_updates(
    skip: tf.Tensor, updates: StepUpdates, values: StepValues, variables: Sequence[tf.Variable],
    saved: Sequence[tf.Tensor], overflow: Optional[tf.Tensor] = None,
) -> tf.Tensor:
    """Critics and their replay, then actor (after warm-up), then estimator
    state and target copies; nothing at all when `skip` (a non-finite cost or
    gradient on any replica). When `overflow` (a boolean, the same on every
    replica; None for never) and not `skip`, only `updates.actor` runs: the
    actor's `LossScaleOptimizer` skips that update (its scaled gradient
    overflowed) and lowers its loss scale, and the rest of the step is skipped
    with it (`callbacks.loss_scale_status`).

    `variables` are all a step may write and `saved` their values before it.
    After the updates every floating one is checked: if any holds a NaN or inf
    (an optimizer's slot that overflowed, say), all of them are set back to
    their values before the step, so the step leaves nothing non-finite behind.
    Returns the index in `variables` of the first non-finite variable (of any
    replica), or -1 when the step stands."""

    def noop():
        return tf.constant(0)

    def restore(saved):
        for variable, value in zip(variables, saved):
            variable.assign(value)
        return noop()

    context = tf.distribute.get_replica_context()
    # Not `num_replicas_in_sync == 1`: a one-device MirroredStrategy still
    # synchronises through merge_call, which cannot run inside a tf.cond.
    if (
        context is None
        or not tf.distribute.has_strategy()
        or _keras_compat.strategy_supports_no_merge_call()
    ):

        def critics():
            updates.critics(values.critic_grads)
            return noop()

        def apply():
            tf.cond(updates.critics_due(), critics, noop) if updates.critics_due else critics()
            if updates.replay is not None:

                def replay():
                    updates.replay.update(values.replay_rows)
                    return noop()

                tf.cond(updates.replay.ready(), replay, noop)
                updates.replay.store(values.replay_rows)

            def actor():
                updates.actor(values.grads)
                return noop()

            tf.cond(updates.actor_ready(), actor, noop) if updates.warmup else actor()
            updates.state(values.means, values.tuning, values.has_data)
            updates.target_copies()
            return noop()

        def actor_only():
            updates.actor(values.grads)
            return noop()

        tf.cond(skip, noop, apply if overflow is None else lambda: tf.cond(overflow, actor_only, apply))
        # Replicas hold the same values; agree anyway on undoing the step.
        products = variable_products(variables)  # read before any restore
        undo = global_sum(tf.cast(tf.logical_not(all_finite(products)), tf.float32)) > 0

        def undo_step():
            first = tf.maximum(first_nonfinite(products), 0)
            restore(saved)
            return first

        return tf.cond(undo, undo_step, lambda: tf.constant(-1))

    def cross_replica(strategy, skip, overflow, values, saved):
        each = strategy.extended.call_for_each_replica
        # Every replica holds the same all-reduced flags; take the first's.
        skip = strategy.experimental_local_results(each(tf.identity, args=(skip,)))[0]
        if overflow is not None:
            overflow = strategy.experimental_local_results(each(tf.identity, args=(overflow,)))[0]

        def critics():
            each(updates.critics, args=(values.critic_grads, values.critic_inputs))

        def apply():
            tf.cond(updates.critics_due(), critics, lambda: None) if updates.critics_due else critics()
            if updates.replay is not None:
                tf.cond(
                    updates.replay.ready(),
                    lambda: each(updates.replay.update, args=(values.replay_rows,)),
                    lambda: None,
                )
                each(updates.replay.store, args=(values.replay_rows,))
            tf.cond(
                updates.actor_ready(),
                lambda: each(updates.actor, args=(values.grads,)),
                lambda: None,
            )
            each(updates.state, args=(values.means, values.tuning, values.has_data))
            updates.target_copies()

        def actor_only():
            # Keras' LossScaleOptimizer decides here on the first replica's
            # gradient alone, but would apply their all-reduced sum: every
            # replica's must read as overflowed when any one's did.
            each(lambda grads: updates.actor(overflowed(grads)), args=(values.grads,))

        tf.cond(skip, lambda: None, apply if overflow is None else lambda: tf.cond(overflow, actor_only, apply))
        products = strategy.experimental_local_results(each(lambda: variable_products(variables)))
        undo = tf.logical_not(tf.reduce_all([all_finite(p) for p in products]))

        def undo_step():
            first = tf.reduce_max([first_nonfinite(p) for p in products])
            each(restore, args=(saved,))
            return tf.maximum(first, 0)

        return tf.cond(undo, undo_step, lambda: tf.constant(-1))

    return context.merge_call(cross_replica, args=(skip, overflow, values, saved))
