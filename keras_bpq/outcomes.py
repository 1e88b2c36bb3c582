"""A node's alternative outcomes, and the model's costs re-evaluated at them.

Local expectations need `Q` at many outcomes of one node for every example:
each one-unit flip of a Bernoulli sample, each class of a categorical.
`UnitEdits` describes such outcomes without materialising them: outcome `a`
of example `b` is a base value with at most one unit changed,

    value[b, a] = base[b] + change[b, a] * e_{unit[b, a]}     (unit -1: unchanged).

Evaluated naively, `batch x A` rows go through the whole forward pass.
`DownstreamEvaluator` (functional models) instead evaluates only the
operations the requested costs need: those that do not depend on the node run
once on the `batch` rows, those that do run on `batch x A` rows, and a `Dense`
layer applied to the outcomes themselves is a rank-one update of its
pre-activation, `a[b] + change[b, a] * W[unit[b, a]]` with `a = base W + bias`
(DESIGN.md §2); a `Dot` of the outcomes with a per-example vector is one
gather per outcome. The learned critics use the same update for their first
layer (`critics.NodeCritic`).

This module reads the Keras functional graph (`_keras_history`, inbound
nodes); it is the only one that does.
"""

import keras
import tensorflow as tf

from keras_bpq import costs as costs_lib


class UnitEdits:
    """Outcomes `[batch, A, *event]` of a node as one-unit edits of a base value.

    Args:
      base: `[batch, units]` float32, the flattened base value.
      unit: `[batch, A]` int32, the unit each outcome changes (-1: none).
      change: `[batch, A]` float32, the change of that unit (0 where unit is -1).
      event_shape: the node's event shape (`prod(event_shape) == units`).
    """

    def __init__(self, base, unit, change, event_shape):
        self.base = base
        self.unit = unit
        self.change = change
        self.event_shape = tuple(event_shape)

    @property
    def shape(self):
        """Static shape of `dense()`: `[batch, A, *event]`."""
        return tf.TensorShape([self.base.shape[0], self.unit.shape[1]] + list(self.event_shape))

    @property
    def num_outcomes(self):
        return self.unit.shape[1]

    def dense(self):
        """The outcomes as a `[batch, A, *event]` tensor."""
        units = self.base.shape[1]
        edits = self.change[..., None] * tf.one_hot(self.unit, units, dtype=self.base.dtype)
        flat = self.base[:, None, :] + edits
        return tf.reshape(flat, [tf.shape(flat)[0], self.num_outcomes] + list(self.event_shape))

    def with_first(self, value):
        """These outcomes preceded by `value` (`[batch, *event]`), which must differ
        from `base` in at most one unit (a node's own sample does)."""
        diff = tf.reshape(tf.cast(value, self.base.dtype), tf.shape(self.base)) - self.base
        unit = tf.argmax(tf.abs(diff), axis=1, output_type=tf.int32)
        change = tf.gather(diff, unit, batch_dims=1)
        unit = tf.where(change != 0, unit, -1)
        return UnitEdits(
            self.base,
            tf.concat([unit[:, None], self.unit], axis=1),
            tf.concat([change[:, None], self.change], axis=1),
            self.event_shape,
        )

    def linear(self, kernel, offset):
        """`[batch, A, out]` values of `x -> x W + bias` at the outcomes, given the
        base's `offset = base W + bias` (`[batch, out]`): rank-one updates."""
        rows = tf.gather(kernel, tf.maximum(self.unit, 0))
        change = tf.cast(self.change, rows.dtype)
        return offset[:, None, :] + change[..., None] * rows

    def contract(self, table):
        """`[batch, A, out]` values of `x -> sum_u x_u table[b, u]` at the outcomes,
        for a per-example `table` `[batch, units, out]`: one gather per outcome."""
        table = tf.convert_to_tensor(table)
        offset = tf.einsum("bu,buo->bo", tf.cast(self.base, table.dtype), table)
        rows = tf.gather(table, tf.maximum(self.unit, 0), batch_dims=1)
        change = tf.cast(self.change, table.dtype)
        return offset[:, None, :] + change[..., None] * rows


