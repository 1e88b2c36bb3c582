"""A node's alternative outcomes, and the model's costs re-evaluated at them.

Local expectations need `Q` at many outcomes of one node for every example:
each one-unit flip of a Bernoulli sample, each class of a categorical, each
other class of one factor of a factorised categorical.
`UnitEdits` describes such outcomes without materialising them: outcome `a`
of example `b` is a base value with at most one unit changed,

    value[b, a] = base[b] + change[b, a] * e_{unit[b, a]}     (unit -1: unchanged),

or, with `E` edits per outcome (a factorised categorical's other class `k`
of factor `i`: `+1` at `(i, k)`, `-1` at the sampled `(i, x_i)`),

    value[b, a] = base[b] + sum_e change[b, a, e] * e_{unit[b, a, e]}.

Evaluated naively, `batch x A` rows go through the whole forward pass.
`DownstreamEvaluator` (functional models) instead evaluates only the
operations the requested costs need: those that do not depend on the node run
once on the `batch` rows, those that do run on `batch x A` rows, and a `Dense`
layer applied to the outcomes themselves is a rank-one update of its
pre-activation, `a[b] + change[b, a] * W[unit[b, a]]` with `a = base W + bias`
(docs/method.md, "Cost routing"); a `Dot` of the outcomes with a per-example vector is one
gather per outcome. The learned critics use the same update for their first
layer (`critics.NodeCritic`, `dense_at`).

Values downstream stay in that form (`Affine`) through linear operations (a
product with or sum of a per-example tensor, a difference of two such values)
up to a sum over their last axis, which then costs `O(batch x A)`:

    sum_j (offset[b, j] + change[b, a] * s[b, j] K[u, j]) = sum_j offset[b, j] + change[b, a] (s K^T)[b, u].

A softplus in such a sum is evaluated on the `[batch, A, out]` rows once,
with one logarithm per chunk of entries (`softplus_sum`); for values that are
one rank-one update and flips of +-1, the exponentials come from tables of
`exp(+-K)` (`Affine.softplus_sum_of_steps`). So a Bernoulli log-likelihood
`sum_j x_j l_j - softplus(l_j)` of a `Dense` decoder's logits `l` costs one
gather, a multiply-add and a product over `[batch, A, pixels]`, and a matmul.

This module reads the Keras functional graph, through the functions of
`keras_bpq._keras_compat`; it is the only one that does.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import keras
import tensorflow as tf

from keras_bpq import _keras_compat
from keras_bpq import costs as costs_lib


class UnitEdits:
    """Outcomes `[batch, A, *event]` of a node as edits of a few units of a base value.

    Args:
      base: `[batch, units]` float32, the flattened base value.
      unit: `[batch, A]` int32, the unit each outcome changes (-1: none); or
        `[batch, A, E]`, the `E` units each outcome changes.
      change: float32 shaped like `unit`, the change of that unit (0 where
        unit is -1).
      event_shape: the node's event shape (`prod(event_shape) == units`).
      ordered: None, or the number of leading outcomes after which outcome
        `ordered + u` edits unit `u`, for every unit in order (`each_unit`):
        `contract` then reads those outcomes' rows of a table as they stand,
        not by a gather.
    """

    def __init__(
        self,
        base: tf.Tensor,
        unit: tf.Tensor,
        change: tf.Tensor,
        event_shape: Sequence[int],
        ordered: Optional[int] = None,
    ) -> None:
        self.base = base
        self.unit = unit
        self.change = change
        self.event_shape = tuple(event_shape)
        self.ordered = ordered
        if ordered is not None and (unit.shape.rank != 2 or unit.shape[1] != ordered + base.shape[1]):
            raise ValueError(
                f"UnitEdits: {ordered} leading outcomes and then one per unit in order need `unit` "
                f"[batch, {ordered} + {base.shape[1]}], not {unit.shape}."
            )

    @classmethod
    def each_unit(cls, base: tf.Tensor, change: tf.Tensor, event_shape: Sequence[int]) -> UnitEdits:
        """Outcome `u` edits unit `u` of `base` by `change[:, u]`, for every
        unit `u` of `base` (`[batch, units]`) in order."""
        unit = tf.tile(tf.range(base.shape[1])[None], [tf.shape(base)[0], 1])
        return cls(base, unit, change, event_shape, ordered=0)

    @property
    def shape(self) -> tf.TensorShape:
        """Static shape of `dense()`: `[batch, A, *event]`."""
        return tf.TensorShape([self.base.shape[0], self.unit.shape[1]] + list(self.event_shape))

    @property
    def num_outcomes(self) -> Optional[int]:
        return self.unit.shape[1]

    @property
    def one_edit(self) -> bool:
        """Whether every outcome changes one unit (`unit` is `[batch, A]`)."""
        return self.unit.shape.rank == 2

    def _edited(self, rows: tf.Tensor) -> tf.Tensor:
        """`sum_e change[b, a, e] rows[b, a, e]` for `rows` gathered at `unit`
        (`[batch, A(, E), out]`): `[batch, A, out]`."""
        edits = tf.cast(self.change, rows.dtype)[..., None] * rows
        return edits if self.one_edit else tf.reduce_sum(edits, axis=2)

    def dense(self) -> tf.Tensor:
        """The outcomes as a `[batch, A, *event]` tensor."""
        units = self.base.shape[1]
        flat = self.base[:, None, :] + self._edited(tf.one_hot(self.unit, units, dtype=self.base.dtype))
        return tf.reshape(flat, [tf.shape(flat)[0], self.num_outcomes] + list(self.event_shape))

    def with_first(self, value: tf.Tensor) -> UnitEdits:
        """These outcomes preceded by `value` (`[batch, *event]`), which must differ
        from `base` in at most one unit (a node's own sample does)."""
        diff = tf.reshape(tf.cast(value, self.base.dtype), tf.shape(self.base)) - self.base
        unit = tf.argmax(tf.abs(diff), axis=1, output_type=tf.int32)
        change = tf.gather(diff, unit, batch_dims=1)
        unit, change = tf.where(change != 0, unit, -1)[:, None], change[:, None]
        if not self.one_edit:  # its other edits change nothing
            padding = [[0, 0], [0, 0], [0, self.unit.shape[2] - 1]]
            unit = tf.pad(unit[..., None], padding, constant_values=-1)
            change = tf.pad(change[..., None], padding)
        return UnitEdits(
            self.base,
            tf.concat([unit, self.unit], axis=1),
            tf.concat([change, self.change], axis=1),
            self.event_shape,
            None if self.ordered is None else self.ordered + 1,
        )

    def linear(self, kernel: tf.Tensor, offset: tf.Tensor) -> tf.Tensor:
        """`[batch, A, out]` values of `x -> x W + bias` at the outcomes, given the
        base's `offset = base W + bias` (`[batch, out]`): rank-one updates (one
        per edit)."""
        return offset[:, None, :] + self._edited(tf.gather(kernel, tf.maximum(self.unit, 0)))

    def contract(self, table: tf.Tensor) -> tf.Tensor:
        """`[batch, A, out]` values of `x -> sum_u x_u table[b, u]` at the outcomes,
        for a per-example `table` `[batch, units, out]`: one gather per edit (for
        `ordered` outcomes, the table's rows themselves)."""
        table = tf.convert_to_tensor(table)
        offset = tf.einsum("bu,buo->bo", tf.cast(self.base, table.dtype), table)
        if self.ordered is None:
            rows = tf.gather(table, tf.maximum(self.unit, 0), batch_dims=1)
        else:  # the ordered outcomes' rows are the table's own
            leading = tf.gather(table, tf.maximum(self.unit[:, : self.ordered], 0), batch_dims=1)
            rows = tf.concat([leading, table], axis=1)
        return offset[:, None, :] + self._edited(rows)


def plain_dense(layer: keras.layers.Layer) -> bool:
    """True for a `keras.layers.Dense` whose call is `activation(x W + bias)`."""
    return (
        type(layer) is keras.layers.Dense
        and getattr(layer, "quantization_mode", None) is None
        and layer.built
    )


def plain_dot(layer: keras.layers.Layer) -> bool:
    """True for a `keras.layers.Dot` of two `[batch, units]` inputs over `units`."""
    if type(layer) is not keras.layers.Dot or layer.normalize:
        return False
    axes = layer.axes if isinstance(layer.axes, (list, tuple)) else [layer.axes] * 2
    return all(a in (1, -1) for a in axes)


def _kernel_and_bias(layer):
    dtype = layer.compute_dtype
    bias = None if layer.bias is None else tf.cast(layer.bias, dtype)
    return tf.cast(layer.kernel, dtype), bias


def dense_at(layer: keras.layers.Dense, edits: UnitEdits, context: Optional[tf.Tensor] = None) -> tf.Tensor:
    """`[batch, A, units]`: the `Dense` layer applied to every outcome of
    `edits`, preceded in its input by the per-example `context` features
    (`[batch, F]`, or None): `act(context W_c + base W_x + bias + change W_x[unit])`."""
    kernel, bias = _kernel_and_bias(layer)
    offset = tf.matmul(tf.cast(edits.base, kernel.dtype), kernel[-edits.base.shape[1]:])
    if context is not None:
        offset += tf.matmul(tf.cast(context, kernel.dtype), kernel[: context.shape[-1]])
    if bias is not None:
        offset += bias
    pre = edits.linear(kernel[-edits.base.shape[1]:], offset)
    return pre if layer.activation in (None, keras.activations.linear) else layer.activation(pre)


def _chunk(width):
    """The largest divisor of `width` up to 16: entries per logarithm."""
    return max(d for d in range(1, 17) if width % d == 0)


def _sum_of_logs(factors, chunk):
    """`sum_j log(factors[..., j])` over the last axis with one logarithm per
    `chunk` entries: `sum_chunks log prod_{j in chunk} factors_j`."""
    width = factors.shape[-1]
    shape = tf.concat([tf.shape(factors)[:-1], [width // chunk, chunk]], axis=0)
    return tf.reduce_sum(tf.math.log(tf.reduce_prod(tf.reshape(factors, shape), axis=-1)), axis=-1)


def softplus_sum(pre: tf.Tensor) -> tf.Tensor:
    """`sum_j softplus(pre[..., j])` over the last axis, as

        sum_j max(pre_j, 0) + sum_chunks log prod_{j in chunk} (1 + exp(-|pre_j|)):

    one logarithm per chunk of up to 16 entries instead of one per entry (each
    factor lies in [1, 2], so a product stays below 2**16); the same value to
    float32 rounding. 16-bit inputs are summed entry by entry."""
    width = pre.shape[-1]
    if pre.dtype not in (tf.float32, tf.float64) or width is None:
        return tf.reduce_sum(tf.nn.softplus(pre), axis=-1)
    factors = 1.0 + tf.exp(-tf.abs(pre))
    return tf.reduce_sum(tf.nn.relu(pre), axis=-1) + _sum_of_logs(factors, _chunk(width))


# A chunk's product of factors within exp(+-|K|) each stays a normal float32
# while chunk * max|K| <= this.
_MAX_CHUNK_EXPONENT = 80.0


def _dense_values(value):
    """An `Affine` materialised; a tensor unchanged."""
    return value.materialize() if isinstance(value, Affine) else value


def _per_row(tensor):
    """A per-example `[batch, out]` tensor broadcast over the outcome axis."""
    return tensor[:, None] if getattr(tensor, "shape", tf.TensorShape([])).rank == 2 else tensor


class Affine:
    """`[batch, A, out]` values affine in the outcomes' one-unit edits, unmaterialised:

        value[b, a] = offset[b] + change[b, a] sum_t s_t[b] K_t[unit[b, a]]
                      + sum_i sign_i softplus(pre_i[b, a]) + dense[b, a]

    `terms` holds the `(K_t, s_t)` (`K_t` None: the identity, the outcomes
    themselves; `s_t` None: 1), `softplus` the `(sign_i, pre_i)`; `offset` is
    `[batch, out]`.
    """

    def __init__(
        self,
        edits: UnitEdits,
        offset: tf.Tensor,
        terms: Sequence[Tuple[Optional[tf.Tensor], Union[None, float, tf.Tensor]]] = (),
        softplus: Sequence[Tuple[float, Union[Affine, tf.Tensor]]] = (),
        dense: Optional[tf.Tensor] = None,
    ) -> None:
        self.edits = edits
        self.offset = offset
        self.terms = tuple(terms)
        self.softplus = tuple(softplus)
        self.dense = dense

    @classmethod
    def of(cls, value: object) -> Optional[Affine]:
        """`value` as an `Affine`, None if it is not one (or a flat `UnitEdits`
        of one edit per outcome)."""
        if isinstance(value, UnitEdits) and len(value.event_shape) == 1 and value.one_edit:
            return cls(value, value.base, [(None, None)])
        return value if isinstance(value, Affine) else None

    @property
    def dtype(self) -> tf.DType:
        return self.offset.dtype

    def dense_layer(self, layer: keras.layers.Dense) -> Union[Affine, _Expanded]:
        """`layer` (a plain `Dense`) at these values: `K_t -> K_t W` while the
        values are linear in the edits; else on the materialised values."""
        kernel, bias = _kernel_and_bias(layer)
        cast = lambda t: tf.cast(t, kernel.dtype)  # noqa: E731
        if self.softplus or self.dense is not None or any(s is not None for _, s in self.terms):
            value = _Expanded(tf.matmul(cast(self.materialize()), kernel) + (0 if bias is None else bias))
        else:
            offset = tf.matmul(cast(self.offset), kernel)
            if bias is not None:
                offset += bias
            terms = [(kernel if k is None else tf.matmul(cast(k), kernel), None) for k, _ in self.terms]
            value = Affine(self.edits, offset, terms)
        if layer.activation in (None, keras.activations.linear):
            return value
        return _Expanded(layer.activation(value.materialize() if isinstance(value, Affine) else value.tensor))

    def scaled(self, factor: Union[float, tf.Tensor]) -> Affine:
        """These values times a per-example tensor or a number."""
        number = isinstance(factor, (int, float))
        lazy = self if number else self._without_softplus()
        terms = [(k, factor if s is None else s * factor) for k, s in lazy.terms]
        softplus = [(sign * factor, pre) for sign, pre in lazy.softplus]
        dense = None if lazy.dense is None else lazy.dense * _per_row(factor)
        return Affine(lazy.edits, lazy.offset * factor, terms, softplus, dense)

    def plus(self, other: Union[Affine, UnitEdits, _Expanded, tf.Tensor], sign: float = 1.0) -> Affine:
        """These values plus `sign` times `other`: an `Affine` of the same
        edits, an `_Expanded` `[batch, A, out]` or a per-example tensor."""
        other_affine = Affine.of(other)
        if other_affine is not None:
            negated = other_affine if sign == 1.0 else other_affine.scaled(sign)
            dense = [d for d in (self.dense, negated.dense) if d is not None]
            return Affine(
                self.edits,
                self.offset + negated.offset,
                self.terms + negated.terms,
                self.softplus + negated.softplus,
                tf.add_n(dense) if dense else None,
            )
        if isinstance(other, _Expanded):
            dense = sign * other.tensor if self.dense is None else self.dense + sign * other.tensor
            return Affine(self.edits, self.offset, self.terms, self.softplus, dense)
        return Affine(self.edits, self.offset + sign * other, self.terms, self.softplus, self.dense)

    def with_softplus(self) -> Affine:
        """`softplus` of these values, kept for a later sum (unmaterialised
        while they are one rank-one update, see `softplus_sum_of_steps`)."""
        pre = self if self._rank_one_kernel() is not None else self.materialize()
        return Affine(self.edits, tf.zeros_like(self.offset), (), [(1.0, pre)])

    def _rank_one_kernel(self):
        """`K` where these values are `offset[b] + change[b, a] K[unit[b, a]]`
        (one term with a constant scale, float32 or float64), else None."""
        if self.softplus or self.dense is not None or len(self.terms) != 1:
            return None
        kernel, scale = self.terms[0]
        if kernel is None or not (scale is None or isinstance(scale, (int, float))):
            return None
        if self.dtype not in (tf.float32, tf.float64) or not kernel.shape.is_fully_defined():
            return None
        return kernel if scale is None else kernel * scale

    def softplus_sum_of_steps(self) -> tf.Tensor:
        """`[batch, A]`: `sum_j softplus(pre[b, a, j])` of these values
        `pre = l[b] + change[b, a] K[unit[b, a]]`, as

            sum_j softplus(l_j) + sum_j log(sigmoid(-l_j) + sigmoid(l_j) exp(change K[u, j])).

        With every change -1, 0 or +1 (one-unit flips of a binary sample, one-hot
        outcomes) the exponentials come from the tables `exp(+-K)`: `2 U`
        rows of exponentials for the `U` units instead of one per value and
        outcome, `batch A`, so the tables serve only where `batch A > 2 U`
        (all of a layer's flips; a few drawn flips, `CriticCV(units=S)`, do not
        pay for them). Each factor lies between 1 and `exp(change K[u, j])`, so
        with one logarithm per chunk of entries the products stay finite while
        `chunk * max|K| <= 80`. Other changes, larger weights or fewer rows
        take `softplus_sum` on the materialised values (a `tf.cond` where the
        batch size is not known when tracing)."""
        edits, kernel = self.edits, self._rank_one_kernel()
        units, width = kernel.shape
        chunk = _chunk(width)
        change = tf.cast(edits.change, self.dtype)
        rows = change.shape[0] * change.shape[1] if change.shape[:2].is_fully_defined() else None
        if rows is not None and rows <= 2 * units:
            return softplus_sum(self.materialize())

        def from_tables():
            logits = self.offset
            tables = tf.concat([tf.exp(kernel), tf.exp(-kernel), tf.ones([1, width], self.dtype)], axis=0)
            row = tf.where(change > 0, edits.unit, tf.where(change < 0, edits.unit + units, 2 * units))
            factors = tf.sigmoid(-logits)[:, None] + tf.sigmoid(logits)[:, None] * tf.gather(tables, row)
            base = tf.reduce_sum(tf.nn.softplus(logits), axis=-1)
            return base[:, None] + _sum_of_logs(factors, chunk)

        def if_bounded():
            bounded = tf.reduce_max(tf.abs(kernel)) * chunk <= _MAX_CHUNK_EXPONENT
            return tf.cond(bounded, from_tables, lambda: softplus_sum(self.materialize()))

        steps_only = tf.reduce_all((change == 0.0) | (tf.abs(change) == 1.0))
        if rows is None:
            steps_only &= tf.shape(change)[0] * tf.shape(change)[1] > 2 * units
        return tf.cond(steps_only, if_bounded, lambda: softplus_sum(self.materialize()))

    def _without_softplus(self):
        if not self.softplus:
            return self
        dense = tf.add_n([sign * tf.nn.softplus(_dense_values(pre)) for sign, pre in self.softplus])
        dense = dense if self.dense is None else dense + self.dense
        return Affine(self.edits, self.offset, self.terms, (), dense)

    def materialize(self) -> tf.Tensor:
        """The `[batch, A, out]` tensor."""
        edits, dtype = self.edits, self.dtype
        value = self.offset[:, None]
        change = tf.cast(edits.change, dtype)[..., None]
        for kernel, scale in self.terms:
            if kernel is None:
                rows = tf.one_hot(edits.unit, edits.base.shape[1], dtype=dtype)
            else:
                rows = tf.gather(kernel, tf.maximum(edits.unit, 0))
            value = value + change * (rows if scale is None else rows * _per_row(scale))
        lazy = self._without_softplus()
        return value if lazy.dense is None else value + lazy.dense

    def sum(self) -> tf.Tensor:
        """`[batch, A]`: the sum over the last axis (a term with a per-example
        scale `s`: `(s K^T)[b, u]` from one matmul over the units, or from the
        outcomes' own rows of `K` where they are fewer than the units)."""
        edits = self.edits
        unit = tf.maximum(edits.unit, 0)
        total = tf.reduce_sum(self.offset, axis=-1)[:, None]
        change = tf.cast(edits.change, self.dtype)
        for kernel, scale in self.terms:
            if scale is not None:
                scale = tf.broadcast_to(tf.cast(scale, self.dtype), tf.shape(self.offset))
            if kernel is None:
                picked = 1.0 if scale is None else tf.gather(scale, unit, batch_dims=1)
            elif scale is None:
                picked = tf.gather(tf.reduce_sum(kernel, axis=-1), unit)
            elif unit.shape[1] is not None and unit.shape[1] < kernel.shape[0]:
                # Fewer outcomes than units: `batch x A` kernel rows, not a
                # product of the scale with every unit's.
                picked = tf.reduce_sum(tf.gather(kernel, unit) * scale[:, None, :], axis=-1)
            else:
                picked = tf.gather(tf.matmul(scale, kernel, transpose_b=True), unit, batch_dims=1)
            total += change * picked
        for sign, pre in self.softplus:
            total += sign * (pre.softplus_sum_of_steps() if isinstance(pre, Affine) else softplus_sum(pre))
        if self.dense is not None:
            total += tf.reduce_sum(self.dense, axis=-1)
        return total


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
      redrawn: names of later nodes drawn again at every outcome from their
        recorded noise `u` (`sample_from_noise`, `[u < sigmoid(logits)]` for
        a Bernoulli node): the costs at an outcome are then those of one pass
        with the same random numbers (`estimators.CriticCV`'s `common_noise`).

    Its `plan` lists the nodes of the functional graph that the costs need, in
    execution order: only those are evaluated.

    Raises `Unsupported` when the costs need a node that is neither forced nor
    redrawn, an operation that holds stochastic nodes inside it, or a cost that
    is not a network output. Operations may have several outputs.
    """

    def __init__(
        self,
        network: keras.Model,
        node_class: Type[keras.layers.Layer],
        node: str,
        forced: Sequence[str],
        costs: Sequence[str],
        redrawn: Sequence[str] = (),
    ) -> None:
        structure = _keras_compat.functional_outputs(network)
        if not isinstance(structure, dict) or not set(costs) <= set(structure.get("costs", {})):
            raise Unsupported("costs are not outputs of a functional network")
        self._network = network
        self._node_class = node_class
        self._cost_tensors = {c: structure["costs"][c] for c in costs}
        self._node = node
        names = self._node_call_names()
        wanted = set(forced) | {node}
        self._forced_ids = {i: n for i, n in names.items() if n in wanted}
        self._redrawn_ids = {i: n for i, n in names.items() if n in set(redrawn)}
        if node not in self._forced_ids.values():
            raise Unsupported(f"node {node!r} is not a call in the functional graph")
        self._inputs = {id(t): i for i, t in enumerate(network.inputs)}
        self.plan = self._schedule()

    def _node_call_names(self):
        """`{id(symbolic output): node name}` in the recorder's naming
        (`layer`, `layer@2`, ... in execution order)."""
        calls, names = {}, {}
        for node in _keras_compat.nodes_in_execution_order(self._network):
            op = _keras_compat.node_operation(node)
            if _keras_compat.is_input_node(node) or not isinstance(op, self._node_class):
                continue
            count = calls[op.name] = calls.get(op.name, 0) + 1
            names[id(_keras_compat.node_outputs(node)[0])] = op.name if count == 1 else f"{op.name}@{count}"
        return names

    def _schedule(self):
        """The graph nodes the costs need, in execution order."""
        needed, stack = set(), list(self._cost_tensors.values())
        while stack:
            tensor = stack.pop()
            if id(tensor) in self._forced_ids or id(tensor) in self._inputs:
                continue
            node = _keras_compat.producing_node(tensor)
            if id(node) in needed:
                continue
            op = _keras_compat.node_operation(node)
            if isinstance(op, self._node_class) and id(tensor) not in self._redrawn_ids:
                raise Unsupported(f"the costs need node {op.name!r}, which is neither forced nor redrawn")
            if isinstance(op, keras.layers.Layer) and any(
                isinstance(layer, self._node_class)
                for layer in _keras_compat.flatten_layers(op, include_self=False)
            ):
                raise Unsupported(f"layer {op.name!r} holds stochastic nodes")
            needed.add(id(node))
            stack.extend(_keras_compat.node_inputs(node))
        return [n for n in _keras_compat.nodes_in_execution_order(self._network) if id(n) in needed]

    def __call__(self, inputs, forced, outcomes, training=True, noise=None):
        """`{cost: [batch, A]}`.

        Args:
          inputs: the model inputs, `[batch, ...]` each.
          forced: `{name: [batch, *event]}` samples of the forced nodes.
          outcomes: `UnitEdits`, or `[batch, A, *event]` values of the node.
          noise: `{name: [batch, *event]}` uniform noise of the redrawn nodes.
        """
        values = {i: t for i, t in zip(self._inputs, tf.nest.flatten(inputs))}
        num = outcomes.shape[1]
        for tensor_id, name in self._forced_ids.items():
            if name == self._node:
                values[tensor_id] = outcomes if isinstance(outcomes, UnitEdits) else _Expanded(outcomes)
            else:
                values[tensor_id] = forced[name]
        for node in self.plan:
            args = [values[id(t)] for t in _keras_compat.node_inputs(node)]
            op = _keras_compat.node_operation(node)
            redrawn = self._redrawn_ids.get(id(_keras_compat.node_outputs(node)[0]))
            if redrawn is not None:
                results = [_redraw(op, args[0], noise[redrawn])]
            elif _dot_ok(op, args):
                edits, other = args if isinstance(args[0], UnitEdits) else args[::-1]
                results = [_Expanded(edits.contract(tf.cast(other, edits.base.dtype)[..., None]))]
            elif any(isinstance(a, (UnitEdits, Affine, _Expanded)) for a in args):
                result = _affine_op(node, values)
                results = [result] if result is not None else call_on_rows(node, values, num, training)
            else:
                results = tf.nest.flatten(_call(node, values, training))
            for tensor, value in zip(_keras_compat.node_outputs(node), results):
                values[id(tensor)] = value
        return {c: self._per_example(values[id(t)], num) for c, t in self._cost_tensors.items()}

    @staticmethod
    def _per_example(value, num):
        value = _as_tensor(value)
        if isinstance(value, _Expanded):
            rows = costs_lib.as_per_example(value.rows())
            return tf.reshape(rows, [-1, num])
        per = costs_lib.as_per_example(value)
        return tf.repeat(per[:, None], num, axis=1)


def _redraw(node_layer, params, noise):
    """A node's sample drawn from its recorded `noise` (`[batch, *event]`) at
    parameters `params`: `[batch, A, *event]` (`_Expanded`) where they vary with
    the outcomes, else `[batch, *event]`."""
    params = _as_tensor(params)
    if isinstance(params, _Expanded):
        sample = node_layer.sample_from_noise(params.tensor, noise[:, None])
        return _Expanded(tf.cast(sample, node_layer.compute_dtype))
    return tf.cast(node_layer.sample_from_noise(params, noise), node_layer.compute_dtype)


def _affine_op(node, values):
    """`node`'s output from `Affine` inputs without materialising them: a plain
    `Dense`, a sum over the last axis, a softplus, a product with a per-example
    tensor or a number, sums and differences. None where none of these applies
    (the caller runs the node on `batch x A` rows)."""
    op = _keras_compat.node_operation(node)
    outputs = _keras_compat.node_outputs(node)
    args, kwargs = _keras_compat.call_arguments(node, values)
    symbolic = _keras_compat.symbolic_arguments(node)
    lazy = [Affine.of(a) for a in args]
    if kwargs or len(outputs) != 1 or all(a is None for a in lazy):
        return None
    if plain_dense(op):
        return lazy[0].dense_layer(op) if len(args) == 1 else None
    kind = _keras_compat.elementwise_kind(op)
    if kind in ("negative", "softplus", "sum") and len(args) != 1:
        return None
    if kind == "negative":
        return lazy[0].scaled(-1.0)
    if kind == "softplus":
        return lazy[0].with_softplus()
    if kind == "sum":
        axis, keepdims = _keras_compat.sum_reduction(op)
        if len(_keras_compat.node_inputs(node)[0].shape) != 2 or tuple(axis or ()) not in ((-1,), (1,)):
            return None
        total = lazy[0].sum()
        return _Expanded(total[..., None] if keepdims else total)
    if kind is None or len(args) != 2 or len(outputs[0].shape) != 2:
        return None
    dtype = next(a for a in lazy if a is not None).dtype
    if not all(a is not None or _operand_ok(s, v, dtype, kind) for a, s, v in zip(lazy, symbolic, args)):
        return None
    (first, second), (value_1, value_2) = lazy, args
    if kind == "multiply":
        if first is not None and second is not None:
            return None
        return first.scaled(value_2) if first is not None else second.scaled(value_1)
    sign = 1.0 if kind == "add" else -1.0
    if first is not None:
        return first.plus(value_2, sign)
    return (second if sign == 1.0 else second.scaled(-1.0)).plus(value_1)


def _operand_ok(symbolic, value, dtype, kind):
    """Whether `value` (not an `Affine`) combines with `[batch, out]` affine
    values by broadcasting as its symbolic tensor does: a number, a
    `[batch or 1, out or 1]` or a static `[out]` tensor of `dtype`, or (for a
    sum or difference) an `_Expanded` `[batch, A, out]`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    if isinstance(value, _Expanded):
        return kind != "multiply" and value.tensor.shape.rank == 3 and value.tensor.dtype == dtype
    if not tf.is_tensor(value) or value.dtype != dtype:
        return False
    shape = symbolic.shape
    return len(shape) == 2 or len(shape) == 0 or (len(shape) == 1 and shape[0] is not None)


def _as_tensor(value):
    """`UnitEdits` and `Affine` values as `_Expanded`; others unchanged."""
    if isinstance(value, UnitEdits):
        return _Expanded(value.dense())
    if isinstance(value, Affine):
        return _Expanded(value.materialize())
    return value


def _dot_ok(op, args):
    """A `Dot` of the outcomes with a per-example vector: a gather per outcome."""
    if len(args) != 2 or not plain_dot(op):
        return False
    kinds = [isinstance(a, UnitEdits) and len(a.event_shape) == 1 for a in args]
    plain = [not isinstance(a, (UnitEdits, _Expanded)) for a in args]
    return (kinds[0] and plain[1]) or (kinds[1] and plain[0])


def _call(node, values, training):
    """Runs one functional graph node on `values` (`{id(symbolic): tensor}`)."""
    args, kwargs = _keras_compat.call_arguments(node, values)
    op = _keras_compat.node_operation(node)
    if _keras_compat.takes_training(op):
        kwargs["training"] = training
    return op(*args, **kwargs)


def call_on_rows(node: Any, values: Dict[int, Any], num: int, training: Optional[bool]) -> List[_Expanded]:
    """Runs `node` on `batch x A` rows: values with an outcome axis are
    flattened, the others repeated once per outcome. Returns its flat outputs."""
    rows = {}
    for t in _keras_compat.node_inputs(node):
        value = _as_tensor(values[id(t)])
        rows[id(t)] = value.rows() if isinstance(value, _Expanded) else tf.repeat(value, num, axis=0)
    outputs = tf.nest.flatten(_call(node, rows, training))
    return [_Expanded(tf.reshape(out, _split_shape(out, num))) for out in outputs]


def _split_shape(tensor, num):
    """The shape `[batch, num, ...]` of `tensor`'s `[batch * num, ...]` rows."""
    tail = tensor.shape[1:]
    if tail.is_fully_defined():
        return [-1, num] + tail.as_list()
    return tf.concat([[-1, num], tf.shape(tensor)[1:]], axis=0)
