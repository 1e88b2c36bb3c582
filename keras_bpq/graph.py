"""Discovery of the stochastic computation graph (SCG) behind a model's forward pass.

A `Recorder` is opened around a forward pass. Every stochastic node layer appends
what it sampled (`NodeRecord`), and `keras_bpq.add_cost` appends named per-example
costs. Traced once into a graph, the recorded tensors are walked backwards through
`tensor.op.inputs` to find, for every cost, the samples it depends on. Those walks
give the structure that the estimators need (docs/method.md, "Contexts"):

* `C_X`, the costs a node `X` influences (through any path);
* the node's stochastic parents (samples reached from its parameters without
  passing through another sample) and ancestors;
* for every cost, its stochastic ancestors in execution order;
* the node's context: the model inputs plus the earlier samples that are
  ancestors of the costs in `C_X`. That context determines the node's parents
  (R1) and every later value (R2), so a critic on it is exact by construction.

The structure is plain Python (names and shapes), cached per input signature.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING, AbstractSet, Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import tensorflow as tf

if TYPE_CHECKING:
    from keras_bpq.nodes import StochasticNode

_STACK = threading.local()


@dataclasses.dataclass(frozen=True)
class NodeRecord:
    """What one call of a stochastic node produced inside a `Recorder`
    (immutable: a pass with other samples makes new records,
    `dataclasses.replace`)."""

    name: str
    layer: StochasticNode
    sample: tf.Tensor
    params: tf.Tensor
    mask: Optional[tf.Tensor] = None
    raw_sample: Optional[tf.Tensor] = None  # the sample before any stop-gradient
    # The uniform noise `u` of a drawn Bernoulli sample `[u < sigmoid(logits)]`
    # (None where the sample was forced, is a mode, or the node keeps none).
    noise: Optional[tf.Tensor] = None
    # `[batch, *event]` float32, stop-gradient: the slope of the pass's total
    # cost in the sample read as a real vector, for the nodes `forward.record`
    # was asked for (`slopes`); None for the others.
    slope: Optional[tf.Tensor] = None

    def log_prob(self) -> tf.Tensor:
        """Per-example `log p(sample | params)`, summed over the event axes."""
        return self.layer.log_prob(self.sample, self.params, self.mask)

    def redraw(self, seed: tf.Tensor) -> tf.Tensor:
        """A fresh sample `[batch, *event]` from the recorded parameters (and
        mask), drawn with the int32 stateless `seed` (`[2]`); stop-gradient."""
        dist = self.layer.distribution(self.params, self.mask)
        value = self.layer.finish_sample(self.layer.draw(dist, seed), self.mask)
        return tf.stop_gradient(tf.cast(value, self.sample.dtype))

    def support_log_probs(self, support: Any) -> Tuple[tf.Tensor, tf.Tensor]:
        """`(values, log_probs)` at every outcome of `support` (`[S, *event]`):
        `values` `[batch, S, *event]` (the support per example) and
        `log_probs` `[batch, S]`, `log p(value | params)` of each example's
        parameters (and mask)."""
        support = tf.convert_to_tensor(support, tf.float32)
        num = support.shape[0]
        batch = tf.shape(self.params)[0]
        values = tf.tile(support[None], [batch] + [1] * len(support.shape))

        def repeat(t):
            return tf.repeat(t, num, axis=0)

        log_probs = self.layer.log_prob(
            tf.reshape(values, [-1] + support.shape[1:].as_list()),
            repeat(self.params),
            None if self.mask is None else repeat(self.mask),
        )
        return values, tf.reshape(log_probs, [batch, num])


class Recorder:
    """Collects node samples and named costs of one forward pass.

    Args:
      forced: `{node_name: tensor}` samples to use instead of drawing (without
        gradient unless the node is named in `keep_gradient`).
      keep_gradient: names of nodes whose samples keep their reparameterisation
        gradient. Every other sample is a stop-gradient.
      seeds: optional integer seeds, one per example (`[batch]`). Nodes then
        draw each example's sample with a stateless seed derived from that
        example's seed and the node call's position in the pass, instead of
        from their `SeedGenerator`: the same inputs and seeds give the same
        samples, whatever else is in the batch.
      most_likely: nodes return their most likely value (mode or mean, as
        outside a recorder with `training=False`) instead of sampling.
      noise: `{node_name: u}` uniform noise that Bernoulli nodes draw their
        samples from, `[u < sigmoid(logits)]`, instead of fresh noise: the
        common random numbers of `estimators.CriticCV(common_noise=True)`.
      slope_tape: a `tf.GradientTape` that watches the samples of the
        nodes in `slope_nodes` as they return them (kept by name in
        `watched`), so that the costs' slopes in them can be taken
        (`forward.record`).
      slope_nodes: the names of those nodes.
    """

    def __init__(
        self,
        forced: Optional[Mapping[str, tf.Tensor]] = None,
        keep_gradient: Iterable[str] = (),
        seeds: Optional[tf.Tensor] = None,
        most_likely: bool = False,
        noise: Optional[Mapping[str, tf.Tensor]] = None,
        slope_tape: Optional[tf.GradientTape] = None,
        slope_nodes: AbstractSet[str] = frozenset(),
    ) -> None:
        self.forced = dict(forced or {})
        self.slope_tape = slope_tape
        self.slope_nodes = frozenset(slope_nodes)
        self.watched = {}
        self.noise = dict(noise or {})
        self.keep_gradient = frozenset(keep_gradient)
        self.seeds = seeds
        self.most_likely = bool(most_likely)
        self.nodes = []
        self.costs = {}
        self.origins = {}  # cost name -> where it was added, for errors
        self._calls = {}

    def __enter__(self):
        stack = getattr(_STACK, "recorders", None)
        if stack is None:
            stack = _STACK.recorders = []
        stack.append(self)
        return self

    def __exit__(self, *exc):
        _STACK.recorders.pop()
        return False

    def next_node_name(self, layer: StochasticNode) -> str:
        """Unique name of this call of `layer`: its name, then `name@2`, ...."""
        count = self._calls.get(layer.name, 0) + 1
        self._calls[layer.name] = count
        return layer.name if count == 1 else f"{layer.name}@{count}"

    def add_node(self, record: NodeRecord) -> None:
        self.nodes.append(record)

    def watch(self, name: str, sample: tf.Tensor) -> None:
        """Watches node `name`'s returned `sample` if its slope is asked for."""
        if name in self.slope_nodes:
            self.slope_tape.watch(sample)
            self.watched[name] = sample

    def add_cost(self, name: str, value: tf.Tensor, origin: str = "keras_bpq.add_cost") -> None:
        """Records cost `name`; `origin` says where it comes from (for errors)."""
        if name in self.costs:
            first = self.origins[name]
            by = f"by {first}" + ("" if first == origin else f" and by {origin}")
            raise ValueError(
                f"Cost {name!r} was added twice in one forward pass ({by}), so one "
                "would hide the other. Give every cost its own name."
            )
        self.costs[name] = value
        self.origins[name] = origin


