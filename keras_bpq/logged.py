"""Learning a stochastic policy from logged feedback, without a simulator.

A system that serves a policy logs, for every request, the context `x`, the
action `a` the logging policy `mu` drew at one of its stochastic nodes, the
propensity `mu_i = mu(a_i | x_i)` (the exported model's `<node>_log_prob`,
exponentiated) and the cost `c_i` observed afterwards. From such a log of `n`
rows, `LoggedModel` learns a new policy `pi_theta` (a Keras model whose forward
pass calls that node) that minimises its expected cost

    V(pi) = E_x [ sum_a pi(a | x) c(x, a) ],   c(x, a) = E[c | x, a],

without ever running it. The node's sample is forced to the logged action
(`keras_bpq.graph.Recorder(forced=...)`), so `log pi(a_i | x_i)` is the node's
own log-probability, differentiable in `theta`. With the importance ratio
`w_i = min(pi(a_i | x_i) / mu_i, clip)` and a critic `Q(x, a)` regressed on the
logged costs, the estimators of `V(pi)` (their gradients are the policy
gradient) are:

| estimator | estimate of `V(pi)` on a batch | bias |
|---|---|---|
| `IPS(clip)` | `mean_i w_i c_i` | none without `clip` (if `mu > 0` wherever `pi > 0`) |
| `SNIPS(clip)` | `sum_i w_i c_i / sum_i w_i` | `O(1/n)`; invariant to a constant shift of the costs |
| `DirectMethod()` | `mean_i sum_a pi(a | x_i) Qbar(x_i, a)` | that of `Q`: `E_x sum_a pi (Q - c)` |
| `DoublyRobust(clip)` | `mean_i [sum_a pi(a | x_i) Qbar(x_i, a) + w_i (c_i - Qbar(x_i, a_i))]` | none without `clip`, for any `Q` (if `mu > 0` wherever `pi > 0`) |

`Qbar = stop_gradient(Q)`: the critic is a control variate (doubly robust:
`critic_cv` off-policy) or a model (direct method) of the costs, never
trained by the policy's objective; it trains on its own regression loss
`mean_i (Q(x_i, a_i) - c_i)^2`, with its own schedule (`LoggedModel.compile`'s
`critic_warmup_steps` and `critic_steps`). The sums over `a` run exactly over the node's
support. `DoublyRobust` is the default: unbiased like IPS, with the critic
removing most of its variance; a good critic makes it as precise as the
direct method, a bad one costs variance, never bias (given support, below).
Unbiased for a fixed policy is not the same as good to optimise on one
finite log: its IPS term weighs `c - Q`, and like IPS on shifted costs it
can push probability onto actions the log rarely tried; on actions the log
never tries it is the direct method (below).

Where the log lacks support (`U(x) = {a : mu(a | x) = 0}`, actions the
logging policy never tries in context `x`), no estimator sees their costs,
and without clipping the expectations over the log, for a policy that does
not depend on it, are exactly

    E[IPS] = V(pi) - E_x sum_{a in U(x)} pi(a | x) c(x, a)       (U credited with cost 0)
    E[DR]  = V(pi) + E_x sum_{a in U(x)} pi(a | x) (Q - c)(x, a)  (U credited with Q)
    E[DM]  = E_x sum_a pi(a | x) Q(x, a)                          (every action credited with Q)
    E[mean_i w_i] = 1 - E_x sum_{a in U(x)} pi(a | x)            (the `mean_ratio` metric)

so a policy optimised on such a log is drawn to the untried actions wherever
the critic (doubly robust, direct method) or the zero of the costs (IPS)
rates them above what they cost (Sachdeva, Su and Joachims 2020, "Off-policy
bandits with deficient support"). `LoggedModel` reports the batch mean of
`w_i` (unclipped) as the `mean_ratio` metric: for a policy that keeps to the
log's support it is 1 in expectation, and `1 - mean_ratio` estimates the
policy's probability on untried actions (BanditNet's diagnostic; on the
policy's own training log it is also lowered or raised by propensity
overfitting, so read it on held-out logged rows with `evaluate`). The
remedy is a log that explores: a logging policy with `mu > 0` wherever a
new policy may act (benchmarks/results/bandit.md learns from Fashion-MNIST
logs of both kinds: an almost deterministic logging policy and a weak one).

The logged node must have a finite support of at most `MAX_SUPPORT` outcomes
(a `Categorical`; a `Bernoulli` with up to 10 units), and its parameters must
not depend on another node's sample (those would have to be logged too).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from keras_bpq import _keras_compat
from keras_bpq import callbacks as callbacks_lib
from keras_bpq import critics as critics_lib
from keras_bpq import distribute
from keras_bpq import graph
from keras_bpq import saving as saving_lib

LOGGED_KEYS = ("action", "propensity", "cost")
MAX_SUPPORT = 1024

# What a skipped step met, in `LoggedModel`'s status variable (`_UNDONE`: its
# updates wrote a non-finite value, and the status row is that variable's index
# in `LoggedModel.step_variables()`; `_LOSS_SCALE`: the policy's gradient
# overflowed a `LossScaleOptimizer` at a loss scale of at most 1).
_OK, _BAD_PROPENSITY, _BAD_ACTION, _BAD_COST, _NONFINITE, _UNDONE, _LOSS_SCALE = range(7)


@dataclasses.dataclass(frozen=True)
class LoggedBatch:
    """What an estimator sees of one batch of logged feedback (rows `i`).

    Attributes:
      log_pi: `log pi(a_i | x_i)` under the policy being learned, `[batch]`,
        differentiable in its weights.
      propensity: `mu_i`, the logging policy's probability of `a_i`, `[batch]`.
      cost: the observed cost `c_i`, `[batch]`.
      probs: `pi(a | x_i)` for every outcome `a` of the support, `[batch, S]`,
        differentiable; None for estimators without a critic.
      q: `Qbar(x_i, a)` for every outcome, `[batch, S]`, without gradient; None
        for estimators without a critic.
      q_logged: `Qbar(x_i, a_i)`, `[batch]`, without gradient, or None.
    """

    log_pi: tf.Tensor
    propensity: tf.Tensor
    cost: tf.Tensor
    probs: Optional[tf.Tensor] = None
    q: Optional[tf.Tensor] = None
    q_logged: Optional[tf.Tensor] = None

    def ratio(self, clip: Optional[float] = None) -> tf.Tensor:
        """`w_i = pi(a_i | x_i) / mu_i`, clipped at `clip` (no gradient where clipped)."""
        ratio = tf.exp(self.log_pi - tf.math.log(self.propensity))
        return ratio if clip is None else tf.minimum(ratio, clip)

    def expected_q(self) -> tf.Tensor:
        """`sum_a pi(a | x_i) Qbar(x_i, a)`, exact over the support, `[batch]`."""
        return tf.reduce_sum(self.probs * self.q, axis=1)


class Estimator:
    """An off-policy estimator of the policy's expected cost `V(pi)`.

    `value(batch)` is a scalar estimate of `V(pi)` from a `LoggedBatch`; its
    gradient in the policy's weights is the estimator's policy gradient.
    `uses_critic` says whether it needs `Q(x, a)`.
    """

    name: Optional[str] = None
    uses_critic: bool = False

    def __init__(self, clip: Optional[float] = None) -> None:
        if clip is not None:
            if isinstance(clip, bool) or not isinstance(clip, (int, float, np.number)):
                raise TypeError(f"{type(self).__name__}: clip must be a number or None; got {clip!r}.")
            if not math.isfinite(clip) or clip <= 0:
                raise ValueError(
                    f"{type(self).__name__}: clip must be finite and > 0 (the largest importance "
                    f"ratio pi/mu kept); got {clip}. Pass clip=None for no clipping."
                )
            clip = float(clip)
        self.clip = clip

    def value(self, batch: LoggedBatch) -> tf.Tensor:
        raise NotImplementedError

    def get_config(self) -> Dict[str, Any]:
        return {"clip": self.clip}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Estimator:
        return cls(**config)

    def __repr__(self):
        return f"{type(self).__name__}(clip={self.clip})"


@keras.saving.register_keras_serializable(package="keras_bpq.logged")
class IPS(Estimator):
    """Inverse propensity scoring: `V = mean_i w_i c_i`, `w_i = min(pi(a_i|x_i) / mu_i, clip)`.

    Unbiased without clipping (`E_{a ~ mu}[pi(a|x)/mu(a|x) c(x, a)] = sum_a
    pi(a|x) c(x, a)`, given `mu > 0` wherever `pi > 0`), and so is its gradient
    `mean_i w_i c_i grad log pi(a_i | x_i)`. Its variance grows with the
    ratios; clipping them at `clip` trades it for a bias towards lower cost.

    Args:
      clip: the largest ratio kept, or None (no clipping).
    """

    name = "ips"

    def value(self, batch: LoggedBatch) -> tf.Tensor:
        return tf.reduce_mean(batch.ratio(self.clip) * batch.cost)


@keras.saving.register_keras_serializable(package="keras_bpq.logged")
class SNIPS(Estimator):
    """Self-normalised IPS: `V = sum_i w_i c_i / sum_i w_i`.

    Divides by the batch mean of the ratios (whose expectation is 1): biased by
    `O(1/n)` in the batch size `n` (with `n = 1` it is `c_1`, whose gradient is
    zero), but invariant to adding a constant to every cost and of much lower
    variance than IPS when the ratios vary (Swaminathan and Joachims, 2015).

    Args:
      clip: the largest ratio kept, or None (no clipping).
    """

    name = "snips"

    def value(self, batch: LoggedBatch) -> tf.Tensor:
        ratio = batch.ratio(self.clip)
        return tf.math.divide_no_nan(tf.reduce_sum(ratio * batch.cost), tf.reduce_sum(ratio))


@keras.saving.register_keras_serializable(package="keras_bpq.logged")
class DirectMethod(Estimator):
    """The direct method: `V = mean_i sum_a pi(a | x_i) Qbar(x_i, a)`.

    Uses the critic as a model of the costs, exactly over the node's support,
    and no propensity. Its variance is low; its bias is the critic's,
    `E_x sum_a pi(a|x) (Q(x, a) - c(x, a))` (zero for an exact `Q`), and the
    critic is fitted where `mu` acts, not where `pi` does.
    """

    name = "direct_method"
    uses_critic = True

    def __init__(self) -> None:
        super().__init__(clip=None)

    def value(self, batch: LoggedBatch) -> tf.Tensor:
        return tf.reduce_mean(batch.expected_q())

    def get_config(self) -> Dict[str, Any]:
        return {}

    def __repr__(self):
        return "DirectMethod()"


@keras.saving.register_keras_serializable(package="keras_bpq.logged")
class DoublyRobust(Estimator):
    """Doubly robust (recommended): the direct method plus IPS on the critic's residual,

    `V = mean_i [sum_a pi(a | x_i) Qbar(x_i, a) + w_i (c_i - Qbar(x_i, a_i))]`.

    The critic is a control variate (the package's `critic_cv`, off-policy):
    the correction has expectation `sum_a pi(a|x) (c(x, a) - Q(x, a))`, so the
    estimate and its gradient are unbiased for any `Q` without clipping (Dudik
    et al., 2011), and its variance shrinks as `Q` approaches `c`.

    Args:
      clip: the largest ratio kept, or None (no clipping).
    """

    name = "doubly_robust"
    uses_critic = True

    def value(self, batch: LoggedBatch) -> tf.Tensor:
        correction = batch.ratio(self.clip) * (batch.cost - batch.q_logged)
        return tf.reduce_mean(batch.expected_q() + correction)


_BY_NAME = {cls.name: cls for cls in (IPS, SNIPS, DirectMethod, DoublyRobust)}


def get(identifier: Union[str, Estimator]) -> Estimator:
    """An `Estimator` from itself or its name (`"ips"`, `"snips"`, `"direct_method"`,
    `"doubly_robust"`; default settings)."""
    if isinstance(identifier, Estimator):
        return identifier
    if isinstance(identifier, str) and identifier in _BY_NAME:
        return _BY_NAME[identifier]()
    raise ValueError(
        f"Unknown logged-feedback estimator {identifier!r}: pass one of {sorted(_BY_NAME)} or "
        "an instance such as keras_bpq.logged.DoublyRobust(clip=...)."
    )


class CostCritic(keras.layers.Layer, critics_lib.Critic):
    """`Q(x, a)`: a Keras network on the flattened inputs and the action,
    regressed on the observed costs.

    A bandit's target is the cost itself (nothing bootstraps), so this critic
    has no target copy: `q(..., target=...)` always reads the network. A
    `LoggedModel` saves its network and rebuilds it.

    Args:
      feature_dim: the size of the flattened inputs plus the action.
      network: a Keras model `[batch, feature_dim] -> [batch, 1]`, or None for
        `critics.default_critic_model(1, hidden_units)`.
      hidden_units: hidden sizes of the default network.
    """

    heads = ("cost",)

    def __init__(
        self,
        feature_dim: int,
        network: Optional[keras.layers.Layer] = None,
        hidden_units: Sequence[int] = (64, 64),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.feature_dim = int(feature_dim)
        self.hidden_units = tuple(hidden_units)
        if network is None:
            network = critics_lib.default_critic_model(1, self.hidden_units, name=f"{self.name}_network")
        self.network = network
        self.network.build((None, self.feature_dim))
        out = tuple(self.network.compute_output_shape((None, self.feature_dim)))
        if out[-1] != 1:
            raise ValueError(
                f"Critic {self.name!r}: its network must map [batch, {self.feature_dim}] features "
                f"(inputs and action) to one Q-value [batch, 1]; it outputs shape {out}."
            )
        self.built = True

    def q(self, context: Mapping[str, Any], values: tf.Tensor, target: bool = True) -> tf.Tensor:
        features = tf.concat(
            [critics_lib.context_features(context), critics_lib.flatten_rows(values)], axis=-1
        )
        return tf.cast(self.network(features), tf.float32)

    def call(self, features: tf.Tensor) -> tf.Tensor:
        return self.network(features)


@dataclasses.dataclass(frozen=True)
class _NodeFacts:
    """What the policy's trace says of the logged node."""

    distribution: str
    event_shape: tuple
    support: np.ndarray  # [S, *event_shape]
    input_dim: int


class _LoggedGuard(keras.callbacks.Callback):
    """Stops `fit` with a clear error after a step skipped for bad logged data."""

    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        self.model.status.assign(0)

    def on_train_batch_end(self, batch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        self.model.raise_if_skipped(batch)


@keras.saving.register_keras_serializable(package="keras_bpq")
class LoggedModel(saving_lib.AtomicCheckpoints, keras.Model):
    """Trains a stochastic policy from logged feedback with `compile()` / `fit()`.

    ```python
    x = keras.Input((d,), name="x")
    action = keras_bpq.Categorical(name="action")(keras.layers.Dense(k)(x))
    policy = keras_bpq.BackpropQModel(inputs=x, outputs=action)  # exportable
    learner = keras_bpq.logged.LoggedModel(policy, node="action",
                                           estimator=keras_bpq.logged.DoublyRobust())
    learner.compile(optimizer="adam")
    learner.fit(x_log, {"action": a, "propensity": p, "cost": c}, epochs=5)
    policy.export("serving/policy/2")
    ```

    Targets are a dict: `action`, the logged sample of the node in the form the
    node returns it (one-hot `[batch, K]` for a `Categorical`, as the exported
    model serves it); `propensity`, `mu(a_i | x_i)` in `(0, 1]` (`[batch]`);
    `cost`, the observed cost (`[batch]`; a reward `r` is the cost `-r`).

    Every step minimises the estimator's `value` (reported as `loss`: the
    estimated expected cost of the policy) in the policy's weights and, for
    estimators with a critic, the critic's regression loss (`critic_loss`) in
    the critic's weights, with `critic_optimizer`; the `mean_ratio` metric is
    the mean importance ratio `pi(a_i | x_i) / mu_i` (below 1 in expectation
    by the policy's probability on actions the log never tries; the module
    docstring). A step whose logged data is
    invalid (a propensity not in `(0, 1]`, an action outside the node's
    support, a non-finite cost) or whose estimate or gradient is not finite
    changes nothing, and `fit` (or `train_on_batch`) then raises a
    ValueError naming the input, the row and what to change. A step whose
    updates would write a NaN or inf into any weight, critic weight or
    optimizer slot (Adam's squared gradients overflow on a cost of 1e30, say)
    is undone whole, and `fit` (or `train_on_batch`) then raises a
    `FloatingPointError` naming that variable. `evaluate` reports the same
    estimates without training, and raises like `fit` for invalid data. Runs
    on one device.

    `save`, `save_weights` and `load_weights` are a `BackpropQModel`'s
    (`saving.AtomicCheckpoints`): a file is written atomically (a killed save
    leaves the previous one), with both optimizers' slots, and a model
    holding a NaN or inf is refused, naming the variables.

    Args:
      policy: a functional Keras model (a `BackpropQModel` built with
        `inputs=`/`outputs=` exports with `keras_bpq.export`) whose forward pass
        calls the node `node` once; its other nodes, if any, must not be
        ancestors of `node`.
      node: the name of the logged node (its layer's name).
      estimator: an `Estimator` (`IPS`, `SNIPS`, `DirectMethod`,
        `DoublyRobust`) or its name; default `DoublyRobust()`.
      critic: for estimators with a critic: None (an MLP with
        `critic_hidden_units`), a Keras network `[batch, features] -> [batch, 1]`
        on the flattened inputs and the action, or a `keras_bpq.critics.Critic`
        with one head (used as given; trained only if it is a Keras layer with
        trainable weights).
      critic_hidden_units: hidden sizes of the default critic.
    """

    def __init__(
        self,
        policy: keras.Model,
        node: str,
        estimator: Union[None, str, Estimator] = None,
        critic: Union[None, keras.layers.Layer, critics_lib.Critic] = None,
        critic_hidden_units: Sequence[int] = (64, 64),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(policy, keras.Model):
            raise TypeError(f"LoggedModel: policy must be a keras.Model; got {type(policy).__name__}.")
        self.policy = policy
        self.node = str(node)
        self.estimator = get(DoublyRobust() if estimator is None else estimator)
        self.critic_hidden_units = tuple(critic_hidden_units)
        self._facts = _trace(policy, self.node)
        self.critic = None
        if self.estimator.uses_critic:
            self.critic = _make_critic(critic, self._facts, self.critic_hidden_units, self.node)
        elif critic is not None:
            raise ValueError(
                f"LoggedModel: estimator {self.estimator!r} uses no critic; drop critic= or "
                "use DirectMethod() or DoublyRobust()."
            )
        self.critic_optimizer = None
        self.status = self.add_weight(name="status", shape=(), dtype="int32", initializer="zeros", trainable=False)
        self.status_row = self.add_weight(
            name="status_row", shape=(), dtype="int32", initializer="zeros", trainable=False
        )
        self.steps = self.add_weight(name="steps", shape=(), dtype="int64", initializer="zeros", trainable=False)
        self.critic_steps, self.critic_warmup_steps = 1, 0
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.critic_loss_tracker = keras.metrics.Mean(name="critic_loss")
        self.mean_ratio_tracker = keras.metrics.Mean(name="mean_ratio")
        self.built = True

    # -- forward -----------------------------------------------------------
    def call(self, inputs: Any, training: Optional[bool] = None) -> Any:
        return self.policy(inputs, training=training)

    @property
    def policy_variables(self) -> List[tf.Variable]:
        """The policy's trainable weights (a `BackpropQModel`'s actor variables)."""
        actor = getattr(self.policy, "actor_variables", None)
        return list(actor if actor is not None else self.policy.trainable_variables)

    @property
    def critic_variables(self) -> List[tf.Variable]:
        """The critic's trainable weights (none without a trainable critic)."""
        if isinstance(self.critic, keras.layers.Layer):
            return list(self.critic.trainable_variables)
        return []

    def estimate(self, x: Any, logged: Mapping[str, Any]) -> Dict[str, tf.Tensor]:
        """The estimator's estimate of `V(pi)` on one batch of logged feedback.

        Args:
          x: the policy's inputs.
          logged: `{"action": ..., "propensity": ..., "cost": ...}` (see the class).

        Returns a dict: `loss`, the estimate (a scalar whose gradient in
        `policy_variables` is the policy gradient); `critic_loss`, the
        critic's mean squared error on the logged costs (0 without a critic;
        gradient in `critic_variables` only); `mean_ratio`, `mean_i pi(a_i |
        x_i) / mu_i` unclipped and without gradient (its expectation is the
        policy's probability on actions the logging policy tries, 1 when
        `mu > 0` wherever `pi > 0`; the module docstring); `status`, 0 if the
        batch is valid, else the code of its first problem; `row`, that
        problem's row.
        """
        action, propensity, cost = self._checked(logged)
        with graph.Recorder(forced={self.node: action}) as recorder:
            self.policy(x, training=True)
        record = next(r for r in recorder.nodes if r.name == self.node)
        support = tf.constant(self._facts.support)
        flat_support = tf.reshape(support, [support.shape[0], -1])
        flat_action = tf.reshape(action, [-1, flat_support.shape[1]])
        matches = tf.cast(
            tf.reduce_all(tf.equal(flat_action[:, None, :], flat_support[None]), axis=-1), tf.float32
        )
        checks = [
            (_BAD_PROPENSITY, tf.logical_and(
                tf.math.is_finite(propensity), tf.logical_and(propensity > 0.0, propensity <= 1.0)
            )),
            (_BAD_ACTION, tf.reduce_any(matches > 0.0, axis=1)),
            (_BAD_COST, tf.math.is_finite(cost)),
        ]
        status, row = tf.constant(_OK), tf.constant(0)
        for code, valid in reversed(checks):
            bad = tf.logical_not(valid)
            found = tf.reduce_any(bad)
            status = tf.where(found, code, status)
            row = tf.where(found, tf.argmax(tf.cast(bad, tf.int32), output_type=tf.int32), row)
        # Invalid rows must not make the estimate NaN (the step is skipped anyway).
        safe_propensity = tf.where(checks[0][1], propensity, 1.0)
        batch = {"log_pi": record.log_prob(), "propensity": safe_propensity, "cost": cost}
        critic_loss = tf.constant(0.0)
        if self.critic is not None:
            values, log_probs = record.support_log_probs(support)
            q = self.critic.q_outcomes({"inputs": x}, values, target=False)[..., 0]
            q_logged = tf.reduce_sum(matches * q, axis=1)
            critic_loss = tf.reduce_mean(tf.square(q_logged - cost))
            batch.update(
                probs=tf.exp(log_probs), q=tf.stop_gradient(q), q_logged=tf.stop_gradient(q_logged)
            )
        batch = LoggedBatch(**batch)
        return {
            "loss": self.estimator.value(batch),
            "critic_loss": critic_loss,
            "mean_ratio": tf.stop_gradient(tf.reduce_mean(batch.ratio())),
            "status": status,
            "row": row,
        }

    def _checked(self, logged):
        """`(action, propensity, cost)` as float32 tensors of the right shapes;
        a ValueError naming the input otherwise (at trace time)."""
        if not isinstance(logged, dict):
            raise ValueError(
                f"LoggedModel: the targets must be a dict with keys {list(LOGGED_KEYS)} (the "
                f"logged action of node {self.node!r}, its propensity and the observed cost); "
                f"got {type(logged).__name__}."
            )
        missing = [k for k in LOGGED_KEYS if k not in logged]
        extra = sorted(set(logged) - set(LOGGED_KEYS))
        if missing or extra:
            raise ValueError(
                f"LoggedModel: the targets must have exactly the keys {list(LOGGED_KEYS)}; "
                + (f"missing {missing}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"unknown {extra}" if extra else "")
                + "."
            )
        action = tf.cast(logged["action"], tf.float32)
        event = self._facts.event_shape
        if action.shape.rank is not None and tuple(action.shape[1:]) != event:
            hint = {"Categorical": " (one-hot, as the node and the exported model return it)",
                    "Bernoulli": " (0/1 per unit)"}.get(self._facts.distribution, "")
            raise ValueError(
                f"LoggedModel: `action` must hold one sample of node {self.node!r} per row, shape "
                f"[batch, {', '.join(map(str, event))}]{hint}; got shape {tuple(action.shape)}."
            )
        columns = {}
        for key in ("propensity", "cost"):
            value = tf.cast(logged[key], tf.float32)
            if value.shape.rank == 2 and value.shape[1] == 1:
                value = value[:, 0]
            if value.shape.rank != 1:
                raise ValueError(
                    f"LoggedModel: `{key}` must hold one number per row, shape [batch]; got "
                    f"shape {tuple(value.shape)}."
                )
            columns[key] = value
        return action, columns["propensity"], columns["cost"]

    # -- training ------------------------------------------------------------
    def compile(
        self,
        optimizer: Union[str, keras.optimizers.Optimizer] = "adam",
        critic_optimizer: Union[None, str, keras.optimizers.Optimizer] = None,
        critic_steps: int = 1,
        critic_warmup_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        """Configures training.

        Args:
          optimizer: the policy's optimizer.
          critic_optimizer: the critic's (default: a fresh `Adam(1e-3)`).
          critic_steps: critic updates per policy update (on the same batch),
            as in `BackpropQModel.compile`.
          critic_warmup_steps: steps at the start of training (counted by
            `steps`, saved with the model) that train only the critic, so that
            the policy does not follow the offsets of a critic still near its
            initialisation. Neither option changes what the estimators
            estimate: `Qbar` stays a stop-gradient control variate (doubly
            robust) or cost model (direct method).
          **kwargs: passed on to `keras.Model.compile` (`jit_compile`,
            `steps_per_execution`, `run_eagerly`, ...); no `loss` or `metrics`:
            the estimator is the loss.
        """
        for key in ("loss", "metrics", "weighted_metrics", "loss_weights"):
            if kwargs.get(key) is not None:
                raise ValueError(
                    f"LoggedModel.compile does not take {key}=: the estimator "
                    f"({self.estimator!r}) is the loss."
                )
        for key, value, least in (("critic_steps", critic_steps, 1), ("critic_warmup_steps", critic_warmup_steps, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ValueError(f"LoggedModel.compile: {key} must be an integer >= {least}; got {value!r}.")
        if (critic_steps != 1 or critic_warmup_steps) and not self.critic_variables:
            raise ValueError(
                f"LoggedModel.compile: critic_steps and critic_warmup_steps schedule the critic's "
                f"training; this model has no trainable critic (estimator {self.estimator!r})."
            )
        super().compile(optimizer=optimizer, **kwargs)
        self.critic_optimizer = keras.optimizers.get(critic_optimizer or keras.optimizers.Adam(1e-3))
        self.critic_steps, self.critic_warmup_steps = int(critic_steps), int(critic_warmup_steps)

    @property
    def metrics(self) -> List[keras.metrics.Metric]:
        return [self.loss_tracker, self.critic_loss_tracker, self.mean_ratio_tracker]

    def build_training_state(self) -> bool:
        """Creates now what training creates on first use: both optimizers'
        slots for the policy's and the critic's weights (the critic is built
        with the model). Saving, loading and `fit` call it, so every
        checkpoint has the layout of a model that has trained. Returns False
        (doing nothing) while the model is not compiled."""
        if getattr(self, "optimizer", None) is None:
            return False
        if not self.optimizer.built:
            self.optimizer.build(self.policy_variables)
        if not self.critic_optimizer.built:
            self.critic_optimizer.build(self.critic_variables)
        return True

    def step_variables(self) -> List[Tuple[tf.Variable, str]]:
        """`[(variable, role)]`: every variable a training step may write (the
        policy's and the critic's weights, the step counter, both optimizers'
        variables; `callbacks.step_variables`), which a step that would leave
        a non-finite value in any of them sets back whole."""
        report = (self.status, self.status_row)  # written after the check
        return callbacks_lib.step_variables(
            [v for v in self.weights if not any(v is r for r in report)], None, self.critic_variables,
            saving_lib.optimizers(self, "policy"),
        )

    def train_step(self, data: Any) -> Dict[str, Any]:
        x, logged = self._unpack(data)
        policy_variables, critic_variables = self.policy_variables, self.critic_variables
        # What the step may write, read before anything writes it (the forward
        # pass too: other nodes of the policy advance their seed generators).
        written = self.step_variables()
        saved = [tf.identity(v.value) for v, _ in written]
        with tf.GradientTape(persistent=True) as tape:
            out = self.estimate(x, logged)
            # Loss scaling (mixed_float16 wraps the optimizer in a
            # LossScaleOptimizer; or loss_scale_factor=): apply() unscales.
            scaled = self.optimizer.scale_loss(out["loss"])
        grads = tape.gradient(scaled, policy_variables)
        critic_grads = tape.gradient(out["critic_loss"], critic_variables) if critic_variables else []
        del tape
        # A LossScaleOptimizer skips a step whose scaled gradient overflows and
        # halves its scale: the step is skipped whole then (`overflow`), and
        # stops `fit` only when it overflowed at a scale of at most 1, where
        # the gradient of the estimate itself overflows (as BackpropQModel).
        loss_scaled = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        status = _status(out, [g for g in critic_grads + ([] if loss_scaled else grads) if g is not None])
        overflow = None
        if loss_scaled:
            overflow = distribute.overflow(grads, self.steps >= self.critic_warmup_steps)
            scale = tf.cast(_keras_compat.loss_scale(self.optimizer), tf.float32)
            persistent = tf.logical_and(tf.logical_and(overflow, scale <= 1.0), tf.equal(status, _OK))
            status = tf.where(persistent, _LOSS_SCALE, status)

        def update_critic(critic_grads, critic_inputs=None):
            if not critic_variables:
                return
            self.critic_optimizer.apply(critic_grads, critic_variables)
            for _ in range(self.critic_steps - 1):
                with tf.GradientTape() as critic_tape:
                    critic_loss = self.estimate(x, logged)["critic_loss"]
                self.critic_optimizer.apply(critic_tape.gradient(critic_loss, critic_variables), critic_variables)

        # Every update of the step, or none (distribute.apply_updates: the
        # critic, then the policy after the critic's warm-up, then the counter).
        updates = distribute.StepUpdates(
            critics=update_critic,
            actor=lambda grads: self.optimizer.apply(grads, policy_variables),
            state=lambda *signals: self.steps.assign_add(1),
            target_copies=lambda: None,
            actor_ready=lambda: self.steps >= self.critic_warmup_steps,
            warmup=self.critic_warmup_steps,
        )
        values = distribute.StepValues(grads, critic_grads, means=[], has_data=None, tuning=[])
        undone = distribute.apply_updates(
            tf.not_equal(status, _OK), updates, values, [v for v, _ in written], saved, overflow
        )
        # A step undone for a non-finite value it wrote names that variable.
        undone_now = tf.logical_and(tf.equal(status, _OK), undone >= 0)
        return self._update_metrics(
            out, tf.where(undone_now, _UNDONE, status), tf.where(undone_now, undone, out["row"])
        )

    def test_step(self, data: Any) -> Dict[str, Any]:
        x, logged = self._unpack(data)
        out = self.estimate(x, logged)
        return self._update_metrics(out, _status(out), out["row"])

    def _update_metrics(self, out, status, row):
        """Keeps the first problem seen (`status`, `row`) and adds the batch's
        estimates to the metrics unless it had one."""
        first = tf.equal(self.status, _OK)
        self.status_row.assign(tf.where(first, row, self.status_row))
        self.status.assign(tf.where(first, status, self.status))
        ok = tf.equal(status, _OK)
        weight = tf.cast(ok, tf.float32)
        for tracker, key in ((self.loss_tracker, "loss"), (self.critic_loss_tracker, "critic_loss"),
                             (self.mean_ratio_tracker, "mean_ratio")):
            tracker.update_state(tf.where(ok, out[key], 0.0), sample_weight=weight)
        return {m.name: m.result() for m in self.metrics}

    def _unpack(self, data):
        x, logged, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:
            raise ValueError(
                "LoggedModel does not take sample weights: the propensities weight the rows. "
                "Repeat or drop rows instead."
            )
        return x, logged

    def raise_if_skipped(self, batch: Optional[int] = None) -> None:
        """Raises a ValueError if a step (of `fit`, `train_on_batch` or `evaluate`)
        met invalid logged data or a non-finite estimate or gradient, naming
        why, or a `FloatingPointError` naming the variable if a training step
        was undone for a non-finite value it would have written, or saying so
        if the policy's gradient overflowed the `LossScaleOptimizer` of
        `mixed_float16` at a loss scale of at most 1."""
        code = int(self.status.numpy())
        if code == _OK:
            return
        row = int(self.status_row.numpy())
        self.status.assign(0)
        self.status_row.assign(0)
        if code == _UNDONE:
            raise callbacks_lib.nonfinite_error(self.name, None, -2 - row, 0, self.step_variables())
        if code == _LOSS_SCALE:
            raise FloatingPointError(
                f"LoggedModel: the policy's gradient was not finite in a training step at a loss scale "
                "of at most 1, although the estimate was finite. The LossScaleOptimizer (of the "
                "mixed_float16 policy) skips the update of a step whose scaled gradient overflows and "
                "halves its loss scale; at a scale of at most 1 the gradient itself overflows float16 "
                "(it tops at 65504), which loss scaling cannot cure. Nothing that step would have "
                "written was kept, its loss scale included; every earlier step whose gradient "
                "overflowed was skipped whole too, but for the halving of the loss scale. Scale the "
                "logged costs down (divide them by a constant so that they are of order 1), or train "
                "under the float32 or mixed_bfloat16 policy."
            )
        where = f"row {row} of " if code != _NONFINITE else ""
        where += "a batch" if batch is None else f"batch {batch}"
        problem = {
            _BAD_PROPENSITY: "`propensity` must be finite, > 0 and <= 1: the logging policy's "
            "probability of the logged action (exp(<node>_log_prob) as the exported model serves "
            "it); drop the row or log its propensity",
            _BAD_ACTION: f"`action` is not an outcome of node {self.node!r} (a Categorical's "
            "action is one-hot, a Bernoulli's 0/1 per unit); log the sample the node served",
            _BAD_COST: "`cost` is not finite; drop the row or fix its cost",
            _NONFINITE: "the estimate or a gradient is not finite (importance ratios pi/mu too "
            "large for float32?); pass clip= to the estimator or lower the learning rate",
        }[code]
        raise ValueError(f"LoggedModel: the step on {where} was skipped (nothing changed): {problem}.")

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        self.status.assign(0)
        logs = super().evaluate(*args, **kwargs)
        self.raise_if_skipped()
        return logs

    def fit(self, *args: Any, **kwargs: Any) -> keras.callbacks.History:
        self.build_training_state()
        callbacks = [_LoggedGuard()] + list(kwargs.pop("callbacks", None) or [])
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def train_on_batch(self, *args: Any, **kwargs: Any) -> Any:
        self.build_training_state()
        logs = super().train_on_batch(*args, **kwargs)
        self.raise_if_skipped()
        return logs

    # -- saving --------------------------------------------------------------
    def get_config(self) -> Dict[str, Any]:
        if self.critic is not None and not isinstance(self.critic, CostCritic):
            raise ValueError(
                f"LoggedModel {self.name!r} holds a critic given as a {type(self.critic).__name__} "
                "object, which cannot be saved; pass a Keras network as critic= to save the model."
            )
        return {
            "name": self.name,
            "trainable": self.trainable,
            "policy": keras.saving.serialize_keras_object(self.policy),
            "node": self.node,
            "estimator": keras.saving.serialize_keras_object(self.estimator),
            "critic": None if self.critic is None else keras.saving.serialize_keras_object(self.critic.network),
            "critic_hidden_units": list(self.critic_hidden_units),
        }

    @classmethod
    def from_config(cls, config: Dict[str, Any], custom_objects: Optional[Mapping[str, Any]] = None) -> LoggedModel:
        config = dict(config)
        for key in ("policy", "estimator", "critic"):
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(config[key], custom_objects=custom_objects)
        return cls(**config)

    def get_compile_config(self) -> Optional[Dict[str, Any]]:
        config = super().get_compile_config()
        if config is not None and self.critic_optimizer is not None:
            config["critic_optimizer"] = keras.saving.serialize_keras_object(self.critic_optimizer)
            config.update(critic_steps=self.critic_steps, critic_warmup_steps=self.critic_warmup_steps)
        return config

    def compile_from_config(self, config: Dict[str, Any]) -> None:
        """Recompiles a loaded model and creates both optimizers' slots."""
        config = {k: keras.saving.deserialize_keras_object(v) for k, v in config.items()}
        self.compile(**{k: v for k, v in config.items() if v is not None})
        self.build_training_state()


def _status(out, gradients=()):
    """The status of `estimate`'s `out`, or `_NONFINITE` for a valid batch whose
    estimates (or `gradients`) are not finite."""
    values = [out["loss"], out["critic_loss"]] + [getattr(g, "values", g) for g in gradients]
    finite = distribute.finite([tf.convert_to_tensor(v) for v in values])
    return tf.where(tf.logical_and(tf.equal(out["status"], _OK), tf.logical_not(finite)), _NONFINITE, out["status"])


def _trace(policy, node):
    """Traces the policy once and returns the `_NodeFacts` of `node`; a
    ValueError naming what is wrong otherwise."""
    spec = policy.input_signature() if hasattr(policy, "input_signature") else None
    if spec is None and getattr(policy, "inputs", None):
        spec = tf.nest.map_structure(graph.batchless_spec, _keras_compat.functional_inputs(policy))
    if spec is None:
        raise ValueError(
            f"LoggedModel: policy {policy.name!r} does not know its inputs; build it as a "
            "functional model (keras.Input(...)) or a BackpropQModel(inputs=..., outputs=...)."
        )
    found = {}

    def probe(inputs):
        with graph.Recorder() as recorder:
            policy(inputs, training=True)
        found["scg"] = graph.structure_from_records(recorder.nodes, {}, inputs)
        found["layers"] = {r.name: r.layer for r in recorder.nodes}
        return 0

    tf.function(probe, autograph=False).get_concrete_function(spec)
    scg = found["scg"]
    if node not in scg.node_names:
        raise ValueError(
            f"LoggedModel: the policy {policy.name!r} calls no node {node!r}; its nodes are "
            f"{list(scg.node_names)}."
        )
    info = scg.node(node)
    if info.ancestors:
        raise ValueError(
            f"LoggedModel: node {node!r}'s parameters depend on the samples of nodes "
            f"{list(info.ancestors)}, which the log does not hold; learn from logs of a policy "
            f"whose logged node depends on its inputs only."
        )
    support = found["layers"][node].support(info.event_shape)
    if support is None or len(support) > MAX_SUPPORT:
        size = "no finite support" if support is None else f"{len(support)} outcomes"
        raise ValueError(
            f"LoggedModel: node {node!r} ({info.distribution}{list(info.event_shape)}) has {size}; "
            f"logged learning needs at most {MAX_SUPPORT} outcomes (a Categorical, or a Bernoulli "
            "with up to 10 units)."
        )
    input_dim = sum(int(np.prod(s.shape[1:])) for s in tf.nest.flatten(spec))
    return _NodeFacts(info.distribution, info.event_shape, np.asarray(support, np.float32), input_dim)


def _make_critic(critic, facts, hidden_units, node):
    """The critic: `critic` if it is a `critics.Critic`, else a `CostCritic` on `critic`."""
    if isinstance(critic, critics_lib.Critic):
        if len(critic.heads) != 1:
            raise ValueError(
                f"LoggedModel: a critic given as a Critic must have one head (the cost); "
                f"got heads {list(critic.heads)}."
            )
        return critic
    if critic is not None and not isinstance(critic, keras.layers.Layer):
        raise TypeError(
            "LoggedModel: critic= must be None, a Keras network [batch, features] -> [batch, 1] "
            f"or a keras_bpq.critics.Critic; got {type(critic).__name__}."
        )
    feature_dim = facts.input_dim + int(np.prod(facts.event_shape))
    return CostCritic(feature_dim, network=critic, hidden_units=hidden_units, name=f"{node}_critic")