def plain_dense(layer):
    """True for a `keras.layers.Dense` whose call is `activation(x W + bias)`."""
    return (
        type(layer) is keras.layers.Dense
        and getattr(layer, "quantization_mode", None) is None
        and layer.built
    )


def plain_dot(layer):
    """True for a `keras.layers.Dot` of two `[batch, units]` inputs over `units`."""
    if type(layer) is not keras.layers.Dot or layer.normalize:
        return False
    axes = layer.axes if isinstance(layer.axes, (list, tuple)) else [layer.axes] * 2
    return all(a in (1, -1) for a in axes)


def dense_at(layer, edits):
    """`[batch, A, units]`: the `Dense` layer applied to every outcome of `edits`."""
    dtype = layer.compute_dtype
    kernel = tf.cast(layer.kernel, dtype)
    offset = tf.matmul(tf.cast(edits.base, dtype), kernel)
    if layer.bias is not None:
        offset = offset + tf.cast(layer.bias, dtype)
    pre = edits.linear(kernel, offset)
    return pre if layer.activation is None else layer.activation(pre)


class _Expanded:
    """A value with an outcome axis: `[batch, A, ...]`."""

    def __init__(self, tensor):
        self.tensor = tensor

    def rows(self):
        """`[batch * A, ...]`."""
        t = self.tensor
        tail = t.shape[2:]
        if tail.is_fully_defined():
            return tf.reshape(t, [-1] + tail.as_list())
        return tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], axis=0))


class Unsupported(Exception):
    """The graph holds something the evaluator cannot handle; re-run instead."""


class DownstreamEvaluator:
    """Costs of a functional network re-evaluated at one node's outcomes.

    Args:
      network: the functional `keras.Model` whose output structure has a
        `"costs"` dict of per-example costs.
      node_class: the stochastic node layer class (calls of it are nodes).
      node: the name of the node whose outcomes are evaluated.
      forced: names of the nodes held at their recorded samples.
      costs: the cost names to evaluate.

    Raises `Unsupported` when the costs need a node that is not forced, an
    operation that holds stochastic nodes inside it, or a cost that is not a
    network output. Operations may have several outputs.
    """

    def __init__(self, network, node_class, node, forced, costs):
        structure = getattr(network, "_outputs_struct", None)
        if not isinstance(structure, dict) or not set(costs) <= set(structure.get("costs", {})):
            raise Unsupported("costs are not outputs of a functional network")
        self._network = network
        self._node_class = node_class
        self._cost_tensors = {c: structure["costs"][c] for c in costs}
        self._node = node
        names = self._node_call_names()
        wanted = set(forced) | {node}
        self._forced_ids = {i: n for i, n in names.items() if n in wanted}
        if node not in self._forced_ids.values():
            raise Unsupported(f"node {node!r} is not a call in the functional graph")
        self._inputs = {id(t): i for i, t in enumerate(network.inputs)}
        self._plan = self._schedule()

    def _ordered_nodes(self):
        by_depth = self._network._nodes_by_depth
        for depth in sorted(by_depth, reverse=True):
            yield from by_depth[depth]

    def _node_call_names(self):
        """`{id(symbolic output): node name}` in the recorder's naming
        (`layer`, `layer@2`, ... in execution order)."""
        calls, names = {}, {}
        for node in self._ordered_nodes():
            op = node.operation
            if node.is_input or not isinstance(op, self._node_class):
                continue
            count = calls[op.name] = calls.get(op.name, 0) + 1
            names[id(node.outputs[0])] = op.name if count == 1 else f"{op.name}@{count}"
        return names

    def _schedule(self):
        """The graph nodes the costs need, in execution order."""
        needed, stack = set(), list(self._cost_tensors.values())
        while stack:
            tensor = stack.pop()
            if id(tensor) in self._forced_ids or id(tensor) in self._inputs:
                continue
            node = tensor._keras_history.operation._inbound_nodes[tensor._keras_history.node_index]
            if id(node) in needed:
                continue
            op = node.operation
            if isinstance(op, self._node_class):
                raise Unsupported(f"the costs need node {op.name!r}, which is not forced")
            if isinstance(op, keras.layers.Layer) and any(
                isinstance(layer, self._node_class) for layer in op._flatten_layers(include_self=False)
            ):
                raise Unsupported(f"layer {op.name!r} holds stochastic nodes")
            needed.add(id(node))
            stack.extend(node.input_tensors)
        return [n for n in self._ordered_nodes() if id(n) in needed]

    def __call__(self, inputs, forced, outcomes, training=True):
        """`{cost: [batch, A]}`.

        Args:
          inputs: the model inputs, `[batch, ...]` each.
          forced: `{name: [batch, *event]}` samples of the forced nodes.
          outcomes: `UnitEdits`, or `[batch, A, *event]` values of the node.
        """
        values = {i: t for i, t in zip(self._inputs, tf.nest.flatten(inputs))}
        num = outcomes.shape[1]
        for tensor_id, name in self._forced_ids.items():
            if name == self._node:
                values[tensor_id] = outcomes if isinstance(outcomes, UnitEdits) else _Expanded(outcomes)
            else:
                values[tensor_id] = forced[name]
        for node in self._plan:
            args = [values[id(t)] for t in node.input_tensors]
            op = node.operation
            if len(args) == 1 and isinstance(args[0], UnitEdits) and _rank_one_ok(op, args[0]):
                results = [_Expanded(dense_at(op, args[0]))]
            elif _dot_ok(op, args):
                edits, other = args if isinstance(args[0], UnitEdits) else args[::-1]
                results = [_Expanded(edits.contract(tf.cast(other, edits.base.dtype)[..., None]))]
            elif any(isinstance(a, (UnitEdits, _Expanded)) for a in args):
                results = _call_on_rows(node, values, num, training)
            else:
                results = tf.nest.flatten(_call(node, values, training))
            for tensor, value in zip(node.outputs, results):
                values[id(tensor)] = value
        return {c: self._per_example(values[id(t)], num) for c, t in self._cost_tensors.items()}

    @staticmethod
    def _per_example(value, num):
        if isinstance(value, UnitEdits):
            value = _Expanded(value.dense())
        if isinstance(value, _Expanded):
            rows = costs_lib.as_per_example(value.rows())
            return tf.reshape(rows, [-1, num])
        per = costs_lib.as_per_example(value)
        return tf.repeat(per[:, None], num, axis=1)