def current_recorder() -> Optional[Recorder]:
    """The innermost open `Recorder`, or None outside any."""
    stack = getattr(_STACK, "recorders", None)
    return stack[-1] if stack else None


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """Static description of one stochastic node of the SCG."""

    name: str
    layer_name: str
    distribution: str
    event_shape: Tuple[int, ...]
    reparameterized: bool
    support_size: Optional[int]  # int for finite supports, None otherwise
    factorized_units: int  # independent units in a sample (a categorical's choices: 1, or its factors)
    local_kind: Optional[str]  # "binary", "categorical" or None (see nodes.StochasticNode)
    parents: Tuple[str, ...]
    ancestors: Tuple[str, ...]
    costs: Tuple[str, ...]  # C_X, in cost order
    context: Tuple[str, ...]  # "inputs" and names of earlier samples


@dataclasses.dataclass(frozen=True)
class SCG:
    """The stochastic computation graph of a model, in execution order."""

    nodes: Tuple[NodeInfo, ...]
    costs: Tuple[str, ...]
    cost_ancestors: Dict[str, Tuple[str, ...]]  # cost name -> node names in execution order
    costs_using_inputs: Tuple[str, ...] = ()  # costs that depend on the model inputs

    def node(self, name: str) -> NodeInfo:
        for info in self.nodes:
            if info.name == name:
                return info
        raise KeyError(name)

    @property
    def node_names(self) -> Tuple[str, ...]:
        return tuple(info.name for info in self.nodes)


