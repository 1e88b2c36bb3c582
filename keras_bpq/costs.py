"""Per-example costs: named intermediate costs and compiled losses.

The objective of a `BackpropQModel` is `J = E[sum_c c]`, the batch mean of every
example's total cost. Costs come from two places:

* `add_cost(name, tensor)` inside a model's `call` (or `costs={...}` of the
  functional constructor): any per-example tensor of shape `[batch]`;
* `compile(loss=...)`: each output's loss, reduced per example (the mean over
  the non-batch axes), never over the batch.

Every cost is logged under its own name, next to `loss` (the total objective)
and each node's critic metrics, so a cost name must be unique among all of
them: `check_names` refuses any name that another term would also take.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import keras
import tensorflow as tf

from keras_bpq import graph


# The critic metrics every node may log, as `<node>_<kind>`.
NODE_METRIC_KINDS = ("critic_loss", "td_error", "q")


def node_metric_names(node: str) -> Tuple[str, ...]:
    """The names of node `node`'s critic metrics."""
    return tuple(f"{node}_{kind}" for kind in NODE_METRIC_KINDS)


def check_name(name: object, origin: str) -> None:
    """Raises a ValueError unless `name` may name a cost on its own.

    `loss` is the total objective in every log and History, and Keras prefixes
    validation logs with `val_`, so neither may name a cost. `origin` says
    where the cost comes from, for the message.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"Cost names must be non-empty strings; {origin} gave {name!r}.")
    if name == "loss":
        raise ValueError(
            f"Cost 'loss' ({origin}): 'loss' is reserved for the total objective "
            "(the sum of every cost) in the logs and the History. Rename the cost, "
            "e.g. to 'loss_term'."
        )
    if name.startswith("val_"):
        raise ValueError(
            f"Cost {name!r} ({origin}): names starting with 'val_' are reserved for "
            f"Keras' validation logs. Rename the cost, e.g. to {name[4:] + '_val'!r}."
        )


def check_names(
    user_costs: Mapping[str, str], compiled_names: Sequence[str], node_names: Iterable[str]
) -> None:
    """Raises a ValueError for a cost whose name another term also takes.

    Args:
      user_costs: `{name: origin}` of the costs added with `add_cost` or the
        constructor's `costs=`.
      compiled_names: the names `compile(loss=...)` gives its costs.
      node_names: the stochastic nodes, whose critic metrics are logged as
        `<node>_critic_loss`, `<node>_td_error` and `<node>_q`.
    """
    metric_owner = {m: n for n in node_names for m in node_metric_names(n)}
    for name, origin in user_costs.items():
        check_name(name, origin)
        if name in compiled_names:
            raise ValueError(
                f"Cost {name!r} ({origin}) has the name that compile(loss=...) gives "
                "the loss of an output, so one would replace the other. Rename the "
                f"cost, e.g. to {name + '_cost'!r}."
            )
        if name in metric_owner:
            raise ValueError(
                f"Cost {name!r} ({origin}) has the name of a metric of node "
                f"{metric_owner[name]!r} (its critic's {name[len(metric_owner[name]) + 1:]}). "
                f"Rename the cost, e.g. to {name + '_cost'!r}."
            )
    for name in compiled_names:
        if name in metric_owner:
            raise ValueError(
                f"compile(loss=...) names the loss of an output {name!r}, the name of a "
                f"metric of node {metric_owner[name]!r}. Rename the output or the node."
            )


def constructor_network(
    name: str, inputs: Any, outputs: Any, costs: Optional[Mapping[str, Any]] = None
) -> keras.Model:
    """The network of `BackpropQModel(inputs, outputs, costs)` named `name`: a
    functional `keras.Model` from `inputs` to `{"outputs": outputs, "costs":
    costs}` (`call_network` runs it)."""
    if inputs is None:
        raise ValueError("BackpropQModel(costs=...) needs inputs= and outputs= too.")
    if outputs is None:
        raise ValueError("BackpropQModel(inputs=...) also needs outputs=.")
    structure = {"outputs": outputs}
    if costs:
        for cost in costs:
            check_name(cost, "costs= of the constructor")
        structure["costs"] = dict(costs)
    return keras.Model(inputs=inputs, outputs=structure, name=name)


def call_network(network: Optional[keras.Model], inputs: Any, training: Optional[bool]) -> Any:
    """Runs a `constructor_network` on `inputs`: gives its outputs and adds its
    costs to the recorder that records the pass, if any."""
    if network is None:
        raise NotImplementedError(
            "Subclass BackpropQModel and define call(), or pass inputs=, outputs= "
            "and costs= to the constructor."
        )
    result = network(inputs, training=training)
    recorder = graph.current_recorder()
    if recorder is not None:
        for name, value in result.get("costs", {}).items():
            recorder.add_cost(name, value, origin="costs= of the constructor")
    return result["outputs"]


def add_cost(name: str, value: tf.Tensor) -> tf.Tensor:
    """Adds a named per-example cost (shape `[batch]`) to the model's objective.

    Call it inside the `call()` of a `BackpropQModel` subclass. Outside a
    `BackpropQModel` forward pass (for example in `predict`) it does nothing.
    Returns `value`, so it can be used inline.
    """
    recorder = graph.current_recorder()
    if recorder is not None:
        name = str(name)
        check_name(name, "keras_bpq.add_cost")
        recorder.add_cost(name, value, origin="keras_bpq.add_cost")
    return value


def check_per_example(name: str, shape: Union[tf.TensorShape, Sequence[Optional[int]]]) -> None:
    """Raises a clear error unless a cost's static shape is `[batch]` or `[batch, 1]`."""
    shape = tuple(shape)
    if len(shape) == 1 or (len(shape) == 2 and shape[1] == 1):
        return
    raise ValueError(
        f"Cost {name!r} has shape {shape}, but a cost must be per-example: shape "
        "[batch] (or [batch, 1]). Reduce it over the non-batch axes only, e.g. "
        "keras.ops.sum(x, axis=-1); do not average over the batch (the model does)."
    )