def _rank_one_ok(op, edits):
    return plain_dense(op) and len(edits.event_shape) == 1


def _dot_ok(op, args):
    """A `Dot` of the outcomes with a per-example vector: a gather per outcome."""
    if len(args) != 2 or not plain_dot(op):
        return False
    kinds = [isinstance(a, UnitEdits) and len(a.event_shape) == 1 for a in args]
    plain = [not isinstance(a, (UnitEdits, _Expanded)) for a in args]
    return (kinds[0] and plain[1]) or (kinds[1] and plain[0])


def _call(node, values, training):
    """Runs one functional graph node on `values` (`{id(symbolic): tensor}`)."""
    args, kwargs = node.arguments.fill_in(values)
    if getattr(node.operation, "_call_has_training_arg", False):
        kwargs["training"] = training
    return node.operation(*args, **kwargs)


def _call_on_rows(node, values, num, training):
    """Runs `node` on `batch x A` rows: values with an outcome axis are
    flattened, the others repeated once per outcome. Returns its flat outputs."""
    rows = {}
    for t in node.input_tensors:
        value = values[id(t)]
        if isinstance(value, UnitEdits):
            value = _Expanded(value.dense())
        rows[id(t)] = value.rows() if isinstance(value, _Expanded) else tf.repeat(value, num, axis=0)
    outputs = tf.nest.flatten(_call(node, rows, training))
    return [_Expanded(tf.reshape(out, _split_shape(out, num))) for out in outputs]


def _split_shape(tensor, num):
    """The shape `[batch, num, ...]` of `tensor`'s `[batch * num, ...]` rows."""
    tail = tensor.shape[1:]
    if tail.is_fully_defined():
        return [-1, num] + tail.as_list()
    return tf.concat([[-1, num], tf.shape(tensor)[1:]], axis=0)
