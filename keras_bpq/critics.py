"""Per-node multi-head critics `Q^c_X(x, s_X)` and their target copies.

Every stochastic node `X` gets one head per cost `c` it influences (`C_X`), so a
DAG whose costs are shared by several paths never double counts:
`Q_X(x, s) = sum_{c in C_X} Q^c_X(x, s)` (docs/method.md, "Cost routing").

* A head is *exact* when `X` is the last stochastic ancestor of `c`: then `c`
  is a deterministic function of `(x, s_X)` and the cost itself is its Q-value,
  re-evaluated at other outcomes by re-running the forward pass with `X`
  forced.
* Every other head is *learned*: a Keras model (default: an MLP) on the
  flattened context `s_X` (the model inputs and the earlier samples of
  `node.context`) and the node's sample, regressed on the targets of
  `keras_bpq.targets`. Its target copy `Qbar` follows it by Polyak averaging
  (`tau`) or a periodic copy, and is what the actor reads by default.

A critic network can also score every outcome of a categorical node in one
pass from the context alone (`AllOutcomes`, DQN-style), so that the local
expectations over all `K` outcomes cost one evaluation per example instead of
`K`. A critic can also be any object with the `q(context, values, target)`
method of `Critic` (tests inject exact "oracle" critics this way).

`CriticSet` trains a model's learned critics: their loss on the targets of
`keras_bpq.targets`, its gradient, `critic_steps` updates per step (on
every step, or every `critic_update_period`-th: `CriticSet.due`), the
replayed updates of `compile(replay=...)` (`keras_bpq.replay`) and the target
copies.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from keras_bpq import _keras_compat
from keras_bpq import costs as costs_lib
from keras_bpq import distribute
from keras_bpq import outcomes as outcomes_lib
from keras_bpq import q_values
from keras_bpq import targets as targets_lib

if TYPE_CHECKING:
    from keras_bpq import estimators as estimators_lib
    from keras_bpq import forward as forward_lib
    from keras_bpq import graph
    from keras_bpq import replay as replay_lib


def flatten_rows(value: tf.Tensor) -> tf.Tensor:
    """`[rows, ...]` -> `[rows, prod(...)]` float32."""
    value = tf.cast(value, tf.float32)
    return tf.reshape(value, [tf.shape(value)[0], int(np.prod(value.shape[1:]))])


def context_features(context: Mapping[str, Any]) -> tf.Tensor:
    """Concatenated flat features of a context `{"inputs": structure, name: sample}`."""
    parts = [flatten_rows(t) for t in tf.nest.flatten(context.get("inputs", []))]
    parts += [flatten_rows(context[name]) for name in sorted(k for k in context if k != "inputs")]
    return tf.concat(parts, axis=-1)


def default_critic_model(
    num_heads: int, hidden_units: Sequence[int] = (64, 64), name: str = "critic"
) -> keras.Sequential:
    """An MLP `[features] -> [num_heads]` with ReLU hidden layers."""
    layers = [keras.layers.Dense(u, activation="relu", name=f"hidden_{i}") for i, u in enumerate(hidden_units)]
    layers.append(keras.layers.Dense(num_heads, name="heads"))
    return keras.Sequential(layers, name=name)


def _copy_architecture(network, name):
    """A fresh, unbuilt model with `network`'s architecture under a new name
    (so its variable paths differ from the original's)."""
    try:
        config = network.get_config()
        config["name"] = name
        return network.__class__.from_config(config)
    except (NotImplementedError, TypeError, KeyError):
        return keras.models.clone_model(network)


@keras.saving.register_keras_serializable(package="keras_bpq")
class AllOutcomes(keras.layers.Layer):
    """A critic network that scores all `K` outcomes of a categorical node at once.

    `network` maps the context features `[batch, F]` to `[batch, K, heads]` (or
    `[batch, K * heads]`): row `k` is `Q(e_k, s)`. As a critic network this layer
    takes the usual `[batch, F + K]` features (context, then the node's value
    `v`) and returns `sum_k v_k Q(e_k, s)`, the sample's row for one-hot `v`;
    `NodeCritic.q_outcomes` reads `scores` once per example for every outcome.

    Args:
      network: a Keras layer or model `[batch, F] -> [batch, K(, heads)]`.
      num_outcomes: `K`, the node's number of categories.
      distinct: evaluate `network` once per distinct context row and gather.
        Where the rows come in groups of equal contexts (a context of the
        inputs alone under `compile(num_samples=K)`: groups of `K`), the
        first row of each group is evaluated, with or without XLA. Otherwise
        a `tf.unique` finds the distinct rows without XLA; under XLA, whose
        static shapes would pad the unique rows to the batch (after a sort),
        every row is evaluated, as with `distinct=False`.
    """

    def __init__(
        self, network: keras.layers.Layer, num_outcomes: int, distinct: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.network = network
        self.num_outcomes = int(num_outcomes)
        self.distinct = bool(distinct)

    def build(self, input_shape: Tuple[Optional[int], ...]) -> None:
        self.network.build((None, input_shape[-1] - self.num_outcomes))
        self.built = True

    def scores(self, context_features: tf.Tensor, repeats: int = 1) -> tf.Tensor:
        """`[batch, K, heads]` Q-values of every outcome; `repeats`: the rows
        come in groups of that many equal rows (`distinct` then evaluates
        the first row of each)."""
        if self.distinct and repeats > 1:
            out = tf.repeat(tf.cast(self.network(context_features[::repeats]), tf.float32), repeats, axis=0)
        elif self.distinct and not _keras_compat.in_xla_context():
            rows, index = tf.raw_ops.UniqueV2(x=context_features, axis=[0])
            rows = tf.ensure_shape(rows, [None] + context_features.shape[1:].as_list())
            out = tf.gather(tf.cast(self.network(rows), tf.float32), index)
        else:
            out = tf.cast(self.network(context_features), tf.float32)
        return tf.reshape(out, [tf.shape(out)[0], self.num_outcomes, -1])

    def at(self, values: tf.Tensor, context_features: tf.Tensor, repeats: int = 1) -> tf.Tensor:
        """`[batch, heads]`: `sum_k v_k Q(e_k, s)` of one-hot `values` (`[batch,
        K]`) given the context rows (`scores`' `repeats`)."""
        return tf.einsum("bk,bkh->bh", tf.cast(values, tf.float32), self.scores(context_features, repeats))

    def call(self, features: tf.Tensor) -> tf.Tensor:
        k = self.num_outcomes
        return self.at(features[:, -k:], features[:, :-k])

    def compute_output_shape(self, input_shape: Tuple[Optional[int], ...]) -> Tuple[Optional[int], ...]:
        out = self.network.compute_output_shape((input_shape[0], input_shape[-1] - self.num_outcomes))
        heads = out[-1] if len(out) == 3 else out[-1] // self.num_outcomes
        return (input_shape[0], heads)

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(
            network=keras.saving.serialize_keras_object(self.network),
            num_outcomes=self.num_outcomes,
            distinct=self.distinct,
        )
        return config

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> AllOutcomes:
        return cls(**_with_network(config))


def _with_network(config: Dict[str, Any]) -> Dict[str, Any]:
    """A layer's config with its `network` deserialised (`from_config`)."""
    return dict(config, network=keras.saving.deserialize_keras_object(config["network"]))


class Critic:
    """Interface: Q-values of one node's learned heads.

    A critic whose `reads_groups` is True takes `repeats=` in `q` and
    `q_outcomes`: the context rows then come in consecutive groups of that
    many equal rows (a training pass under `compile(num_samples=...)` of a
    node whose context is the inputs alone, `q_values.pass_repeats`), which it
    may evaluate once per group."""

    heads: Tuple[str, ...] = ()
    reads_groups: bool = False

    def q(self, context: Mapping[str, Any], values: tf.Tensor, target: bool = True) -> tf.Tensor:
        """`[rows, len(heads)]` Q-values at `values` (`[rows, *event]`) given the
        context rows (`{"inputs": ..., name: sample}`). `target` selects the
        target copy."""
        raise NotImplementedError

    def q_outcomes(
        self, context: Mapping[str, Any], values: q_values.Values, target: bool = True
    ) -> tf.Tensor:
        """`[batch, A, len(heads)]` Q-values at every outcome of `values`
        (`[batch, A, *event]`, a tensor or `outcomes.UnitEdits`) given the
        context (`[batch]` rows): `q` on `batch x A` rows."""
        if isinstance(values, outcomes_lib.UnitEdits):
            values = values.dense()
        num = values.shape[1]
        tiled = tf.nest.map_structure(lambda t: tf.repeat(t, num, axis=0), context)
        rows = tf.reshape(values, [-1] + list(values.shape[2:]))
        q = self.q(tiled, rows, target=target)
        return tf.reshape(q, [-1, num, len(self.heads)])


@keras.saving.register_keras_serializable(package="keras_bpq")
class NodeCritic(keras.layers.Layer, Critic):
    """A learned multi-head critic for one node, with its target copy.

    Args:
      heads: names of the costs this critic predicts.
      network: a Keras model `[batch, features] -> [batch, len(heads)]`, or None
        for `default_critic_model(hidden_units)`.
      feature_dim: size of the flattened context plus the node's sample.
    """

    reads_groups = True

    def __init__(
        self,
        heads: Sequence[str],
        feature_dim: int,
        network: Optional[keras.layers.Layer] = None,
        hidden_units: Sequence[int] = (64, 64),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.heads = tuple(heads)
        self.feature_dim = int(feature_dim)
        self.hidden_units = tuple(hidden_units)
        if network is None:
            network = default_critic_model(len(self.heads), self.hidden_units, name=f"{self.name}_online")
        self.online = network
        self.target_network = _copy_architecture(network, f"{self.name}_target")
        self.online.build((None, self.feature_dim))
        self.target_network.build((None, self.feature_dim))
        self.target_network.trainable = False
        for t, o in zip(self.target_network.weights, self.online.weights):
            t.assign(o)
        out = self.online.compute_output_shape((None, self.feature_dim))
        if tuple(out)[-1] != len(self.heads):
            raise ValueError(
                f"Critic {self.name!r} must output {len(self.heads)} heads (one per cost "
                f"{list(self.heads)}); its model outputs shape {tuple(out)}."
            )
        self.built = True

    def q(
        self, context: Mapping[str, Any], values: tf.Tensor, target: bool = True, repeats: int = 1
    ) -> tf.Tensor:
        """As `Critic.q`; `repeats`: the context rows come in groups of that
        many equal rows (`Critic.reads_groups`), which a `distinct`
        `AllOutcomes` network evaluates once per group."""
        network = self.target_network if target else self.online
        if repeats > 1 and isinstance(network, AllOutcomes) and network.distinct:
            return network.at(flatten_rows(values), context_features(context), repeats)
        features = tf.concat([context_features(context), flatten_rows(values)], axis=-1)
        return tf.cast(network(features), tf.float32)

    def q_outcomes(
        self, context: Mapping[str, Any], values: q_values.Values, target: bool = True, repeats: int = 1
    ) -> tf.Tensor:
        """As `Critic.q_outcomes`; an `AllOutcomes` network is evaluated once per
        example (a `distinct` one once per group of `repeats` equal context
        rows, `q`); for `UnitEdits` and a network that starts with a plain
        `Dense` layer, that layer is evaluated once per example and updated by
        rank one per outcome (`outcomes.dense_at`)."""
        network = self.target_network if target else self.online
        if isinstance(network, AllOutcomes):
            scores = network.scores(context_features(context), repeats)
            if isinstance(values, outcomes_lib.UnitEdits):
                return values.contract(scores)
            flat = tf.reshape(tf.cast(values, tf.float32), [-1, values.shape[1], network.num_outcomes])
            return tf.einsum("bak,bkh->bah", flat, scores)
        layers = getattr(network, "layers", [])
        if not (
            isinstance(values, outcomes_lib.UnitEdits)
            and isinstance(network, keras.Sequential)
            and layers
            and outcomes_lib.plain_dense(layers[0])
        ):
            return super().q_outcomes(context, values, target=target)
        hidden = outcomes_lib.dense_at(layers[0], values, context=context_features(context))
        rows = tf.reshape(hidden, [-1, hidden.shape[-1]])
        for layer in layers[1:]:
            rows = layer(rows)
        return tf.reshape(tf.cast(rows, tf.float32), [-1, values.num_outcomes, len(self.heads)])

    def update_target(self, tau: float) -> None:
        """`Qbar <- (1 - tau) Qbar + tau Q` (tau = 1 copies)."""
        for t, o in zip(self.target_network.weights, self.online.weights):
            t.assign((1.0 - tau) * t + tau * o)

    def call(self, features: tf.Tensor) -> tf.Tensor:
        return self.online(features)

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(
            heads=list(self.heads),
            feature_dim=self.feature_dim,
            hidden_units=list(self.hidden_units),
            network=keras.saving.serialize_keras_object(self.online),
        )
        return config

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> NodeCritic:
        return cls(**_with_network(config))


# -- the critic set --------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CriticOptions:
    """The critic settings of `BackpropQModel.compile()` (a plain object:
    Keras does not track it)."""

    target: str = "td"
    lam: float = 0.9
    tau: float = 0.01
    period: Optional[int] = None
    steps: int = 1
    every: int = 1
    warmup: int = 0
    hidden_units: Tuple[int, ...] = (64, 64)
    models: Dict[str, Any] = dataclasses.field(default_factory=dict)
    actor_reads_target: bool = True


def critic_options(
    target: str = "td", lam: float = 0.9, tau: float = 0.01, period: Optional[int] = None, steps: int = 1,
    warmup: int = 0, hidden_units: Sequence[int] = (64, 64), models: Optional[Mapping[str, Any]] = None,
    actor_reads: str = "target", every: int = 1,
) -> CriticOptions:
    """`CriticOptions` from `compile()`'s arguments (a ValueError for values
    out of range); `actor_reads` is `"target"` or `"online"`, `every` is
    `critic_update_period`."""
    targets_lib.check_kind(target, lam)
    if actor_reads not in ("target", "online"):
        raise ValueError(f"actor_reads must be 'target' or 'online'; got {actor_reads!r}.")
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1]; got {tau}.")
    if int(steps) < 1:
        raise ValueError(f"critic_steps must be at least 1; got {steps}.")
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(
            f"critic_update_period must be an integer of at least 1 (train the critics every this many "
            f"steps; 1: every step); got {every!r}."
        )
    return CriticOptions(
        target=target,
        lam=float(lam),
        tau=float(tau),
        period=period,
        steps=int(steps),
        every=int(every),
        warmup=int(warmup),
        hidden_units=tuple(hidden_units),
        models=dict(models or {}),
        actor_reads_target=actor_reads == "target",
    )


def learned_heads(
    scg: graph.SCG, estimators: Mapping[str, estimators_lib.Estimator]
) -> Dict[str, Tuple[str, ...]]:
    """`{node: (cost, ...)}`: the heads each node's critic predicts, for nodes
    that have any: none when no estimator needs a critic; otherwise every head
    that is neither exact (`targets.inexact_heads`) nor served by common noise
    (`q_values.common_noise_costs`). Every learned head gets a critic, so
    bootstrapped targets always find their successor's critic."""
    if not any(e.needs_critic for e in estimators.values()):
        return {}
    noise = q_values.common_noise_nodes(estimators)
    heads = {
        n: tuple(c for c in h if c not in q_values.common_noise_costs(scg, scg.node(n), noise))
        for n, h in targets_lib.inexact_heads(scg).items()
    }
    return {n: h for n, h in heads.items() if h}


def heads_to_learn(
    scg: graph.SCG, estimators: Mapping[str, estimators_lib.Estimator], options: CriticOptions
) -> Dict[str, Tuple[str, ...]]:
    """`learned_heads(scg, estimators)`; raises a ValueError for options that
    do not fit them: critics given for unknown nodes or nodes that learn no
    head, or a given `Critic` whose `heads` are not the node's learned heads."""
    heads = learned_heads(scg, estimators)
    unknown = set(options.models) - set(scg.node_names)
    if unknown:
        raise ValueError(
            f"compile(critics=...) names unknown nodes {sorted(unknown)}; the "
            f"model's nodes are {list(scg.node_names)}."
        )
    unused = set(options.models) - set(heads)
    if unused:
        raise ValueError(
            f"compile(critics=...) gives critics to nodes {sorted(unused)}, which learn no "
            "head: their estimators need no critic, or every cost they influence has an "
            "exact head (the node is its last stochastic ancestor) or a common-noise head "
            "(CriticCV(common_noise=True), which 'auto' uses). Leave them out of critics=, "
            "or pass an estimator without common noise (e.g. 'critic_cv')."
        )
    for name, given in options.models.items():
        if is_injected(given) and tuple(given.heads) != heads[name]:
            raise ValueError(
                f"compile(critics=...): the critic given for node {name!r} predicts heads "
                f"{list(given.heads)}, but the node learns heads {list(heads[name])} (the "
                "others are exact or served by common noise). Give it exactly those heads."
            )
    if options.target == "expected":
        targets_lib.check_supports(scg, heads, "critic_target='expected'", "Use 'td'.")
    return heads


def is_injected(critic: Any) -> bool:
    """Whether a `compile(critics=...)` entry is a ready `Critic` used as given
    (not a Keras network that a `NodeCritic` wraps and trains)."""
    return isinstance(critic, Critic) and not isinstance(critic, keras.layers.Layer)


def feature_dims(scg: graph.SCG, spec: Any) -> Dict[str, int]:
    """`{node: features}`: the size of each node's flattened context and sample,
    for inputs of `spec` (a structure of `tf.TensorSpec`)."""
    input_dim = sum(int(np.prod(s.shape[1:])) for s in tf.nest.flatten(spec))
    dims = {}
    for info in scg.nodes:
        parts = [
            input_dim if n == "inputs" else int(np.prod(scg.node(n).event_shape))
            for n in info.context
        ]
        dims[info.name] = sum(parts) + int(np.prod(info.event_shape))
    return dims


class CriticEvaluation(NamedTuple):
    """A step's critic targets, Q-values at the samples and losses, computed
    once for the update and the metrics."""

    targets: Dict[Tuple[str, str], tf.Tensor]  # (node, cost) -> target [batch]
    q_at_sample: Dict[str, Dict[str, tf.Tensor]]  # node -> cost -> Qbar^c_node at its sample
    per_node: Dict[str, Tuple[tf.Tensor, tf.Tensor]]  # node -> (loss, mean |target - Q|)
    grads: Optional[List[Optional[tf.Tensor]]]  # of the loss, in `CriticSet.variables` order


class CriticInputs(NamedTuple):
    """What the critic loss reads of a pass: its inputs, `{node: sample}`, the
    targets and the sample weights."""

    x: Any
    samples: Dict[str, tf.Tensor]
    targets: Dict[Tuple[str, str], tf.Tensor]
    weights: Optional[tf.Tensor]


class CriticSet:
    """A model's critics with what trains them.

    Args:
      scg: the model's `graph.SCG`.
      critics: `{node: Critic}`, every node's critic (`TrainingState.critics`);
        the `NodeCritic`s among them are trained.
      variables: their trainable variables.
      options: `CriticOptions`.
      optimizer: the critics' optimizer.
      q_function: the model's `q_values.QFunction`.
      steps: the model's step counter (`TrainingState.steps`).
    """

    def __init__(
        self,
        scg: graph.SCG,
        critics: Mapping[str, Critic],
        variables: Sequence[tf.Variable],
        options: CriticOptions,
        optimizer: keras.optimizers.Optimizer,
        q_function: q_values.QFunction,
        steps: tf.Variable,
    ) -> None:
        self.scg = scg
        self.critics = critics
        self.learned = {n: c for n, c in critics.items() if isinstance(c, NodeCritic)}
        self.variables = list(variables)
        self.options = options
        self.optimizer = optimizer
        self.q_function = q_function
        self.steps = steps

    def loss(
        self,
        x: Any,
        records: Mapping[str, graph.NodeRecord],
        weights: Optional[tf.Tensor],
        targets: Mapping[Tuple[str, str], tf.Tensor],
        of_pass: bool = False,
    ) -> Tuple[tf.Tensor, Dict[str, Tuple[tf.Tensor, tf.Tensor]]]:
        """Squared error of every learned head, summed over heads and nodes
        (examples weighted by their sample weights, as the actor's objective),
        plus the critics' weight regularisers; and per node `(loss, mean
        |target - Q|)`. `of_pass`: the rows are a training pass's (each
        example repeated `num_samples` times, `q_values.pass_repeats`), not
        replayed ones."""
        total = 0.0
        per_node = {}
        for name, critic in self.learned.items():
            info = self.scg.node(name)
            groups = self.q_function.group_argument(name, critic, of_pass)
            pred = critic.q(q_values.context(info, x, records), records[name].sample, target=False, **groups)
            wanted = tf.stack([targets[(name, c)] for c in critic.heads], axis=1)
            loss = costs_lib.weighted_mean(tf.reduce_sum(tf.square(pred - wanted), axis=1), weights)
            per_node[name] = (
                loss, costs_lib.weighted_mean(tf.reduce_mean(tf.abs(wanted - pred), axis=1), weights)
            )
            total += loss + costs_lib.sum_losses(
                costs_lib.weight_penalties(getattr(critic, "trainable_variables", []))
            )
        return total, per_node

    def due(self) -> Optional[tf.Tensor]:
        """Whether this step trains the critics (a boolean tensor): every step
        of the warm-up (`critic_warmup_steps`), then every `every`-th step of
        the step counter (`compile(critic_update_period=every)`); None when
        every step does (`every == 1`). Read before the step's updates."""
        every = self.options.every
        if every == 1:
            return None
        return tf.logical_or(self.steps < self.options.warmup, tf.equal(self.steps % every, 0))

    def evaluate(
        self, forward: forward_lib.ForwardPass, with_gradient: bool, due: Optional[tf.Tensor] = None
    ) -> Optional[CriticEvaluation]:
        """This step's `CriticEvaluation` of a `forward.ForwardPass` (the
        gradient only `with_gradient`); None without learned critics. With
        `due` (`due()`) it is computed only where `due` holds, and is
        `stand_in` elsewhere, which nothing reads (`update` and the critics'
        metrics skip such steps); its gradients are then dense, with zeros for
        a variable the loss does not reach."""
        if not self.learned:
            return None
        options, x = self.options, forward.x

        def evaluation():
            targets, q_at_sample = targets_lib.evaluate(
                options.target, options.lam, self.scg, forward.costs, forward.records, self.critics,
                self.q_function, x, forward.y, of_pass=True,
            )
            with tf.GradientTape() as tape:
                loss, per_node = self.loss(x, forward.records, forward.weights, targets, of_pass=True)
                scaled = loss / distribute.num_replicas()
            grads = tape.gradient(scaled, self.variables) if with_gradient else None
            if due is not None and grads is not None:
                grads = [
                    tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for v, g in zip(self.variables, grads)
                ]
            return CriticEvaluation(targets, q_at_sample, per_node, grads)

        if due is None:
            return evaluation()
        return tf.cond(due, evaluation, lambda: self.stand_in(forward, with_gradient))

    def stand_in(self, forward: forward_lib.ForwardPass, with_gradient: bool) -> CriticEvaluation:
        """A `CriticEvaluation` of the structure `evaluate` returns, of zeros:
        what a step that does not train the critics holds in its place."""
        zeros = tf.zeros_like(forward.total)
        q_at_sample = {}
        for info in self.scg.nodes:
            heads = targets_lib.realised_heads(self.scg, self.q_function, info)
            critic = self.critics.get(info.name)
            heads += tuple(critic.heads) if critic is not None else ()
            q_at_sample[info.name] = {c: zeros for c in heads}
        targets = {(n, c): zeros for n, critic in self.learned.items() for c in critic.heads}
        per_node = {n: (tf.zeros([]), tf.zeros([])) for n in self.learned}
        grads = [tf.zeros_like(v) for v in self.variables] if with_gradient else None
        return CriticEvaluation(targets, q_at_sample, per_node, grads)

    def inputs(
        self, forward: forward_lib.ForwardPass, evaluation: Optional[CriticEvaluation]
    ) -> Optional[CriticInputs]:
        """What the critic loss reads of this pass (None without an evaluation)."""
        if evaluation is None:
            return None
        samples = {n: r.sample for n, r in forward.records.items()}
        return CriticInputs(forward.x, samples, evaluation.targets, forward.weights)

    def update(
        self,
        evaluation: Optional[CriticEvaluation],
        forward: forward_lib.ForwardPass,
        grads: Sequence[Optional[tf.Tensor]],
        inputs: Optional[CriticInputs] = None,
    ) -> None:
        """Fits the learned critics on this step's targets (`critic_steps` times);
        nothing where `evaluation` is None (no learned critics).

        Takes the step's `evaluation` and `forward` pass first, so a training
        step binds them (`functools.partial`, `distribute.StepUpdates.critics`)
        and each replica passes its gradients `grads`. `inputs` (`inputs()`)
        are this replica's own when the update runs from a cross-replica
        `merge_call`, where `forward` is the first replica's.
        """
        if evaluation is None:
            return
        variables, optimizer = self.variables, self.optimizer
        optimizer.apply(grads, variables)
        if self.options.steps == 1:
            return
        x, samples, targets, weights = inputs or self.inputs(forward, evaluation)
        records = {n: dataclasses.replace(r, sample=samples[n]) for n, r in forward.records.items()}
        for _ in range(self.options.steps - 1):
            with tf.GradientTape() as tape:
                loss, _ = self.loss(x, records, weights, targets, of_pass=True)
                scaled = loss / distribute.num_replicas()  # the optimizer sums over replicas
            optimizer.apply(tape.gradient(scaled, variables), variables)

    def replay_targets(
        self, rows: replay_lib.ReplayRows, correction: str, seed: tf.Tensor
    ) -> Tuple[Dict[Tuple[str, str], tf.Tensor], forward_lib.Recording]:
        """`(targets, recording)`: the targets of every learned head on replayed
        `rows` under `correction` (`keras_bpq.replay`), and the replayed pass.

        The pass re-runs the model under the current weights with every node
        forced to its stored sample, so each node's recorded parameters are
        the current policy's at the stored parents. `"expected"` regresses
        `Q^c_{a_j}` on `Vbar^c_{a_{j+1}}`, the successor's expectation under
        those parameters; `"retrace"` on `G_j = Vbar_{a_{j+1}} + min(1, rho)
        (G_{j+1} - Qbar_{a_{j+1}})` with `rho = pi / mu` of the successor's
        stored sample; `"none"` on the `critic_target` kind as if on-policy.
        `seed` (int32 `[2]`) draws the successors whose `Vbar` is estimated
        from one fresh draw (`targets.evaluate`)."""
        options = self.options
        recording = self.q_function.forward(rows.x, rows.y, training=True, forced=rows.samples, keep_gradient=())
        kind = options.target if correction == "none" else correction
        traces = None
        if kind == "retrace":
            successors = {n for c in self.scg.costs for n in self.scg.cost_ancestors[c][1:]}
            traces = targets_lib.truncated_ratios(
                {n: recording.records[n].log_prob() for n in successors}, rows.log_probs
            )
        targets, _ = targets_lib.evaluate(
            kind, options.lam, self.scg, recording.costs, recording.records, self.critics,
            self.q_function, rows.x, rows.y, traces, seed,
        )
        return targets, recording

    def replay(
        self, buffer: replay_lib.ReplayBuffer, options: replay_lib.Replay, step_rows: replay_lib.ReplayRows
    ) -> None:
        """`options.updates_per_step` critic updates, each on `options.batch_size`
        rows (default: as many as this step's `step_rows`) drawn from `buffer`
        (`replay_targets`); only for a buffer that holds rows
        (`distribute.ReplayUpdates.ready`). A step binds `buffer` and
        `options` (`distribute.ReplayUpdates.update`)."""
        batch_size = options.batch_size or tf.shape(step_rows.weights)[0]
        for _ in range(options.updates_per_step):
            rows = buffer.draw(batch_size)
            targets, recording = self.replay_targets(rows, options.correction, buffer.next_seed())
            with tf.GradientTape() as tape:
                loss, _ = self.loss(rows.x, recording.records, rows.weights, targets)
                scaled = loss / distribute.num_replicas()  # the optimizer sums over replicas
            self.optimizer.apply(tape.gradient(scaled, self.variables), self.variables)

    def update_target_copies(self) -> None:
        """`Qbar <- (1 - tau) Qbar + tau Q` for every learned critic, or a copy
        every `period` steps."""
        options = self.options
        critics = self.learned.values()
        if options.period:
            def copy():
                for critic in critics:
                    critic.update_target(1.0)
                return tf.constant(0)

            tf.cond(tf.equal(self.steps % int(options.period), 0), copy, lambda: tf.constant(0))
        else:
            for critic in critics:
                critic.update_target(options.tau)


def describe(
    scg: graph.SCG, estimators: Mapping[str, estimators_lib.Estimator], critics: Mapping[str, Critic]
) -> Dict[str, str]:
    """`{node: "learned[...] common-noise[...] exact[...]"}`: the heads of every
    node whose estimator needs a critic (`graph.format_scg`'s `critics`)."""
    described = {}
    noise_nodes = q_values.common_noise_nodes(estimators)
    for info in scg.nodes:
        if not estimators[info.name].needs_critic:
            continue
        critic = critics.get(info.name)
        learned = list(critic.heads) if critic is not None else []
        noise = [c for c in q_values.common_noise_costs(scg, info, noise_nodes) if c not in learned]
        exact = [c for c in info.costs if c not in learned and c not in noise]
        kinds = (("learned", learned), ("common-noise", noise), ("exact", exact))
        described[info.name] = " ".join(f"{kind}[{', '.join(costs)}]" for kind, costs in kinds if costs)
    return described