def as_per_example(value: tf.Tensor) -> tf.Tensor:
    """Casts a checked cost to float32 of shape `[batch]`."""
    value = tf.cast(value, tf.float32)
    if value.shape.rank == 2:
        value = value[:, 0]
    return value


def weighted_mean(value: tf.Tensor, sample_weight: Optional[tf.Tensor]) -> tf.Tensor:
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

    def __init__(self, loss: Any) -> None:
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
    def names(self) -> Tuple[str, ...]:
        return tuple(name for name, _, _ in self.entries)

    def per_example(self, fn: Callable, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
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

    def dependencies(self, y_pred: Any) -> Dict[str, tf.Tensor]:
        """`{cost_name: output tensor}`: each compiled cost depends on its output."""
        return {
            name: (y_pred if key is None else y_pred[key]) for name, key, _ in self.entries
        }


def weight_penalties(variables: Iterable[tf.Variable]) -> List[tf.Tensor]:
    """The penalties of the variables' Keras weight regularisers."""
    return [v.regularizer(v) for v in variables if getattr(v, "regularizer", None) is not None]


def sum_losses(losses: Sequence[tf.Tensor]) -> tf.Tensor:
    """The scalar float32 sum of `losses` (0 for none)."""
    if not losses:
        return tf.constant(0.0)
    return tf.add_n([tf.cast(loss, tf.float32) for loss in losses])


def metric_results(
    model_name: str,
    metrics: Iterable[keras.metrics.Metric],
    loss_tracker: keras.metrics.Metric,
    cost_metrics: Sequence[keras.metrics.Metric],
) -> Dict[str, Any]:
    """`{name: value}` of every metric's result (`keras.Model.get_metrics_result`),
    a ValueError for two terms logged under one name (Keras would keep only the
    last one's value). `loss_tracker` is the total objective's metric and
    `cost_metrics` the costs'."""
    results, owners = {}, {}
    cost_ids = {id(m) for m in cost_metrics}
    for metric in metrics:
        result = metric.result()
        if isinstance(result, dict):
            items, owner = result.items(), "compile(metrics=...)"
        else:
            items = [(metric.name, result)]
            owner = (
                "the total objective" if metric is loss_tracker
                else "a cost" if id(metric) in cost_ids
                else f"metric {metric.name!r}"
            )
        for name, value in items:
            if name in results:
                raise ValueError(
                    f"Model {model_name!r} logs two values under the name {name!r}: "
                    f"{owners[name]} and {owner}. Rename the cost or metric."
                )
            results[name], owners[name] = value, owner
    return results
