"""`BackpropQModel`: a `keras.Model` that trains stochastic computation graphs.

The model's objective is `J(theta) = E[sum_c c]`, the batch mean of every
example's total cost. One `train_step` samples every stochastic node, evaluates
the costs, and minimises the surrogate `L = sum_X L_X + sum_c c + R`, where each
node's local surrogate `L_X` comes from its estimator (`keras_bpq.estimators`)
and the costs carry ordinary gradients along deterministic paths. `R` sums the
actor's Keras regularisation losses (`add_loss`, `kernel_regularizer`, ...):
penalties differentiated directly, as `keras.Model` does, whose dependence on
the samples is not estimated (make such a term a cost if it should be).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import keras
import tensorflow as tf

from keras_bpq import _keras_compat
from keras_bpq import callbacks as callbacks_lib
from keras_bpq import costs as costs_lib
from keras_bpq import critics as critics_lib
from keras_bpq import data as data_lib
from keras_bpq import discovery
from keras_bpq import export as export_lib
from keras_bpq import forward as forward_lib
from keras_bpq import graph
from keras_bpq import replay as replay_lib
from keras_bpq import saving as saving_lib
from keras_bpq import state as state_lib
from keras_bpq import step as step_lib

if TYPE_CHECKING:
    from keras_bpq import estimators as estimators_lib
    from keras_bpq import q_values


@keras.saving.register_keras_serializable(package="keras_bpq")
class BackpropQModel(
    _keras_compat.DistributedLoopFixes, saving_lib.AtomicCheckpoints, callbacks_lib.GuardedLoops, keras.Model
):
    """A Keras model with stochastic nodes inside, trained with `compile()`/`fit()`.

    Functional use:

    ```python
    x = keras.Input((64,))
    z = keras_bpq.Bernoulli(name="z")(keras.layers.Dense(16)(x))
    logits = keras.layers.Dense(64)(z)
    recon = ...  # per-example cost, shape [batch]
    model = keras_bpq.BackpropQModel(inputs=x, outputs=logits, costs={"recon": recon})
    model.compile(optimizer="adam")
    model.fit(data, epochs=10)
    ```

    Subclassed use: override `call()` and call `keras_bpq.add_cost(name, tensor)`
    for each per-example cost. Compiled losses (`compile(loss=...)`) are costs
    too, reduced per example.
    """

    def __init__(
        self, inputs: Any = None, outputs: Any = None, costs: Optional[Mapping[str, Any]] = None, *,
        network: Optional[keras.Model] = None, **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if inputs is not None or costs:
            network = costs_lib.constructor_network(f"{self.name}_network", inputs, outputs, costs)
        self.network = network
        self.training_state = state_lib.TrainingState(name="training_state")
        self._setup = discovery.Setup()  # what compile() and discovery decided, replaced whole
        self._call_input_spec = None  # a subclassed model's input signature, once called or built
        self.critic_optimizer = None

    # -- forward -----------------------------------------------------------
    def call(self, inputs: Any, training: Optional[bool] = None) -> Any:
        return costs_lib.call_network(self.network, inputs, training)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A subclassed model's input signature, for its build config and for
        # creating the training state before a checkpoint is restored.
        if args and self.network is None and self._call_input_spec is None:
            try:
                self._call_input_spec = tf.nest.map_structure(graph.batchless_spec, args[0])
            except (TypeError, ValueError, AttributeError):
                pass
        return super().__call__(*args, **kwargs)

    def build(self, input_shape: Any = None) -> None:
        if self.network is None:
            super().build(input_shape)
        self.built = True

    def get_layer(self, name: Optional[str] = None, index: Optional[int] = None) -> keras.layers.Layer:
        if self.network is not None and name is not None:
            try:
                return self.network.get_layer(name)
            except ValueError:
                pass
        return super().get_layer(name=name, index=index)

    # -- compile -----------------------------------------------------------
    def compile(
        self,
        optimizer: Union[str, keras.optimizers.Optimizer] = "adam",
        loss: Any = None,
        estimator: Union[str, estimators_lib.Estimator, Mapping[str, Any]] = "auto",
        critic_optimizer: Union[None, str, keras.optimizers.Optimizer] = None,
        critic_target: str = "td",
        critic_lambda: float = 0.9,
        tau: float = 0.01,
        target_update_period: Optional[int] = None,
        critic_steps: int = 1,
        critic_update_period: int = 1,
        critic_warmup_steps: int = 0,
        critic_hidden_units: Sequence[int] = (64, 64),
        critics: Optional[Mapping[str, Any]] = None,
        contexts: Optional[Mapping[str, Sequence[str]]] = None,
        actor_reads: str = "target",
        num_samples: int = 1,
        replay: Optional[replay_lib.Replay] = None,
        **kwargs: Any,
    ) -> None:
        """Configures training.

        Args:
          optimizer: the actor's optimizer (all non-critic trainable variables).
          loss: optional Keras loss(es) on the outputs; each becomes a
            per-example cost (`"output_loss"`, or `"<key>_loss"` per output).
          estimator: `"auto"`, an estimator name for every node, or a dict
            `{node_name: name}`; a node's own `estimator=` argument wins over a
            global name. See `keras_bpq.estimators`.
          critic_optimizer: optimizer of the critics (default: a fresh Adam).
          critic_target: `"mc"`, `"td"`, `"expected"` or `"lambda"` (see
            `keras_bpq.targets`); `critic_lambda` is the lambda of `"lambda"`.
          tau: Polyak rate of the critics' target copies, `Qbar <- (1-tau) Qbar + tau Q`.
          target_update_period: if set, copy the critics into their target
            copies every this many steps instead of Polyak averaging.
          critic_steps: critic updates per actor update (on the same batch).
          critic_update_period: train the critics on every this many steps'
            passes (1: every step; every step of `critic_warmup_steps` too).
            The steps between skip the critics' targets, loss, gradient and
            update, and their metrics average the steps that trained them. A
            critic serving as a control variate (`critic_cv`) keeps its
            estimator unbiased whatever its state.
          critic_warmup_steps: steps at the start that train only the critics.
          critic_hidden_units: hidden sizes of the default MLP critics.
          critics: `{node_name: keras.Model}` to replace a node's default critic
            (`[batch, features] -> [batch, heads]`; a `critics.AllOutcomes`
            scores all of a categorical node's outcomes from the context in one
            pass), or a `critics.Critic`.
          contexts: `{node_name: ["inputs", "z1", ...]}` to choose what a
            node's critic sees; an override that breaks R1/R2 (leaves out a
            value the node's costs depend on) is an error here.
          actor_reads: `"target"` (the Polyak copies, default) or `"online"`:
            the critic copy that the actor's estimators evaluate.
          num_samples: draws per example in every step (`rloo` needs >= 2;
            other estimators see a `num_samples` times larger batch).
          replay: a `keras_bpq.Replay(capacity, updates_per_step, correction,
            batch_size)`: keep the rows of past forward passes in a buffer and
            give the critics extra updates on them every step (critics only;
            see `keras_bpq.replay`), or None.
          **kwargs: passed on to `keras.Model.compile` (`metrics`,
            `steps_per_execution`, `jit_compile`, `run_eagerly`, ...).
        """
        # Every argument, for get_compile_config() (saving).
        arguments = saving_lib.CompileArguments(locals())
        options, replay = discovery.compile_options(arguments, self.training_state, self.name)
        super().compile(optimizer=optimizer, **kwargs)
        self.critic_optimizer = discovery.get_critic_optimizer(critic_optimizer)
        built = self.training_state.built
        self._setup = discovery.compiled(self._setup, arguments, options, replay, built)
        critics = self.training_state.critics
        self._setup = discovery.rediscover(self._setup, self, critics, self.network, built, arguments)

    # -- the SCG -----------------------------------------------------------
    @property
    def known_scg(self) -> Optional[graph.SCG]:
        """The SCG found by the first discovery (`keras_bpq.graph.SCG`), or None
        before it. Unlike `scg()`, reading it never traces or discovers."""
        return self._setup.scg

    @property
    def node_estimators(self) -> Optional[Mapping[str, estimators_lib.Estimator]]:
        """`{node name: estimator}` (`keras_bpq.estimators.Estimator`) chosen for
        the SCG, read-only; None before the SCG is known. Reading it creates
        nothing."""
        return self._setup.node_estimators

    @property
    def q_function(self) -> Optional[q_values.QFunction]:
        """Every node's heads at any of its outcomes (`q_values.QFunction`) for
        the SCG and the last `compile()`; None before the SCG is known."""
        return self._setup.q_function

    def scg(self, x: Any = None) -> graph.SCG:
        """The model's stochastic computation graph (`keras_bpq.graph.SCG`).

        `x` is a batch of inputs or a structure of `tf.TensorSpec`; it may be
        omitted once the structure is known. The SCG of an input signature
        seen before is answered from the cache; a new one is discovered
        (`discover`).
        """
        scg, self._setup = discovery.find_scg(self._setup, x, self, self.training_state.critics, self.network)
        return scg

    def discover(self, x: Any) -> graph.SCG:
        """Traces the forward pass on inputs like `x` (a batch or a structure of
        `tf.TensorSpec`) and returns the SCG it shows (`discovery.discover`);
        the first discovery fixes `known_scg`, a later one that differs is a
        ValueError."""
        scg, self._setup = discovery.discover(self._setup, x, self, self.training_state.critics, self.network)
        return scg

    def input_signature(self) -> Optional[Any]:
        """The model's inputs as a structure of `tf.TensorSpec` with a dynamic
        batch dimension, or None while they are unknown (a subclassed model
        never called)."""
        if self._setup.spec is not None:
            return self._setup.spec
        if self.network is not None:
            return discovery.input_spec(self.network)
        return self._call_input_spec

    def node_layer(self, info: graph.NodeInfo) -> keras.layers.Layer:
        """The node layer that made node `info` (a `keras_bpq.graph.NodeInfo` of
        `scg()`); a KeyError naming the layer if the model holds none."""
        return discovery.node_layer(self, info)

    def scg_summary(self, x: Any = None, print_fn: Callable[[str], Any] = print) -> str:
        """Prints the SCG: node, distribution, context, costs, estimator, critic."""
        text = discovery.summary(self._ready(x), self._setup.node_estimators, self.training_state.critics)
        print_fn(text)
        return text

    # -- the training state ------------------------------------------------
    def build_training_state(self, x: Any = None, y: Any = None) -> bool:
        """Creates now what training creates on first use: the critics, their
        target copies, estimator state and both optimizers' slots.

        Saving, loading and `fit` call it, so every checkpoint has the layout
        of a model that has trained. Returns False (doing nothing else) while
        the model is not compiled or its inputs are unknown. Given the data
        training reads (`x`, `y`, as `fit` takes them), it first keeps their
        targets' signature, for a replay buffer that stores targets.
        """
        targets = data_lib.target_spec(x, y)
        if targets is not None:
            self._setup = dataclasses.replace(self._setup, target_spec=targets)
        spec = self.input_signature()
        if not self.compiled or spec is None:
            return False
        self._ready(spec)
        discovery.build_optimizers(
            self.distribute_strategy, self.optimizer, self.actor_variables, self.critic_optimizer, self.critic_variables
        )
        return True

    def _ready(self, x):
        """`scg(x)`, with the training state created on first use (`discovery.create_training_state`)."""
        scg = self.scg(x)
        if not self.training_state.built:
            self.critic_optimizer = discovery.create_training_state(
                self._setup, self.training_state, self.distribute_strategy, self.critic_optimizer, self.name
            )
        return scg

    def critic_set(self) -> Optional[critics_lib.CriticSet]:
        """The model's critics with what trains them (`critics.CriticSet`), as
        compiled; None before the training state exists."""
        if not self.training_state.built:
            return None
        setup, state = self._setup, self.training_state
        return critics_lib.CriticSet(setup.scg, state.critics, self.critic_variables, setup.critic_options,
                                     self.critic_optimizer, setup.q_function, state.steps)

    # -- variables ---------------------------------------------------------
    @property
    def critic_variables(self) -> List[tf.Variable]:
        """Trainable variables of the critics (none for critic-free estimators,
        or before the training state exists)."""
        return list(self.training_state.trainable_variables)

    @property
    def actor_variables(self) -> List[tf.Variable]:
        """Trainable variables other than critics, in `trainable_variables` order."""
        excluded = {id(v) for v in self.critic_variables}
        return [v for v in self.trainable_variables if id(v) not in excluded]

    @property
    def critic_options(self) -> critics_lib.CriticOptions:
        """The critic settings of the last `compile()` (`critics.CriticOptions`)."""
        return self._setup.critic_options

    # -- replay ------------------------------------------------------------
    @property
    def replay_options(self) -> Optional[replay_lib.Replay]:
        """The `keras_bpq.Replay` of the last `compile()`, or None."""
        return self._setup.replay

    def replay_layout(self, scg: graph.SCG, check_targets: bool = False) -> Optional[replay_lib.ReplayLayout]:
        """What a row of the replay buffer holds (`replay.ReplayLayout`), or
        None without `compile(replay=...)`: `keras_bpq.replay.layout` of the
        compiled options, with its errors (`check_targets`: also where the
        targets' signature the buffer stores is unknown)."""
        return self._setup.replay_layout(scg, self.name, check_targets)

    # -- the forward pass --------------------------------------------------
    def record_forward(
        self,
        x: Any,
        y: Any = None,
        training: bool = True,
        forced: Optional[Mapping[str, tf.Tensor]] = None,
        keep_gradient: Optional[Iterable[str]] = None,
    ) -> forward_lib.Recording:
        """One recorded forward pass (`forward.record`), a `forward.Recording`.
        `forced` fixes node samples by name; `keep_gradient` names the nodes
        whose samples keep their gradient (by default those whose estimator
        asks for it). It builds no surrogate (`run_forward`)."""
        return forward_lib.record_pass(self._setup, self._ready(x), self, x, y, training, forced, keep_gradient)

    def run_forward(
        self, x: Any, y: Any = None, training: bool = True, sample_weight: Optional[tf.Tensor] = None
    ) -> forward_lib.ForwardPass:
        """A recorded forward pass and its surrogate loss (`forward.run`), a
        `forward.ForwardPass`; with `compile(num_samples=K)` every example is
        repeated `K` times (consecutive rows)."""
        return forward_lib.run(
            self._setup, self._ready(x), self, self.training_state.node_state, self.regularization_loss,
            x, y, training, sample_weight,
        )

    def regularization_loss(self) -> tf.Tensor:
        """The scalar sum of the actor's Keras regularisation losses: `add_loss`
        terms of the model's layers from the last call (the critics' excluded)
        and the weight regularisers of `actor_variables`."""
        return forward_lib.regularization_loss(self, self.training_state, self.actor_variables)

    # -- the step ----------------------------------------------------------
    def train_step(self, data: Any) -> Dict[str, Any]:
        """`keras.Model.train_step`: the stages of `keras_bpq.step` (forward pass and surrogate,
        gradients, the critics' evaluation, every update or none), then the metrics."""
        x, y, sample_weight = data_lib.unpack(data)
        scg, actor_variables, critics = self._ready(x), self.actor_variables, self.critic_set()
        if not self.optimizer.built:
            self.optimizer.build(actor_variables)
        with tf.name_scope(step_lib.UPDATE_SCOPE):
            snapshot = step_lib.Snapshot.read(callbacks_lib.model_step_variables(self))
        with tf.GradientTape() as tape:
            forward = self.run_forward(x, y, training=True, sample_weight=sample_weight)
            loss = step_lib.actor_loss(forward, self.optimizer)
        grads = tape.gradient(loss, actor_variables)
        with tf.name_scope(step_lib.CRITICS_SCOPE):
            due = critics.due()
            evaluation = critics.evaluate(forward, with_gradient=True, due=due)
        with tf.name_scope(step_lib.UPDATE_SCOPE):
            step_lib.apply(
                scg, self._setup, self.training_state, self.optimizer, actor_variables, critics, forward, grads,
                evaluation, snapshot,
            )
        with tf.name_scope(step_lib.METRICS_SCOPE):
            return self._update_metrics(forward, evaluation, due)

    def test_step(self, data: Any) -> Dict[str, Any]:
        """`keras.Model.test_step` on the model's costs. Under XLA, which drops
        the masks' assertions, it also reports a Categorical mask row that
        allows no outcome, and `evaluate` raises the assertion's error."""
        x, y, sample_weight = data_lib.unpack(data)
        forward = self.run_forward(x, y, training=False, sample_weight=sample_weight)
        if self.jit_compile:
            self.training_state.report(*callbacks_lib.mask_status(self.scg(x), forward.records, tf.constant(0)))
        return self._update_metrics(forward, self.critic_set().evaluate(forward, with_gradient=False))

    def predict_step(self, data: Any) -> Any:
        """`keras.Model.predict_step`. Under XLA, which drops the masks'
        assertions, it also reports a Categorical mask row that allows no
        outcome (its value is NaN), and `predict` raises the assertion's error."""
        if not self.jit_compile:
            return super().predict_step(data)
        x, _, _ = data_lib.unpack(data)
        scg = self.scg(x)
        with graph.Recorder(most_likely=True) as recorder:  # what training=False returns
            y_pred = self(x, training=False)
        records = {record.name: record for record in recorder.nodes}
        self.training_state.report(*callbacks_lib.mask_status(scg, records, tf.constant(0)))
        return y_pred

    # -- metrics -----------------------------------------------------------
    def _update_metrics(self, forward, critics=None, critics_due=None):
        sample_weight, total = forward.weights, forward.total
        _keras_compat.loss_tracker(self).update_state(
            costs_lib.weighted_mean(total, sample_weight) + forward.regularization,
            sample_weight=tf.shape(total)[0],
        )
        self.training_state.update_metrics(forward, critics, critics_due)
        return self.compute_metrics(forward.x, forward.y, forward.y_pred, sample_weight)

    def get_metrics_result(self) -> Dict[str, Any]:
        """`keras.Model.get_metrics_result`, refusing two terms logged under one
        name (Keras would keep only the last one's value)."""
        return costs_lib.metric_results(
            self.name, self.metrics, _keras_compat.loss_tracker(self), self.training_state.cost_metrics
        )

    # -- config ------------------------------------------------------------
    def get_config(self) -> Dict[str, Any]:
        if self.network is None:
            return super().get_config()
        return saving_lib.network_config(self.name, self.trainable, self.network)

    @classmethod
    def from_config(cls, config: Dict[str, Any], custom_objects: Optional[Mapping[str, Any]] = None) -> BackpropQModel:
        if "network" in config:
            return cls(**saving_lib.network_from_config(config, custom_objects))
        return super().from_config(config)

    # -- saving and export -------------------------------------------------
    def get_build_config(self) -> Optional[Dict[str, Any]]:
        config = super().get_build_config()
        return saving_lib.build_config(config, self.input_signature(), self._setup.target_spec)

    def build_from_config(self, config: Optional[Dict[str, Any]]) -> None:
        spec, target_spec = saving_lib.build_config_specs(config)
        self._setup = dataclasses.replace(self._setup, target_spec=target_spec)
        if spec is None:
            return super().build_from_config(config)
        self._call_input_spec = spec
        if self.network is None and not self.built:
            # Subclassed: run call() once to create the layers' variables.
            discovery.build_by_tracing(self, spec)
        self.built = True

    def get_compile_config(self) -> Optional[Dict[str, Any]]:
        arguments = self._setup.compile_arguments
        if not self.compiled or arguments is None:
            return super().get_compile_config()
        return saving_lib.serialize_compile_config(arguments, self.optimizer, self.critic_optimizer)

    def compile_from_config(self, config: Dict[str, Any]) -> None:
        """Recompiles a loaded model and recreates its training state (critics,
        target copies, estimator state, optimizer slots) for the weights."""
        self.compile(**saving_lib.deserialize_compile_config(config))
        self.build_training_state()

    def export(
        self, filepath: Union[str, os.PathLike], format: str = "tf_saved_model", verbose: Optional[bool] = None,
        input_signature: Any = None, **kwargs: Any,
    ) -> Dict[str, Dict[str, Dict[str, tf.TensorSpec]]]:
        """Exports the stochastic forward pass as a SavedModel for TF Serving.

        Signatures `serving_default` (samples), `mode` (most likely values) and
        `seeded` (samples fixed by an int64 `seed` input per example); no
        critics, target copies, estimator state or optimizer state. See
        `keras_bpq.export.export`.
        """
        export_lib.check_arguments(format, kwargs)
        return export_lib.export(
            self, filepath, input_signature=input_signature, verbose=verbose is None or verbose
        )
