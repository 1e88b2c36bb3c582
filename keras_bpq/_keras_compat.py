"""Every Keras and TensorFlow private API that keras_bpq uses, in one place.

Keras 3 and TensorFlow give no public way to do a few things the package
needs: read a functional model's graph of operations (to re-evaluate costs at
a node's other outcomes), list a layer's sublayers and own losses, reach the
trainer's loss tracker and initial epoch, pass over batches at the start of
`fit` (to resume mid-epoch), read `BackupAndRestore`'s metadata file, know
whether XLA compiles the graph being traced, read a `LossScaleOptimizer`'s
current loss scale, ask a strategy whether it synchronises through
`merge_call`, and work around two bugs of Keras' train
and test loops under `tf.distribute`. Each is a small named function here; the
rest of the package calls these and never a private attribute of Keras or
TensorFlow.

None of this is covered by a compatibility promise, so importing this module
checks the installed versions against the ones the test suite ran on
(`SUPPORTED`) and raises an `ImportError` naming what to install otherwise.
Supporting a new release means running the suite on it, fixing what here
breaks, and widening `SUPPORTED` and the pins in `pyproject.toml` together.
"""

import re

import keras
import tensorflow as tf

# {package: (major, minor)}: the releases the test suite ran on (any patch).
SUPPORTED = {"keras": (3, 15), "tensorflow": (2, 21)}


def _major_minor(version):
    """`(major, minor)` of a version string such as "3.15.1" or "2.21.0rc1", or
    None when it does not start with two numbers."""
    match = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_versions(installed):
    """Raises an ImportError unless every package of `installed`
    (`{package: version string}`) is in its `SUPPORTED` series."""
    wrong = {
        name: version
        for name, version in installed.items()
        if _major_minor(version) != SUPPORTED[name]
    }
    if not wrong:
        return
    series = sorted(SUPPORTED.items())
    needed = " and ".join(f"{name} {major}.{minor}.x" for name, (major, minor) in series)
    found = ", ".join(f"{name} {version}" for name, version in sorted(wrong.items()))
    pins = " ".join(f"'{name}>={major}.{minor},<{major}.{minor + 1}'" for name, (major, minor) in series)
    raise ImportError(
        f"keras_bpq needs {needed} (it relies on private parts of both, listed in "
        f"keras_bpq/_keras_compat.py); found {found}. Install the supported releases "
        f"with: pip install {pins}"
    )


check_versions({"keras": keras.__version__, "tensorflow": tf.__version__})


# -- layers ----------------------------------------------------------------
def flatten_layers(layer, include_self=True):
    """`layer` (if `include_self`) and every layer tracked inside it, recursively."""
    return list(layer._flatten_layers(include_self=include_self))


def own_losses(layer):
    """The `add_loss` terms of `layer` itself from its last call (not its sublayers')."""
    return layer._get_own_losses()


def own_variables(layer):
    """The variables that `Layer.save_own_variables` stores for `layer`, in its
    order (keys "0", "1", ...): trainable, then non-trainable."""
    return layer._trainable_variables + layer._non_trainable_variables


# -- the functional graph --------------------------------------------------
def functional_inputs(network):
    """The structure of a functional model's symbolic inputs, as it was given."""
    return network._inputs_struct


def functional_outputs(network):
    """The structure of a functional model's symbolic outputs, as it was given;
    None for a model that is not functional."""
    return getattr(network, "_outputs_struct", None)


def nodes_in_execution_order(network):
    """The graph nodes (calls of operations) of a functional model, inputs
    first, in the order Keras runs them."""
    by_depth = network._nodes_by_depth
    for depth in sorted(by_depth, reverse=True):
        yield from by_depth[depth]


def producing_node(tensor):
    """The graph node whose call produced the symbolic `tensor`."""
    history = tensor._keras_history
    return history.operation._inbound_nodes[history.node_index]


def producing_operation(tensor):
    """The operation (layer) that produced the symbolic `tensor`, or None for a
    tensor Keras did not make."""
    return getattr(getattr(tensor, "_keras_history", None), "operation", None)


def node_operation(node):
    """The operation (layer) a graph node calls (Keras' `Node.operation`)."""
    return node.operation


def is_input_node(node):
    """Whether a graph node is a model input, which calls nothing (Keras'
    `Node.is_input`)."""
    return node.is_input


def node_inputs(node):
    """The symbolic tensors among a graph node's call arguments, flattened in
    argument order (Keras' `Node.input_tensors`)."""
    return node.input_tensors


def node_outputs(node):
    """The symbolic tensors a graph node's call returned, flattened in order
    (Keras' `Node.outputs`)."""
    return node.outputs


