"""Q-values of a node's outcomes: learned heads from its critic, exact heads
from the costs re-evaluated downstream of it.

For node `X` and cost `c` in `C_X`, the head `Q^c_X(x, s)` is the expected cost
`c` given the node's value `x` and its context `s` (the model inputs and the
earlier samples of `NodeInfo.context`; docs/method.md, "Contexts"). Where `X`
is the last stochastic ancestor of `c`, the head is exact: `c` is then a
deterministic function of `(x, s)`, re-evaluated with the context held and the
node forced (`outcomes.DownstreamEvaluator` on a functional model, else a
re-run of the forward pass on `batch x A` rows). Where the node's estimator
asks for common random numbers (`estimators.CriticCV(common_noise=True)`) and
every stochastic ancestor of `c` after `X` is a Bernoulli node, the head is the
cost re-evaluated the same way with those later nodes drawn again from the
uniform noise `u` they drew in this pass, `[u < sigmoid(logits)]` at the
outcome's logits: `Q^c_X(x', s) = c(x', s, u)`, a random head whose noise `u` is independent
of the node's own sample, so the estimator stays unbiased; at the sample it
is the realised cost. Every other head is learned
(`critics.NodeCritic`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, AbstractSet, Any, Callable, Dict, FrozenSet, Mapping, Optional, Tuple, Union

import keras
import tensorflow as tf

from keras_bpq import nodes as nodes_lib
from keras_bpq import outcomes as outcomes_lib

if TYPE_CHECKING:
    from keras_bpq import critics as critics_lib
    from keras_bpq import estimators as estimators_lib
    from keras_bpq import forward as forward_lib
    from keras_bpq import graph

# What heads are evaluated at: `[batch, A, *event]` outcomes, dense or as unit edits.
Values = Union[tf.Tensor, outcomes_lib.UnitEdits]


def context(info: graph.NodeInfo, x: Any, records: Mapping[str, graph.NodeRecord]) -> Dict[str, Any]:
    """`{"inputs": x, name: sample}` for the entries of the node's context
    (`graph.NodeInfo.context`), the samples stop-gradient."""
    result = {"inputs": x} if "inputs" in info.context else {}
    for name in info.context:
        if name != "inputs":
            result[name] = tf.stop_gradient(records[name].sample)
    return result


def pass_repeats(scg: graph.SCG, num_samples: int) -> Dict[str, int]:
    """`{node: rows per group}`: a training pass under
    `compile(num_samples=K)` repeats every example `K` times in consecutive
    rows, so a node whose context is the inputs alone sees groups of `K`
    equal context rows (1 for every other node)."""
    return {info.name: num_samples if set(info.context) <= {"inputs"} else 1 for info in scg.nodes}


def exact_costs(scg: graph.SCG, info: graph.NodeInfo) -> Tuple[str, ...]:
    """The costs of node `info` whose heads are exact: those it is the last
    stochastic ancestor of (deterministic functions of its value and context)."""
    return tuple(c for c in info.costs if scg.cost_ancestors[c][-1] == info.name)


def common_noise_nodes(estimators: Mapping[str, estimators_lib.Estimator]) -> FrozenSet[str]:
    """The nodes whose estimators ask for common-noise heads."""
    return frozenset(name for name, estimator in estimators.items() if estimator.common_noise)


def _later_ancestors(scg, info, cost):
    """The stochastic ancestors of `cost` after node `info`."""
    chain = scg.cost_ancestors[cost]
    return chain[chain.index(info.name) + 1:]


def common_noise_costs(scg: graph.SCG, info: graph.NodeInfo, nodes: AbstractSet[str]) -> Tuple[str, ...]:
    """The costs of node `info` (one of `nodes`, `common_noise_nodes`) whose
    heads re-evaluate the cost with the later nodes drawn from this pass's
    noise: those with stochastic ancestors after `info`, all Bernoulli."""
    if info.name not in nodes:
        return ()
    result = []
    for cost in info.costs:
        later = _later_ancestors(scg, info, cost)
        if later and all(scg.node(n).local_kind == "binary" for n in later):
            result.append(cost)
    return tuple(result)


class QFunction:
    """Every node's heads `Q^c_X` at any of its outcomes, given a recorded pass.

    Args:
      scg: the model's `graph.SCG`.
      critics: `{node: critics.Critic}`, the critics of the learned heads (the
        model's `TrainingState.critics`, read at every call).
      network: the model's functional network, or None (subclassed): where
        there is one, exact heads evaluate only the operations downstream of
        the node.
      forward: a recorded forward pass, `forward(x, y, training=True,
        forced={node: sample}, keep_gradient=names) -> forward.Recording`, for
        re-runs: `forward.record` with the model's Keras call, compiled
        losses and cost names bound (`functools.partial`), so that a re-run
        goes to the Keras layers and never back to the model's own methods.
      common_noise: the nodes with common-noise heads (`common_noise_nodes`).
      num_samples: the model's draws per example (`compile(num_samples=...)`),
        for the groups of equal context rows of a training pass
        (`pass_repeats`).
    """

    def __init__(
        self,
        scg: graph.SCG,
        critics: Mapping[str, critics_lib.Critic],
        network: Optional[keras.Model],
        forward: Callable[..., forward_lib.Recording],
        common_noise: AbstractSet[str] = frozenset(),
        num_samples: int = 1,
    ) -> None:
        self.scg = scg
        self.critics = critics
        self.network = network
        self.forward = forward
        self.common_noise = frozenset(common_noise)
        self.pass_repeats = pass_repeats(scg, num_samples)
        self._evaluators = {}

    def group_argument(self, name: str, critic: critics_lib.Critic, of_pass: bool) -> Dict[str, int]:
        """The keyword arguments of `critic.q` and `critic.q_outcomes` for node
        `name`'s rows: `{"repeats": K}` on a training pass's rows (`of_pass`)
        that come in groups of `K > 1` equal contexts (`pass_repeats`), for a
        critic that reads groups (`critics.Critic.reads_groups`); else `{}`."""
        repeats = self.pass_repeats[name] if of_pass else 1
        return {"repeats": repeats} if repeats > 1 and getattr(critic, "reads_groups", False) else {}

    def common_noise_costs(self, info: graph.NodeInfo) -> Tuple[str, ...]:
        """The costs of node `info` served by common-noise heads (`common_noise_costs`)."""
        return common_noise_costs(self.scg, info, self.common_noise)

    def heads(
        self,
        info: graph.NodeInfo,
        x: Any,
        y: Any,
        records: Mapping[str, graph.NodeRecord],
        values: Values,
        target: bool = True,
        of_pass: bool = False,
    ) -> Dict[str, tf.Tensor]:
        """`{cost: [batch, A]}`: every head `Q^c_X` of node `info` at `values`
        (`[batch, A, *event]`, a tensor or `outcomes.UnitEdits`), given the
        recorded context of this pass (`of_pass`: a training pass's rows, in
        groups of `pass_repeats` equal context rows, which a critic that
        reads groups evaluates once per group; else rows as they are, a
        replayed batch's).

        Learned heads come from the node's critic (`target` selects the target
        copy); exact heads (the node is the cost's last stochastic ancestor)
        re-evaluate the costs with the context and the node forced: on a
        functional model only the operations downstream of the node, with
        rank-one updates through `Dense` layers (`outcomes`); otherwise by
        re-running the whole forward pass on `batch x A` rows. Common-noise
        heads re-evaluate their costs the same way with the later nodes drawn
        again from their recorded noise (fresh noise where a record has none:
        a forced or replayed pass).
        """
        held = context(info, x, records)
        heads = {}
        critic = self.critics.get(info.name)
        if critic is not None:
            learned = critic.q_outcomes(held, values, target=target, **self.group_argument(info.name, critic, of_pass))
            heads.update({c: learned[:, :, i] for i, c in enumerate(critic.heads)})
        for costs, redrawn in (
            (exact_costs(self.scg, info), ()),
            (self.common_noise_costs(info), self._later_nodes(info)),
        ):
            if costs:
                heads.update(self._evaluated_heads(info, x, y, records, held, values, costs, redrawn))
        missing = [c for c in info.costs if c not in heads]
        if missing:
            raise ValueError(f"Node {info.name!r} has no critic for costs {missing}.")
        return heads

    def _later_nodes(self, info):
        """The stochastic ancestors after `info` of its common-noise costs."""
        later = set()
        for cost in self.common_noise_costs(info):
            later.update(_later_ancestors(self.scg, info, cost))
        return tuple(n for n in self.scg.node_names if n in later)

    def _evaluated_heads(self, info, x, y, records, held, values, costs, redrawn):
        """Exact (`redrawn` empty) or common-noise heads of `costs` at `values`."""
        noise = {n: _noise(records[n]) for n in redrawn}
        evaluator = self.downstream_evaluator(info, costs, redrawn)
        if evaluator is not None:
            forced = {n: held[n] for n in info.context if n != "inputs"}
            return evaluator(x, forced, values, training=True, noise=noise)
        return self.rerun_heads(info, x, y, held, values, costs, noise)

    def downstream_evaluator(
        self, info: graph.NodeInfo, costs: Tuple[str, ...], redrawn: Tuple[str, ...] = ()
    ) -> Optional[outcomes_lib.DownstreamEvaluator]:
        """The cached `outcomes.DownstreamEvaluator` of `costs` at node `info`
        (the later nodes `redrawn` from their noise), or None where the model
        is not functional or the graph needs a re-run."""
        key = (info.name, costs, redrawn)
        if key not in self._evaluators:
            try:
                evaluator = outcomes_lib.DownstreamEvaluator(
                    self.network, nodes_lib.StochasticNode, info.name,
                    [n for n in info.context if n != "inputs"], costs, redrawn,
                )
            except outcomes_lib.Unsupported:
                evaluator = None
            self._evaluators[key] = evaluator
        return self._evaluators[key]

    def rerun_heads(
        self,
        info: graph.NodeInfo,
        x: Any,
        y: Any,
        held: Mapping[str, Any],
        values: Values,
        costs: Tuple[str, ...],
        noise: Optional[Mapping[str, tf.Tensor]] = None,
    ) -> Dict[str, tf.Tensor]:
        """Exact heads by a forward pass on `batch x A` rows with the context
        `held` (`context()`) and the node forced (and the nodes of `noise`
        drawn from it: common-noise heads)."""
        if isinstance(values, outcomes_lib.UnitEdits):
            values = values.dense()
        held = {n: held[n] for n in info.context if n != "inputs"}
        return self._forced_rerun(info, x, y, held, values, keep_gradient={info.name}, costs=costs, noise=noise)

    def _forced_rerun(self, info, x, y, held, values, keep_gradient, costs, noise=None):
        """`{cost: [batch, A]}`: one forward pass on `batch x A` rows with the
        samples `held` (`{name: [batch, *event]}`) repeated per outcome, node
        `info` forced to `values` (`[batch, A, *event]`), the nodes of `noise`
        drawn from it and the other nodes sampled afresh."""
        num = values.shape[1]
        repeat = lambda t: tf.repeat(t, num, axis=0)  # noqa: E731
        forced = {n: repeat(v) for n, v in held.items()}
        forced[info.name] = tf.reshape(values, [-1] + list(values.shape[2:]))
        rerun = self.forward(
            tf.nest.map_structure(repeat, x),
            None if y is None else tf.nest.map_structure(repeat, y),
            training=True,
            forced=forced,
            keep_gradient=keep_gradient,
            noise={n: repeat(u) for n, u in (noise or {}).items()},
        ).costs
        return {c: tf.reshape(rerun[c], [-1, num]) for c in costs}

    def rerun(
        self, info: graph.NodeInfo, x: Any, y: Any, records: Mapping[str, graph.NodeRecord]
    ) -> Callable[[tf.Tensor], tf.Tensor]:
        """`values [rows, A, *event] -> [rows, A]`: the node's realised downstream
        cost `c_X` with the node forced to each value, the earlier samples held
        and the later nodes sampled afresh (one batched forward pass)."""

        def rerun(values):
            position = self.scg.node_names.index(info.name)
            held = {n: records[n].sample for n in self.scg.node_names[:position]}
            costs = self._forced_rerun(info, x, y, held, values, keep_gradient=(), costs=info.costs)
            return tf.add_n([costs[c] for c in info.costs])

        return rerun

    def node_q(
        self,
        info: graph.NodeInfo,
        x: Any,
        y: Any,
        records: Mapping[str, graph.NodeRecord],
        target: bool,
        of_pass: bool = False,
    ) -> Callable[[Values], tf.Tensor]:
        """`values [rows, A, *event] -> [rows, A]`: `Q_X = sum_{c in C_X} Q^c_X`
        (`heads`, with `of_pass`)."""

        def q(values):
            heads = self.heads(info, x, y, records, values, target=target, of_pass=of_pass)
            return tf.add_n([heads[c] for c in info.costs])

        return q


def _noise(record: graph.NodeRecord) -> tf.Tensor:
    """The uniform noise a Bernoulli node drew its sample from in this pass, or
    fresh noise where its record keeps none (a forced or replayed sample)."""
    if record.noise is not None:
        return record.noise
    seed = tf.cast(record.layer.seed_generator.next(), tf.int32)
    return nodes_lib.stateless_uniform(tf.shape(record.sample), seed)
