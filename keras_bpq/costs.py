"""Per-example costs: named intermediate costs and compiled losses.

The objective of a `BackpropQModel` is `J = E[sum_c c]`, the batch mean of every
example's total cost. Costs come from two places:

* `add_cost(name, tensor)` inside a model's `call` (or `costs={...}` of the
  functional constructor): any per-example tensor of shape `[batch]`;
* `compile(loss=...)`: each output's loss, reduced per example (the mean over
  the non-batch axes), never over the batch.
"""

import keras
import tensorflow as tf

from keras_bpq import graph


def add_cost(name, value):
    """Adds a named per-example cost (shape `[batch]`) to the model's objective.

    Call it inside the `call()` of a `BackpropQModel` subclass. Outside a
    `BackpropQModel` forward pass (for example in `predict`) it does nothing.
    Returns `value`, so it can be used inline.
    """
    recorder = graph.current_recorder()
    if recorder is not None:
        recorder.add_cost(str(name), value)
    return value


def check_per_example(name, shape):
    """Raises a clear error unless a cost's static shape is `[batch]` or `[batch, 1]`."""
    shape = tuple(shape)
    if len(shape) == 1 or (len(shape) == 2 and shape[1] == 1):
        return
    raise ValueError(
        f"Cost {name!r} has shape {shape}, but a cost must be per-example: shape "
        "[batch] (or [batch, 1]). Reduce it over the non-batch axes only, e.g. "
        "keras.ops.sum(x, axis=-1); do not average over the batch (the model does)."
    )


def as_per_example(value):
    """Casts a checked cost to float32 of shape `[batch]`."""
    value = tf.cast(value, tf.float32)
    if value.shape.rank == 2:
        value = value[:, 0]
    return value


def weighted_mean(value, sample_weight):
    """The batch mean of a per-example `value` `[batch]` weighted by Keras'
    `sample_weight` (`[batch]`, or None for weight 1):

        mean = (1 / batch) * sum_b w_b * value_b.

    As in Keras' losses, the sum is divided by the batch size, not by the sum
    of the weights. This is the objective `J` that `BackpropQModel` minimises.
    """
    if sample_weight is None:
        return tf.reduce_mean(value)
    weight = tf.reshape(tf.cast(sample_weight, value.dtype), [-1])
    return tf.reduce_sum(value * weight) / tf.cast(tf.shape(value)[0], value.dtype)


class CompiledLosses:
    """`compile(loss=...)` turned into named per-example costs.

    `loss` is a loss name, function or `keras.losses.Loss` for a single output,
    or a list (aligned with the outputs) or dict (by output key) of those.
    Cost names: `"output_loss"` for a single output, else `"<key>_loss"`.
    """

    def __init__(self, loss):
        self.config = loss
        if loss is None:
            self.entries = []
        elif isinstance(loss, dict):
            self.entries = [(f"{k}_loss", k, keras.losses.get(v)) for k, v in loss.items()]
        elif isinstance(loss, (list, tuple)):
            self.entries = [
                (f"output_{i}_loss", i, keras.losses.get(v)) for i, v in enumerate(loss)
            ]
        else:
            self.entries = [("output_loss", None, keras.losses.get(loss))]

    @property
    def names(self):
        return tuple(name for name, _, _ in self.entries)

    def per_example(self, fn, y_true, y_pred):
        if isinstance(fn, keras.losses.Loss):
            value = fn.call(y_true, y_pred)
        else:
            value = fn(y_true, y_pred)
        value = tf.cast(value, tf.float32)
        if value.shape.rank is not None and value.shape.rank > 1:
            value = tf.reduce_mean(value, axis=list(range(1, value.shape.rank)))
        return value

    def __call__(self, y_true, y_pred):
        """`{cost_name: [batch] tensor}` for the given targets and outputs."""
        costs = {}
        for name, key, fn in self.entries:
            if key is None:
                costs[name] = self.per_example(fn, y_true, y_pred)
            else:
                costs[name] = self.per_example(fn, y_true[key], y_pred[key])
        return costs

    def dependencies(self, y_pred):
        """`{cost_name: output tensor}`: each compiled cost depends on its output."""
        return {
            name: (y_pred if key is None else y_pred[key]) for name, key, _ in self.entries
        }