def _graph_ancestors(tensor, stop_refs=frozenset()):
    """Refs of every tensor `tensor` depends on, walking `op.inputs`.

    The walk does not continue past tensors in `stop_refs` (they are still
    reported).
    """
    seen = set()
    stack = [tensor]
    while stack:
        t = stack.pop()
        ref = t.ref()
        if ref in seen:
            continue
        seen.add(ref)
        if ref in stop_refs and t is not tensor:
            continue
        stack.extend(t.op.inputs)
    return seen


def structure_from_records(
    nodes: Sequence[NodeRecord], costs: Mapping[str, tf.Tensor], inputs: Any = ()
) -> SCG:
    """Builds the `SCG` from the records of one traced forward pass.

    Args:
      nodes: list of `NodeRecord` in execution order (graph tensors).
      costs: `{name: per-example cost tensor}` (graph tensors).
      inputs: the model's input tensors (graph placeholders).
    """
    sample_refs = {rec.sample.ref(): rec.name for rec in nodes}
    order = {rec.name: i for i, rec in enumerate(nodes)}
    input_refs = {t.ref() for t in tf.nest.flatten(inputs)}

    def samples_in(refs):
        found = {sample_refs[r] for r in refs if r in sample_refs}
        return tuple(sorted(found, key=order.get))

    cost_refs = {name: _graph_ancestors(value) for name, value in costs.items()}
    cost_ancestors = {name: samples_in(refs) for name, refs in cost_refs.items()}
    costs_using_inputs = tuple(name for name, refs in cost_refs.items() if refs & input_refs)
    infos = []
    for rec in nodes:
        param_refs = set()
        parent_refs = set()
        for t in [rec.params] + ([rec.mask] if rec.mask is not None else []):
            param_refs |= _graph_ancestors(t)
            parent_refs |= _graph_ancestors(t, stop_refs=frozenset(sample_refs))
        ancestors = samples_in(param_refs)
        parents = samples_in(parent_refs)
        influenced = tuple(c for c, anc in cost_ancestors.items() if rec.name in anc)
        earlier = {
            a
            for c in influenced
            for a in cost_ancestors[c]
            if order[a] < order[rec.name]
        }
        context = ("inputs",) + tuple(sorted(earlier, key=order.get))
        layer = rec.layer
        infos.append(
            NodeInfo(
                name=rec.name,
                layer_name=layer.name,
                distribution=layer.distribution_name,
                event_shape=tuple(rec.sample.shape[1:]),
                reparameterized=layer.is_reparameterized(rec.params, rec.mask),
                support_size=layer.support_size(tuple(rec.sample.shape[1:])),
                factorized_units=layer.factorized_units(tuple(rec.sample.shape[1:])),
                local_kind=layer.local_kind,
                parents=parents,
                ancestors=ancestors,
                costs=influenced,
                context=context,
            )
        )
    return SCG(
        nodes=tuple(infos),
        costs=tuple(costs),
        cost_ancestors=cost_ancestors,
        costs_using_inputs=costs_using_inputs,
    )


def with_contexts(scg: SCG, overrides: Optional[Mapping[str, Sequence[str]]]) -> SCG:
    """The SCG with user-chosen critic contexts, checked against R1 and R2.

    `overrides` maps node names to context entries: `"inputs"` and names of
    earlier samples. The default context (docs/method.md) holds the inputs and
    every earlier sample that a cost in `C_X` depends on. Leaving out one of
    those breaks R1 (the critic cannot be exact: the node's costs vary with a
    value it does not see) and R2 (a critic that bootstraps from this one would
    see a target that depends on its own context beyond `(x, s_X)`), so it is
    an error that names the missing values.
    """
    if not overrides:
        return scg
    names = scg.node_names
    unknown = set(overrides) - set(names)
    if unknown:
        raise ValueError(
            f"contexts= names unknown nodes {sorted(unknown)}; the model's nodes are {list(names)}."
        )
    infos = []
    for info in scg.nodes:
        if info.name not in overrides:
            infos.append(info)
            continue
        chosen = tuple(overrides[info.name])
        earlier = names[: names.index(info.name)]
        bad = [n for n in chosen if n != "inputs" and n not in earlier]
        if bad:
            raise ValueError(
                f"Context of node {info.name!r} names {bad}: a context holds only "
                f"'inputs' and samples computed before the node ({list(earlier)})."
            )
        required = set(info.context) - {"inputs"}
        if any(c in scg.costs_using_inputs for c in info.costs):
            required.add("inputs")
        missing = sorted(required - set(chosen), key=lambda n: (n != "inputs", n))
        if missing:
            raise ValueError(
                f"Context {list(chosen)} of node {info.name!r} breaks R1/R2: the costs "
                f"{list(info.costs)} it influences also depend on {missing}, so its "
                "critic cannot be exact and critics bootstrapping from it would be "
                f"biased. Add {missing} to the context (or drop the override)."
            )
        ordered = tuple(n for n in ("inputs",) + earlier if n in chosen)
        infos.append(dataclasses.replace(info, context=ordered))
    return dataclasses.replace(scg, nodes=tuple(infos))


