"""`TrainingState`: the one tracked home of what training creates besides the
actor's weights."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from keras_bpq import costs as costs_lib
from keras_bpq import critics as critics_lib
from keras_bpq import replay as replay_lib

if TYPE_CHECKING:
    from keras_bpq import estimators as estimators_lib
    from keras_bpq import forward as forward_lib
    from keras_bpq import graph


@keras.saving.register_keras_serializable(package="keras_bpq")
class TrainingState(keras.layers.Layer):
    """Estimator state, critics and their target copies, the replay buffer of
    `compile(replay=...)`, the cost and critic metrics, the step's status and
    counter, and where `fit` stands.

    A model holds one, as `BackpropQModel.training_state`: created unbuilt with
    the model and filled once (`setup`) when the SCG is known, so its
    variables checkpoint, restore and distribute with the model.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.node_state = {}
        self.critics = {}
        self.replay_buffer = None  # a replay.ReplayBuffer with compile(replay=...)
        self.cost_metrics = []
        self.critic_metrics = {}
        # State is updated identically on every replica: keep the first's.
        self.status = self.add_weight(
            name="status", shape=(), dtype="int32", initializer="zeros", trainable=False,
            aggregation="only_first_replica",
        )
        # The batch row of a Categorical mask that allowed no outcome, when
        # `status` names such a node (under XLA, where its assertion is dropped).
        self.status_row = self.add_weight(
            name="status_row", shape=(), dtype="int32", initializer="zeros", trainable=False,
            aggregation="only_first_replica",
        )
        self.steps = self.add_weight(
            name="steps", shape=(), dtype="int64", initializer="zeros", trainable=False,
            aggregation="only_first_replica",
        )
        # Where `fit` stands (epoch, batches of it done; -1 outside fit), saved
        # with every checkpoint so a restart resumes mid-epoch exactly
        # (keras_bpq.callbacks.FitPosition).
        self.fit_epoch = self.add_weight(
            name="fit_epoch", shape=(), dtype="int64", initializer=keras.initializers.Constant(-1),
            trainable=False, aggregation="only_first_replica",
        )
        self.fit_batch = self.add_weight(
            name="fit_batch", shape=(), dtype="int64", initializer=keras.initializers.Constant(-1),
            trainable=False, aggregation="only_first_replica",
        )

    def setup(
        self,
        scg: graph.SCG,
        estimators: Mapping[str, estimators_lib.Estimator],
        critic_heads: Mapping[str, Tuple[str, ...]],
        feature_dims: Mapping[str, int],
        critic_models: Mapping[str, object],
        hidden_units: Tuple[int, ...],
        replay: Optional[Tuple[int, replay_lib.ReplayLayout]] = None,
    ) -> None:
        """Creates every node's estimator state, the critics of `critic_heads`
        and, for `replay` = `(capacity, replay.ReplayLayout)`, the replay buffer."""
        for info in scg.nodes:
            self.node_state[info.name] = estimators[info.name].create_state(
                info, self.add_state
            )
        for name, heads in critic_heads.items():
            given = critic_models.get(name)
            if critics_lib.is_injected(given):
                self.critics[name] = given
                continue
            self.critics[name] = critics_lib.NodeCritic(
                heads,
                feature_dims[name],
                network=given,
                hidden_units=hidden_units,
                name=f"{name.replace('@', '_')}_critic",
            )
            self.critic_metrics[name] = [
                keras.metrics.Mean(name=metric) for metric in costs_lib.node_metric_names(name)
            ]
        if replay is not None:
            self.replay_buffer = replay_lib.ReplayBuffer(*replay, name="replay_buffer")
        self.cost_metrics = [keras.metrics.Mean(name=name) for name in scg.costs]
        self.built = True

    @property
    def learned_critics(self) -> Dict[str, critics_lib.NodeCritic]:
        """`{node: NodeCritic}`: the critics trained here (not injected `Critic`s)."""
        return {n: c for n, c in self.critics.items() if isinstance(c, critics_lib.NodeCritic)}

    @property
    def replay_variables(self) -> List[tf.Variable]:
        """The replay buffer's variables (none without replay)."""
        return [] if self.replay_buffer is None else list(self.replay_buffer.weights)

    def add_state(
        self,
        name: str,
        shape: Sequence[int],
        dtype: tf.DType | str,
        initializer: str | Callable = "zeros",
    ) -> tf.Variable:
        """A non-trainable state variable (`Estimator.create_state`'s `add_weight`)."""
        # A layer called twice names its second node "<layer>@2"; "@" is not
        # allowed in a variable name.
        return self.add_weight(
            name=name.replace("@", "_"), shape=shape, dtype=dtype, initializer=initializer,
            trainable=False,
            aggregation="only_first_replica",
        )

    def update_estimators(
        self,
        nodes: Sequence[graph.NodeInfo],
        estimators: Mapping[str, estimators_lib.Estimator],
        means: Sequence[tf.Tensor],
        tuning: Sequence[Sequence[tf.Tensor]],
        has_data: Optional[tf.Tensor],
    ) -> None:
        """After a finite step: every node's estimator state from `means` (per
        node, the global mean of `c_X`) and its tuning gradients `tuning`, then
        the step counter. With `has_data` false (every sample weight 0) the
        estimator state stays as it is."""

        def update():
            for info, mean, gradients in zip(nodes, means, tuning):
                estimator, state = estimators[info.name], self.node_state[info.name]
                estimator.update(state, mean)
                if gradients:
                    estimator.apply_tuning(state, gradients)
            return tf.constant(0)

        tf.cond(has_data, update, lambda: tf.constant(0)) if has_data is not None else update()
        self.steps.assign_add(1)

    def past_warmup(self, warmup: int) -> tf.Tensor:
        """Whether the step counter has reached `warmup` steps (a boolean
        tensor): the actor trains from then on."""
        return self.steps >= warmup

    def update_metrics(
        self, forward: forward_lib.ForwardPass, critics: Optional[critics_lib.CriticEvaluation] = None,
        critics_due: Optional[tf.Tensor] = None,
    ) -> None:
        """Every cost's metric from a forward pass, weighted as the model's
        `loss` is (so they add up to it), and with the critics' evaluation of
        that pass, every critic's loss, TD error and Q at the sample; those
        only where `critics_due` (a boolean tensor, `critics.CriticSet.due`;
        None for always) holds."""
        sample_weight, total = forward.weights, forward.total
        for metric in self.cost_metrics:
            metric.update_state(
                costs_lib.weighted_mean(forward.costs[metric.name], sample_weight),
                sample_weight=tf.shape(total)[0],
            )
        if critics is not None:
            weight = None if critics_due is None else tf.cast(critics_due, tf.float32)
            for name, (loss_metric, td_metric, q_metric) in self.critic_metrics.items():
                loss, td_error = critics.per_node[name]
                loss_metric.update_state(loss, sample_weight=weight)
                td_metric.update_state(td_error, sample_weight=weight)
                q_metric.update_state(tf.add_n(list(critics.q_at_sample[name].values())), sample_weight=weight)

    def report(self, status: tf.Tensor, row: tf.Tensor) -> None:
        """Keeps a step's status (and mask row) unless an earlier step's is
        still unread (`BackpropQModel.raise_if_nonfinite` reads and clears it)."""
        first = tf.equal(self.status, 0)
        self.status_row.assign(tf.where(first, row, self.status_row))
        self.status.assign(tf.where(first, status, self.status))

    def take_report(self) -> Tuple[int, int]:
        """`(status, row)` as `report` kept them (`(0, 0)` when no step reported
        a problem), and clears them for the next step."""
        status = int(self.status.numpy())
        if status == 0:
            return 0, 0
        row = int(self.status_row.numpy())
        self.status.assign(0)
        self.status_row.assign(0)
        return status, row

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return inputs
