"""The callbacks `BackpropQModel.fit` runs besides the user's, and the step's
status codes they report.

`fit(callbacks=[...])` runs `fit_callbacks(callbacks)`: `NonFiniteGuard` and
`FitPosition` before the user's callbacks (so no checkpointing callback saves
after a failed step, and every checkpoint knows where `fit` stands),
`ResumeAtPosition` after them (so it runs after `BackupAndRestore` restored).
`GuardedLoops` gives a `BackpropQModel` these loops: Keras' own, with those
callbacks and checks.

* Non-finite guard: every training step computes a status (`step_status`,
  `mask_status`, `loss_scale_status`; 0 when it stands) and keeps none of its
  updates when it is not 0 (nor, but for the lowering of its loss scale,
  when a `LossScaleOptimizer` skips its update); `NonFiniteGuard` raises
  `nonfinite_error` after such a step (`raise_if_nonfinite`;
  `mask_rows_checked` raises after `predict` or `evaluate` for a mask row
  without an outcome).
* Exact resume: `FitPosition` records in the model (and so in every
  checkpoint) which epoch `fit` is in and how many of its batches are done.
  After `keras.callbacks.BackupAndRestore` restores a checkpoint,
  `ResumeAtPosition` restarts at that epoch and passes over the batches already
  trained without training on them, so a run killed mid-epoch and restarted
  ends with the weights of a run that never stopped (given the same batches in
  the same order).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from keras_bpq import _keras_compat
from keras_bpq import data as data_lib
from keras_bpq import distribute
from keras_bpq import nodes
from keras_bpq import saving as saving_lib

if TYPE_CHECKING:
    from keras_bpq import graph
    from keras_bpq import state as state_lib


def fit_callbacks(callbacks: Sequence[keras.callbacks.Callback]) -> List[keras.callbacks.Callback]:
    """The callbacks `fit` runs: the guard and the position first, the user's
    `callbacks`, then the resume."""
    callbacks = list(callbacks)
    return [NonFiniteGuard(), FitPosition(callbacks)] + callbacks + [ResumeAtPosition()]


# -- the non-finite guard ------------------------------------------------------
def step_status(
    scg: graph.SCG, costs: Mapping[str, tf.Tensor], grads: Sequence[Optional[tf.Tensor]]
) -> tf.Tensor:
    """0 when every cost and gradient is finite, else the 1-based index of the
    first non-finite cost, or -1 for a non-finite gradient."""
    status = tf.constant(0)
    for index in reversed(range(len(scg.costs))):
        finite = tf.reduce_all(tf.math.is_finite(costs[scg.costs[index]]))
        status = tf.where(finite, status, index + 1)
    # A sparse gradient (tf.IndexedSlices) is checked on its values only.
    grads_finite = distribute.finite([getattr(g, "values", g) for g in grads if g is not None])
    return tf.where(tf.logical_and(tf.equal(status, 0), tf.logical_not(grads_finite)), -1, status)


def mask_status(
    scg: graph.SCG, records: Mapping[str, graph.NodeRecord], status: tf.Tensor
) -> Tuple[tf.Tensor, tf.Tensor]:
    """`(status, row)`: `status`, or `len(scg.costs) + 1 + j` where node `j`'s
    Categorical mask allows no outcome in batch row `row` (the first such
    node and row). Outside XLA the node's own assertion stops the step
    first; under XLA, which drops assertions, its sample is NaN and this
    names the cause instead of the cost it made non-finite."""
    row = tf.constant(0)
    for index in reversed(range(len(scg.nodes))):
        record = records[scg.nodes[index].name]
        if record.mask is None or not hasattr(record.layer, "empty_rows"):
            continue
        empty = tf.reshape(record.layer.empty_rows(record.mask), [-1])
        found = tf.reduce_any(empty)
        status = tf.where(found, len(scg.costs) + 1 + index, status)
        row = tf.where(found, tf.argmax(tf.cast(empty, tf.int32), output_type=tf.int32), row)
    return status, row


def loss_scale_status(
    scg: graph.SCG,
    costs: Mapping[str, tf.Tensor],
    grads: Sequence[Optional[tf.Tensor]],
    scale: tf.Tensor,
    ready: tf.Tensor,
    status: tf.Tensor,
    row: tf.Tensor,
) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """`(status, row, overflow)` of a step whose actor optimizer is a
    `keras.optimizers.LossScaleOptimizer`, from `status` and `row` (those of
    `step_status` without the gradients and `mask_status`).

    Such an optimizer skips the update of a step whose gradient `grads`
    (scaled by `scale`, its loss scale in the step) holds a NaN or inf, and
    halves its scale. `overflow` (a boolean, the same on every replica) is
    whether it will skip this step's update: the gradient overflowed on some
    replica and `ready` (the critics' warm-up is over, so the actor is
    updated). `apply_updates` then lets the optimizer lower its scale and
    applies nothing else, so the step is skipped whole.

    Overflow is the ordinary course at the start of `mixed_float16` training
    (the scale starts at 2**15) and the status stays 0 then. But loss scaling
    is there to keep small float16 gradients from underflowing: at a scale of
    1 or less the gradient of the loss itself overflows, which no loss scale
    meant for that cures (a lower one flushes the gradients' small parts to
    zero instead). A step that overflows at a scale of at most 1 (and whose
    status is 0) gets the status `loss_scale_code(scg, i)`, `i` the index of
    the cost of largest magnitude in the step, with `row` the decimal
    exponent of that magnitude; it is skipped whole, the loss scale included.
    """
    overflow = distribute.overflow(grads, ready)
    persistent = tf.logical_and(
        tf.logical_and(overflow, tf.cast(scale, tf.float32) <= 1.0), tf.equal(status, 0)
    )
    # (A model has at least one cost: `scg` refuses one without.)
    largest = tf.stack([
        tf.reduce_max(tf.abs(tf.cast(costs[name], tf.float32))) for name in scg.costs
    ])
    index = tf.cast(tf.argmax(largest), tf.int32)
    # Decimal exponent; a cost of 0 (or below float32's normal range) counts as 1e-38.
    # (in float64, so that a power of 10 is not rounded below its exponent).
    magnitude = tf.maximum(tf.cast(tf.reduce_max(largest), tf.float64), 1e-38)
    exponent = tf.cast(tf.floor(tf.math.log(magnitude) / tf.math.log(tf.constant(10.0, tf.float64))), tf.int32)
    status = tf.where(persistent, loss_scale_code(scg, 0) + index, status)
    row = tf.where(persistent, exponent, row)
    return status, row, overflow


def loss_scale_code(scg: graph.SCG, index: int) -> int:
    """The status of a step that overflowed a `LossScaleOptimizer` at a loss
    scale of at most 1 (`loss_scale_status`), cost `index` of `scg.costs` the
    largest: after the codes of the costs and of the nodes' masks."""
    return len(scg.costs) + len(scg.nodes) + 1 + index


