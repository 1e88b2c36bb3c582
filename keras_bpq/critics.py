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
"""

import keras
import numpy as np
import tensorflow as tf

from keras_bpq import outcomes as outcomes_lib


def flatten_rows(value):
    """`[rows, ...]` -> `[rows, prod(...)]` float32."""
    value = tf.cast(value, tf.float32)
    return tf.reshape(value, [tf.shape(value)[0], int(np.prod(value.shape[1:]))])


def context_features(context):
    """Concatenated flat features of a context `{"inputs": structure, name: sample}`."""
    parts = [flatten_rows(t) for t in tf.nest.flatten(context.get("inputs", []))]
    parts += [flatten_rows(context[name]) for name in sorted(k for k in context if k != "inputs")]
    return tf.concat(parts, axis=-1)


def default_critic_model(num_heads, hidden_units=(64, 64), name="critic"):
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
      distinct: evaluate `network` once per distinct context row (e.g. once per
        example, not per draw, under `compile(num_samples=...)`) and gather
        (a `tf.unique` over the rows; XLA compiles it too).
    """

    def __init__(self, network, num_outcomes, distinct=False, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.num_outcomes = int(num_outcomes)
        self.distinct = bool(distinct)

    def build(self, input_shape):
        self.network.build((None, input_shape[-1] - self.num_outcomes))
        self.built = True

    def scores(self, context_features):
        """`[batch, K, heads]` Q-values of every outcome."""
        if self.distinct:
            rows, index = tf.raw_ops.UniqueV2(x=context_features, axis=[0])
            rows = tf.ensure_shape(rows, [None] + context_features.shape[1:].as_list())
            out = tf.gather(tf.cast(self.network(rows), tf.float32), index)
        else:
            out = tf.cast(self.network(context_features), tf.float32)
        return tf.reshape(out, [tf.shape(out)[0], self.num_outcomes, -1])

    def call(self, features):
        k = self.num_outcomes
        values = tf.cast(features[:, -k:], tf.float32)
        return tf.einsum("bk,bkh->bh", values, self.scores(features[:, :-k]))

    def compute_output_shape(self, input_shape):
        out = self.network.compute_output_shape((input_shape[0], input_shape[-1] - self.num_outcomes))
        heads = out[-1] if len(out) == 3 else out[-1] // self.num_outcomes
        return (input_shape[0], heads)

    def get_config(self):
        config = super().get_config()
        config.update(
            network=keras.saving.serialize_keras_object(self.network),
            num_outcomes=self.num_outcomes,
            distinct=self.distinct,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["network"] = keras.saving.deserialize_keras_object(config["network"])
        return cls(**config)


class Critic:
    """Interface: Q-values of one node's learned heads."""

    heads = ()

    def q(self, context, values, target=True):
        """`[rows, len(heads)]` Q-values at `values` (`[rows, *event]`) given the
        context rows (`{"inputs": ..., name: sample}`). `target` selects the
        target copy."""
        raise NotImplementedError

    def q_outcomes(self, context, values, target=True):
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

    def __init__(self, heads, feature_dim, network=None, hidden_units=(64, 64), **kwargs):
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

    def q(self, context, values, target=True):
        features = tf.concat([context_features(context), flatten_rows(values)], axis=-1)
        network = self.target_network if target else self.online
        return tf.cast(network(features), tf.float32)

    def q_outcomes(self, context, values, target=True):
        """As `Critic.q_outcomes`; an `AllOutcomes` network is evaluated once per
        example; for `UnitEdits` and a network that starts with a plain `Dense`
        layer, that layer is evaluated once per example and updated by rank one
        per outcome (`outcomes.dense_at`)."""
        network = self.target_network if target else self.online
        if isinstance(network, AllOutcomes):
            scores = network.scores(context_features(context))
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

    def update_target(self, tau):
        """`Qbar <- (1 - tau) Qbar + tau Q` (tau = 1 copies)."""
        for t, o in zip(self.target_network.weights, self.online.weights):
            t.assign((1.0 - tau) * t + tau * o)

    def call(self, features):
        return self.online(features)

    def get_config(self):
        config = super().get_config()
        config.update(
            heads=list(self.heads),
            feature_dim=self.feature_dim,
            hidden_units=list(self.hidden_units),
            network=keras.saving.serialize_keras_object(self.online),
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["network"] = keras.saving.deserialize_keras_object(config["network"])
        return cls(**config)