def call_arguments(node, values):
    """`(args, kwargs)` of a graph node's call with its symbolic tensors
    replaced by `values` (`{id(symbolic tensor): value}`)."""
    return node.arguments.fill_in(values)


def symbolic_arguments(node):
    """The positional arguments of a graph node's call, as symbolic tensors."""
    return node.arguments.args


def takes_training(operation):
    """Whether `operation`'s `call` takes a `training` argument."""
    return getattr(operation, "_call_has_training_arg", False)


# Keras operations that `elementwise_kind` names (their classes are not public).
_ELEMENTWISE_OPS = {
    "keras.src.ops.numpy.Add": "add",
    "keras.src.ops.numpy.Subtract": "subtract",
    "keras.src.ops.numpy.Multiply": "multiply",
    "keras.src.ops.numpy.Negative": "negative",
    "keras.src.ops.numpy.Sum": "sum",
    "keras.src.ops.nn.Softplus": "softplus",
}


def elementwise_kind(operation):
    """`"add"`, `"subtract"`, `"multiply"`, `"negative"`, `"sum"` or
    `"softplus"` for the `keras.ops` operation of that name in a functional
    graph (for a `Sum`, `sum_reduction` gives its arguments); None for any
    other operation."""
    return _ELEMENTWISE_OPS.get(f"{type(operation).__module__}.{type(operation).__name__}")


def sum_reduction(operation):
    """`(axis, keepdims)` of a `keras.ops.sum` operation (one that
    `elementwise_kind` names `"sum"`): the list of axes it sums over (None: all
    of them) and whether it keeps them with size 1 (the private
    `keras.src.ops.numpy.Sum`'s `axis` and `keepdims`)."""
    return operation.axis, operation.keepdims


# -- the trainer -----------------------------------------------------------
def loss_tracker(model):
    """The `Mean` metric behind a compiled model's `"loss"` log."""
    return model._loss_tracker


def set_initial_epoch(model, epoch):
    """Makes the running `fit` start at `epoch` (None: at its `initial_epoch`
    argument), as `BackupAndRestore` does after a restore."""
    model._initial_epoch = epoch


def skip_train_batches(model, batches):
    """Makes the running `fit` draw its next `batches` batches (whole
    executions of `steps_per_execution`) from the data without training on
    them, then train as usual. Call it from a callback's `on_train_begin`.

    `fit` has no public way to start mid-epoch. This relies on the order of its
    internals (Keras 3.15, TensorFlow backend): `fit` makes `model.train_function`
    (`make_train_function`) before `callbacks.on_train_begin` and reads the
    attribute anew at every step; it calls it with an iterator over the epoch's
    batches (a `tf.data` or distributed iterator; a plain Python iterator is
    handled too), from which one call draws up to `steps_per_execution` batches;
    it takes what the call returns as the step's logs, and ends the epoch when
    the call raises `StopIteration`. So the function put in place here draws
    the batches without training, returns the metrics so far as the logs, and
    puts Keras' function back once the batches are drawn."""
    if batches > 0:
        model.train_function = _skipping(model, model.train_function, batches)


def _skipping(model, train_function, batches):
    """A train function that draws `batches` batches (whole executions of
    `steps_per_execution`) without training, then puts `train_function` back."""
    remaining = [int(batches)]

    def skip(iterator):
        if remaining[0] <= 0:
            model.train_function = train_function
            return train_function(iterator)
        steps = max(1, int(model.steps_per_execution or 1))
        drawn = 0
        for _ in range(min(steps, remaining[0])):
            if isinstance(iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)):
                if not iterator.get_next_as_optional().has_value():
                    break
            else:
                try:
                    next(iterator)
                except StopIteration:
                    break
            drawn += 1
        if drawn == 0:
            raise StopIteration
        remaining[0] -= drawn
        if remaining[0] <= 0:
            model.train_function = train_function
        try:
            return model.get_metrics_result()
        except ValueError:
            # In a fresh process nothing has been traced yet, so metrics given
            # to `compile(metrics=...)` are not built (without a strategy Keras
            # builds them when it traces the first step), and their
            # `CompileMetrics.result()` raises "Cannot get result() since the
            # metric has not yet been built."
            return {}

    return skip


def backup_metadata_path(callback):
    """The path of a `keras.callbacks.BackupAndRestore`'s training metadata
    file (the epoch to resume at)."""
    return callback._training_metadata_path


# -- XLA -------------------------------------------------------------------
def in_xla_context():
    """Whether the graph being traced will be compiled by XLA (inside a
    `tf.function(jit_compile=True)`, such as Keras' step with
    `jit_compile=True`); False when executing eagerly."""
    if tf.executing_eagerly():
        return False
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