def mask_row_index(info: graph.NodeInfo, row: int) -> Union[int, np.ndarray]:
    """A mask row as the node's assertion names it, from `row`, its index into
    the mask's rows flattened (as `mask_status` gives it): `row` itself for a
    mask `[batch, K]`; for a mask `[batch, *inner, K]` of rank 3 or more, its
    index along every axis but the last, `[b, *unravel(row mod |inner|, inner)]`
    with `b = row // |inner|` the row of the batch."""
    inner = info.event_shape[:-1]  # the mask's axes between the batch and the outcomes
    if not inner:
        return row
    size = int(np.prod(inner))
    return np.array((row // size,) + tuple(int(i) for i in np.unravel_index(row % size, inner)))


def empty_mask_row_error(scg: graph.SCG, code: int, row: int) -> tf.errors.InvalidArgumentError:
    """The error for a `mask_status` `code` (not 0) of `predict` or `evaluate`
    under XLA, where the node's mask allowed no outcome in row `row` (an index
    into the mask's rows flattened, as `mask_status` gives it): the error, with
    the same message, that the node's assertion raises outside XLA (which gives
    a mask of rank 3 or more the row's index along every axis but the last,
    `mask_row_index`)."""
    info = scg.nodes[code - len(scg.costs) - 1]
    message = " ".join(str(part) for part in nodes.empty_row_message(info.layer_name, mask_row_index(info, row)))
    return tf.errors.InvalidArgumentError(None, None, message)


def step_variables(
    weights: Iterable[tf.Variable],
    training_state: Optional[state_lib.TrainingState],
    critic_variables: Iterable[tf.Variable],
    optimizers: Iterable[Tuple[Optional[keras.optimizers.Optimizer], str]],
) -> List[Tuple[tf.Variable, str]]:
    """`[(variable, role)]`: every variable a training step may write (the
    model's `weights`, critics and their target copies, estimator state, the
    `optimizers`' variables (`[(optimizer or None, role)]`), for undoing a
    step; `role` names it in errors. A model without a `training_state`
    (None; a `logged.LoggedModel`) leaves its own status variables out of
    `weights`. The replay buffer is left out: it only ever receives finite
    rows, drawn by weights that an undone step keeps."""
    roles = {}

    def add(variables, role):
        for variable in variables:
            roles.setdefault(id(variable), (variable, role))

    node_state = {} if training_state is None else training_state.node_state
    state = {id(v): n for n, s in node_state.items() for v in s}
    targets = [] if training_state is None else training_state.non_trainable_weights
    report = [] if training_state is None else [training_state.status, training_state.status_row]
    critic_ids = {id(v) for v in critic_variables}
    # A step writes the replay buffer only when its costs and gradients are
    # finite, and its rows were drawn by the weights an undone step keeps.
    replay_ids = set() if training_state is None else {id(v) for v in training_state.replay_variables}
    for variable in weights:
        if any(variable is v for v in report):
            continue  # the step's own report, written after the check
        if id(variable) in replay_ids:
            continue
        if not tf.as_dtype(variable.dtype).is_floating:
            role = "counter"  # never non-finite; set back with the rest
        elif id(variable) in state:
            role = f"estimator state of node {state[id(variable)]!r}"
        elif id(variable) in critic_ids:
            role = "critic weight"
        elif variable.trainable:
            role = "weight"
        elif any(variable is w for w in targets):
            role = "critic target copy"
        else:
            role = "non-trainable weight"
        add([variable], role)
    for optimizer, role in optimizers:
        if optimizer is not None:
            add(optimizer.variables, role)
    return list(roles.values())


def nonfinite_error(
    model_name: str,
    scg: Optional[graph.SCG],
    code: int,
    row: int,
    variables: Sequence[Tuple[tf.Variable, str]],
    loss_scale: Optional[float] = None,
) -> FloatingPointError:
    """The error for a step whose status (`step_status`, `mask_status`,
    `loss_scale_status`, or `-2 - i` for an update that wrote a non-finite
    value into `variables[i]`, `step_variables`) is `code`, not 0; `row` is
    the flattened row of a mask (`mask_status`), named as the node's assertion
    names it (`mask_row_index`), or for `loss_scale_status` the decimal
    exponent of the largest cost; `loss_scale` is the actor's
    `LossScaleOptimizer`'s loss scale now (None without one). `scg` names the
    costs and nodes (it may be None for a code `-2 - i`)."""
    if code > 0 and code >= loss_scale_code(scg, 0):
        name = scg.costs[code - loss_scale_code(scg, 0)]
        now = "" if loss_scale is None else f" (now {loss_scale:g})"
        return FloatingPointError(
            f"Model {model_name!r}: the actor's gradient was not finite in a training step at a loss "
            f"scale of at most 1{now}, although every cost was finite. The LossScaleOptimizer (of the "
            "mixed_float16 policy) skips the update of a step whose scaled gradient overflows and "
            "halves its loss scale; at a scale of at most 1 the gradient of the loss itself overflows "
            "(float16 tops at 65504), which loss scaling, meant to keep small gradients from "
            f"underflowing, cannot cure. The largest cost, {name!r}, is of order 1e{row} in an example "
            "of the step's batch. Nothing that step would have written was kept, its loss scale "
            "included; every earlier step whose gradient overflowed was skipped whole too, but for "
            "the halving of the loss scale. So every weight, critic, target copy, optimizer slot and "
            "estimator state holds finite values, as the last step that stood left them. Scale the "
            f"costs down (divide {name!r} by a constant so that it is of order 1), or train under the "
            "float32 or mixed_bfloat16 policy, whose range is float32's."
        )
    if code > 0 and code > len(scg.costs):
        info = scg.nodes[code - len(scg.costs) - 1]
        index = mask_row_index(info, row)
        where = (
            "the row of the step's batch; with num_samples=K the example is row // K"
            if np.ndim(index) == 0 else
            "its index along every axis but the last, the first the row of the step's batch; "
            "with num_samples=K the example is that row // K"
        )
        return FloatingPointError(
            f"Model {model_name!r}: Categorical node {info.name!r}: row {index} of its mask allows no "
            f"outcome in a training step ({where}). The step was skipped: nothing it would have "
            "written was kept. Give every example at least one allowed outcome (a no-op action, say)."
        )
    if code > 0:
        cause = f"cost {scg.costs[code - 1]!r} was not finite (NaN or inf)"
        fix = f"Check the layers that compute {scg.costs[code - 1]!r} (log of 0, division by 0, overflow)."
    elif code == -1:
        cause = "the gradient was not finite although every cost was"
        fix = "Lower the learning rate or clip the parameters feeding the stochastic nodes."
    else:
        variable, role = variables[-2 - code]
        cause = (
            f"the update would have written a non-finite value (NaN or inf) into "
            f"{role} {variable.path!r}, although every cost was finite"
        )
        fix = (
            "Costs or gradients this large overflow the optimizers (their squared "
            "gradients, say): scale the costs down, lower the learning rate or clip "
            "the gradients (clipnorm=)."
        )
    return FloatingPointError(
        f"Model {model_name!r}: {cause} in a training step. Nothing that step would "
        "have written was kept, so every weight, critic, target copy, optimizer "
        f"slot and estimator state holds finite values. {fix}"
    )


# -- what the steps of a BackpropQModel report, read back ---------------------
def model_step_variables(model: keras.Model) -> List[Tuple[tf.Variable, str]]:
    """`step_variables` of a `BackpropQModel`: takes the model, reads its
    public `weights`, `training_state`, `critic_variables` and optimizers, and
    gives `[(variable, role)]`, every variable its training step may write."""
    return step_variables(
        model.weights, model.training_state, model.critic_variables, saving_lib.optimizers(model)
    )


@contextlib.contextmanager
def mask_rows_checked(model: keras.Model) -> Iterator[None]:
    """Around a `BackpropQModel`'s `predict` and `evaluate` (and their
    `_on_batch` forms): takes the model, clears its `training_state`'s status
    before the loop, and after it raises the error a node's mask assertion
    raises outside XLA (`empty_mask_row_error` of the model's `known_scg`)
    for the first mask row without an outcome that a step reported."""
    model.training_state.status.assign(0)
    yield
    code, row = model.training_state.take_report()
    if code:
        raise empty_mask_row_error(model.known_scg, code, row)


def raise_if_nonfinite(model: keras.Model) -> None:
    """Takes a `BackpropQModel`, reads and clears its `training_state`'s
    report, and raises `nonfinite_error` (a `FloatingPointError`) if a
    training step met a non-finite value, with the loss scale of its actor's
    `LossScaleOptimizer` where it has one."""
    code, row = model.training_state.take_report()
    if code:
        scale = None
        if isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer):
            scale = float(keras.ops.convert_to_numpy(_keras_compat.loss_scale(model.optimizer)))
        raise nonfinite_error(model.name, model.known_scg, code, row, model_step_variables(model), scale)


class NonFiniteGuard(keras.callbacks.Callback):
    """Stops `fit` with a clear error after a step that met a non-finite value:
    a cost, an actor gradient, or a value the step would have written.

    The step itself already kept none of its updates, so every weight, critic,
    target copy, optimizer slot and estimator state holds finite values.
    """

    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        self.model.training_state.status.assign(0)

    def on_train_batch_end(self, batch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        self.model.raise_if_nonfinite()


# -- exact resume ------------------------------------------------------------
class FitPosition(keras.callbacks.Callback):
    """Keeps `model.training_state.fit_epoch` / `fit_batch` at the epoch `fit` is in
    and the number of its batches already trained, before any checkpointing
    callback saves them (`fit_callbacks` puts it ahead of the user's).

    It also drops a `BackupAndRestore` metadata file left unreadable by a
    crash (the position inside the weights file is what resuming uses), and
    notes the backup folders so that a backup written by another model is
    reported as such (`explained_load_errors`).
    """

    def __init__(self, callbacks: Iterable[keras.callbacks.Callback] = ()) -> None:
        super().__init__()
        self._callbacks = list(callbacks)

    @staticmethod
    def clear(model: keras.Model) -> None:
        """Marks the model as outside `fit` (position -1, -1)."""
        model.training_state.fit_epoch.assign(-1)
        model.training_state.fit_batch.assign(-1)
        saving_lib.set_backup_dirs(model, None)

    def _set(self, epoch, batch):
        self.model.training_state.fit_epoch.assign(epoch)
        self.model.training_state.fit_batch.assign(batch)

    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        # Anything else found after the callbacks' on_train_begin was restored.
        self.clear(self.model)
        saving_lib.set_backup_dirs(self.model, [
            c.backup_dir for c in self._callbacks if isinstance(c, keras.callbacks.BackupAndRestore)
        ])
        for callback in self._callbacks:
            if not isinstance(callback, keras.callbacks.BackupAndRestore):
                continue
            path = _keras_compat.backup_metadata_path(callback)
            if path and os.path.exists(path):
                try:
                    with open(path) as f:
                        json.load(f)
                except ValueError:
                    os.remove(path)

    def on_epoch_begin(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        self._set(epoch, 0)

    def on_train_batch_end(self, batch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        self.model.training_state.fit_batch.assign(batch + 1)

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        self._set(epoch + 1, 0)


class ResumeAtPosition(keras.callbacks.Callback):
    """After the other callbacks' `on_train_begin` (so after a
    `BackupAndRestore` restore), resumes at the restored position: sets the
    initial epoch and passes over the batches of that epoch already trained
    (they are drawn from the data but not trained on; their logs are the
    metrics so far).
    `fit_callbacks` puts it after the user's."""

    def __init__(self) -> None:
        super().__init__()
        self._restored = False

    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        model = self.model
        state = model.training_state
        epoch, batch = int(state.fit_epoch.numpy()), int(state.fit_batch.numpy())
        state.status.assign(0)
        if epoch < 0:
            return
        self._restored = True
        _keras_compat.set_initial_epoch(model, epoch)
        _keras_compat.skip_train_batches(model, batch)

    def on_train_end(self, logs: Optional[Dict[str, Any]] = None) -> None:
        if self._restored:
            _keras_compat.set_initial_epoch(self.model, None)


class GuardedLoops:
    """`fit`, `evaluate`, `train_on_batch`, `test_on_batch`, `predict` and
    `predict_on_batch` of a `BackpropQModel` (mixed in before `keras.Model`,
    as `saving.AtomicCheckpoints`): Keras' own, with the callbacks of
    `fit_callbacks` around `fit`'s, `raise_if_nonfinite` after
    `train_on_batch` and `mask_rows_checked` around the others.

    Before `fit`, `evaluate` and `train_on_batch` the model's public
    `build_training_state(x, y)` keeps the targets' signature of the data and
    creates the training state, before Keras traces a (distributed) step and
    (the optimizers' slots) before `BackupAndRestore` restores."""

    def raise_if_nonfinite(self) -> None:
        """Raises `FloatingPointError` if a training step met a non-finite value
        (`keras_bpq.callbacks.raise_if_nonfinite`)."""
        raise_if_nonfinite(self)

    def fit(self, *args: Any, **kwargs: Any) -> keras.callbacks.History:
        """`keras.Model.fit`, with the callbacks of `keras_bpq.callbacks.fit_callbacks`
        around the user's (the non-finite guard, the fit position and the resume)."""
        kwargs = data_lib.weights_without_targets(super().fit, args, kwargs)
        self.build_training_state(kwargs.get("x"), kwargs.get("y"))
        callbacks = fit_callbacks(kwargs.pop("callbacks", None) or [])
        try:
            return super().fit(callbacks=callbacks, **kwargs)
        finally:
            FitPosition.clear(self)

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = data_lib.weights_without_targets(super().evaluate, args, kwargs)
        self.build_training_state(kwargs.get("x"), kwargs.get("y"))
        with mask_rows_checked(self):
            return super().evaluate(**kwargs)

    def train_on_batch(self, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs.get("x")
        self.build_training_state(x, args[1] if len(args) > 1 else kwargs.get("y"))
        logs = super().train_on_batch(*args, **kwargs)
        self.raise_if_nonfinite()
        return logs

    def test_on_batch(self, *args: Any, **kwargs: Any) -> Any:
        with mask_rows_checked(self):
            return super().test_on_batch(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with mask_rows_checked(self):
            return super().predict(*args, **kwargs)

    def predict_on_batch(self, *args: Any, **kwargs: Any) -> Any:
        with mask_rows_checked(self):
            return super().predict_on_batch(*args, **kwargs)