def batchless_spec(value: Any) -> tf.TensorSpec:
    """The `tf.TensorSpec` of a tensor, array or spec with a dynamic batch
    dimension (one leaf of a model's inputs)."""
    if isinstance(value, tf.TensorSpec):
        return tf.TensorSpec((None,) + tuple(value.shape[1:]), value.dtype)
    value = tf.convert_to_tensor(value) if not hasattr(value, "shape") else value
    return tf.TensorSpec((None,) + tuple(value.shape[1:]), tf.as_dtype(value.dtype))


def discover(
    forward: Callable[[Any], Mapping[str, tf.Tensor]],
    input_signature: Any,
    check_names: Optional[Callable[[Dict[str, str], Tuple[str, ...], List[str]], None]] = None,
) -> Tuple[SCG, Dict[str, Tuple[Optional[int], ...]]]:
    """Traces `forward` once and returns its `SCG`.

    Args:
      forward: a function of the model inputs that runs the forward pass and
        returns `{cost_name: per-example cost}` for costs computed outside the
        model (compiled losses); costs added with `add_cost` are recorded. A
        returned name that a recorded cost also takes is an error.
      check_names: optional `(origins, returned_names, node_names) -> None`,
        called with `{recorded cost: where it was added}`, the returned cost
        names and the node names; it raises for names it refuses.
      input_signature: a structure of `tf.TensorSpec` for the inputs.
    """
    result = {}

    def traced(inputs):
        with Recorder() as rec:
            extra = forward(inputs)
        costs = dict(rec.costs)
        if check_names is not None:
            check_names(rec.origins, tuple(extra), [r.name for r in rec.nodes])
        clash = set(costs) & set(extra)
        if clash:
            raise ValueError(f"Costs {sorted(clash)} were both recorded and returned by the forward pass.")
        costs.update(extra)
        result["scg"] = structure_from_records(rec.nodes, costs, inputs)
        result["cost_shapes"] = {n: tuple(v.shape) for n, v in costs.items()}
        return 0

    tf.function(traced, autograph=False).get_concrete_function(input_signature)
    return result["scg"], result["cost_shapes"]


def format_scg(
    scg: SCG,
    estimators: Optional[Mapping[str, str]] = None,
    critics: Optional[Mapping[str, str]] = None,
) -> str:
    """A table of the SCG, one row per node, as `model.summary()` prints layers."""
    estimators = estimators or {}
    critics = critics or {}
    header = ("node", "distribution", "context", "costs influenced", "estimator", "critic")
    rows = [
        (
            info.name,
            f"{info.distribution}{list(info.event_shape)}",
            ", ".join(info.context),
            ", ".join(info.costs) or "(none)",
            estimators.get(info.name, "-"),
            critics.get(info.name, "-"),
        )
        for info in scg.nodes
    ]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]

    def line(row):
        return "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()

    rule = "-" * len(line(header))
    out = [rule, line(header), rule] + [line(r) for r in rows] + [rule]
    for cost in scg.costs:
        chain = " -> ".join(scg.cost_ancestors[cost]) or "(deterministic)"
        out.append(f"cost {cost}: stochastic ancestors {chain}")
    return "\n".join(out)