# -- loss scaling ----------------------------------------------------------
def loss_scale(optimizer):
    """The loss scale a `keras.optimizers.LossScaleOptimizer` multiplies the
    loss by now: its `dynamic_scale` variable (halved at every step whose
    scaled gradient overflows, doubled after `dynamic_growth_steps` finite
    ones), or `initial_scale` before it is built."""
    return optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale


# -- tf.distribute ---------------------------------------------------------
def strategy_supports_no_merge_call():
    """Whether the current strategy's replicas synchronise without `merge_call`
    (so a collective may run inside a `tf.cond`)."""
    return tf.__internal__.distribute.strategy_supports_no_merge_call()


def is_multi_worker(strategy):
    """Whether `strategy` is a MultiWorkerMirroredStrategy spanning several workers."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and (
        strategy.extended._in_multi_worker_mode()
    )


class DistributedLoopFixes:
    """Mixin for a `keras.Model` subclass (before `keras.Model` in its bases)
    that works around two Keras 3.15 bugs in its train and test loops, both of
    which also break plain `keras.Model`s:

    * Under `MultiWorkerMirroredStrategy`, Keras reduces every step's logs with
      `strategy.reduce(MEAN, value, axis=0)`, which fails on scalar logs
      (tensorflow/tensorflow#72388): the step returns its logs with shape
      `[1]`, whose mean over axis 0 across replicas is the same global mean.
    * With `steps_per_execution > 1`, Keras runs each step inside a `tf.cond`
      in a `tf.while_loop`; a strategy that synchronises through `merge_call`
      (every strategy on CPUs) then fails with "You must feed a value for
      placeholder tensor" (keras-team/keras#19246). Here the loop body runs
      the step unconditionally and the loop's condition checks that a batch
      is there.

    Elsewhere Keras' own loop runs unchanged.
    """

    def _make_function(self, step_function):
        return _make_function(self, step_function, super()._make_function)


def _make_function(model, step_function, keras_make_function):
    """`model`'s train or test function for `step_function`;
    `keras_make_function` is Keras' own, used where it works."""
    strategy = model.distribute_strategy
    multi_worker = is_multi_worker(strategy)
    step = step_function
    if multi_worker:

        def step(data):
            return tf.nest.map_structure(lambda t: tf.reshape(t, [1]), step_function(data))

    distributed = multi_worker or strategy.num_replicas_in_sync > 1
    if distributed and model.steps_per_execution > 1 and not model.run_eagerly:
        function = _multi_step_function(model, step, multi_worker)
    else:
        function = keras_make_function(step)
    if not multi_worker:
        return function
    return lambda iterator: tf.nest.map_structure(lambda t: tf.reshape(t, []), function(iterator))


def _reduce_logs(strategy, outputs, multi_worker):
    """The mean over replicas of every log (Keras' `reduction="auto"`)."""

    def reduce(value):
        if multi_worker:
            return strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=0)
        if not isinstance(value, tf.distribute.DistributedValues):
            return value
        return tf.reduce_mean(strategy.experimental_local_results(value), axis=0)

    return tf.nest.map_structure(reduce, outputs)


def _multi_step_function(model, step_function, multi_worker):
    """Up to `steps_per_execution` steps per call, each on the next batch."""
    strategy = model.distribute_strategy
    steps = int(model.steps_per_execution)

    def one_step(data):
        outputs = strategy.run(step_function, args=(data,))
        return _reduce_logs(strategy, outputs, multi_worker)

    one_step = model._autoconvert_optionals(
        tf.function(one_step, reduce_retracing=True, jit_compile=model.jit_compile, autograph=False)
    )

    @tf.function(reduce_retracing=True, autograph=False)
    def multi_step(iterator):
        outputs = one_step(iterator.get_next())

        def body(done, outputs, next_inputs):
            outputs = one_step(next_inputs.get_value())
            # Never take a batch past the last step of this call.
            next_inputs = tf.cond(
                done + 1 < steps, iterator.get_next_as_optional, lambda: next_inputs
            )
            return done + 1, outputs, next_inputs

        _, outputs, _ = tf.while_loop(
            lambda done, outputs, next_inputs: tf.logical_and(done < steps, next_inputs.has_value()),
            body,
            [tf.constant(1), outputs, iterator.get_next_as_optional()],
        )
        return outputs

    def function(iterator):
        if not isinstance(iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)):
            for _, data in zip(range(steps), iterator):  # train_on_batch: a list
                outputs = one_step(data)
            return outputs
        try:
            return multi_step(iterator)
        except tf.errors.OutOfRangeError:
            raise StopIteration

    return function
