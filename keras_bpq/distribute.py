"""Keras' train and test loops under `tf.distribute`, with two Keras 3.15 bugs
worked around (both also break plain `keras.Model`s):

* Under `MultiWorkerMirroredStrategy`, Keras reduces every step's logs with
  `strategy.reduce(MEAN, value, axis=0)`, which fails on scalar logs
  (tensorflow/tensorflow#72388): the step returns its logs with shape `[1]`,
  whose mean over axis 0 across replicas is the same global mean.
* With `steps_per_execution > 1`, Keras runs each step inside a `tf.cond` in a
  `tf.while_loop`; a strategy that synchronises through `merge_call` (every
  strategy on CPUs) then fails with "You must feed a value for placeholder
  tensor" (keras-team/keras#19246). Here the loop body runs the step
  unconditionally and the loop's condition checks that a batch is there.
"""

import tensorflow as tf


def is_multi_worker(strategy):
    """Whether `strategy` is a MultiWorkerMirroredStrategy spanning several workers."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and (
        strategy.extended._in_multi_worker_mode()
    )


def make_function(model, step_function, keras_make_function):
    """`model`'s train or test function for `step_function` (see the module doc);
    `keras_make_function` is Keras' own `_make_function`, used where it works."""
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
