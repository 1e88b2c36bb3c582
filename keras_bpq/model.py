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

import dataclasses
import inspect
import types

import keras
import numpy as np
import tensorflow as tf

from keras_bpq import _keras_compat
from keras_bpq import costs as costs_lib
from keras_bpq import critics as critics_lib
from keras_bpq import estimators as estimators_lib
from keras_bpq import export as export_lib
from keras_bpq import graph
from keras_bpq import nodes as nodes_lib
from keras_bpq import outcomes as outcomes_lib
from keras_bpq import saving as saving_lib
from keras_bpq import targets as targets_lib


@keras.saving.register_keras_serializable(package="keras_bpq")
class ScgState(keras.layers.Layer):
    """Tracked home of the training machinery: estimator state, critics and
    their target copies, and the cost and critic metrics.

    Created unbuilt with the model and filled once the SCG is known, so its
    variables checkpoint, restore and distribute with the model.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.node_state = {}
        self.critics = {}
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
        # (keras_bpq.saving.FitPosition).
        self.fit_epoch = self.add_weight(
            name="fit_epoch", shape=(), dtype="int64", initializer=keras.initializers.Constant(-1),
            trainable=False, aggregation="only_first_replica",
        )
        self.fit_batch = self.add_weight(
            name="fit_batch", shape=(), dtype="int64", initializer=keras.initializers.Constant(-1),
            trainable=False, aggregation="only_first_replica",
        )

    def setup(self, scg, estimators, critic_heads, feature_dims, critic_models, hidden_units):
        """Creates every node's estimator state and the critics of `critic_heads`."""
        for info in scg.nodes:
            self.node_state[info.name] = estimators[info.name].create_state(
                info, self._add_state
            )
        for name, heads in critic_heads.items():
            given = critic_models.get(name)
            if isinstance(given, critics_lib.Critic) and not isinstance(given, keras.layers.Layer):
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
        self.cost_metrics = [keras.metrics.Mean(name=name) for name in scg.costs]
        self.built = True

    @property
    def learned_critics(self):
        return {n: c for n, c in self.critics.items() if isinstance(c, critics_lib.NodeCritic)}

    def _add_state(self, name, shape, dtype, initializer="zeros"):
        # A layer called twice names its second node "<layer>@2"; "@" is not
        # allowed in a variable name.
        return self.add_weight(
            name=name.replace("@", "_"), shape=shape, dtype=dtype, initializer=initializer,
            trainable=False,
            aggregation="only_first_replica",
        )

    def call(self, inputs):
        return inputs


class NonFiniteGuard(keras.callbacks.Callback):
    """Stops `fit` with a clear error after a step that met a non-finite value:
    a cost, an actor gradient, or a value the step would have written.

    The step itself already kept none of its updates, so every weight, critic,
    target copy, optimizer slot and estimator state holds finite values.
    """

    def on_train_begin(self, logs=None):
        self.model.machinery.status.assign(0)

    def on_train_batch_end(self, batch, logs=None):
        self.model.raise_if_nonfinite()


@keras.saving.register_keras_serializable(package="keras_bpq")
class BackpropQModel(_keras_compat.DistributedLoopFixes, keras.Model):
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

    def __init__(self, inputs=None, outputs=None, costs=None, *, network=None, **kwargs):
        super().__init__(**kwargs)
        if inputs is not None:
            if outputs is None:
                raise ValueError("BackpropQModel(inputs=...) also needs outputs=.")
            structure = {"outputs": outputs}
            if costs:
                for name in costs:
                    costs_lib.check_name(name, "costs= of the constructor")
                structure["costs"] = dict(costs)
            network = keras.Model(inputs=inputs, outputs=structure, name=f"{self.name}_network")
        elif costs:
            raise ValueError("BackpropQModel(costs=...) needs inputs= and outputs= too.")
        self.network = network
        self.machinery = ScgState(name="scg_state")
        self._scg_cache = {}
        self._evaluators = {}
        self._scg = None
        self._scg_spec = None
        self._contexts = {}
        self._num_samples = 1
        self._node_estimators = None
        self._estimator_option = "auto"
        self._compiled_losses = costs_lib.CompiledLosses(None)
        self._critic_options = _critic_options()
        self.critic_optimizer = None

    # -- forward -----------------------------------------------------------
    def call(self, inputs, training=None):
        if self.network is None:
            raise NotImplementedError(
                "Subclass BackpropQModel and define call(), or pass inputs=, outputs= "
                "and costs= to the constructor."
            )
        result = self.network(inputs, training=training)
        recorder = graph.current_recorder()
        if recorder is not None:
            for name, value in result.get("costs", {}).items():
                recorder.add_cost(name, value, origin="costs= of the constructor")
        return result["outputs"]

    def build(self, input_shape=None):
        if self.network is None:
            super().build(input_shape)
        self.built = True

    def get_layer(self, name=None, index=None):
        if self.network is not None and name is not None:
            try:
                return self.network.get_layer(name)
            except ValueError:
                pass
        return super().get_layer(name=name, index=index)

    # -- compile -----------------------------------------------------------
    def compile(
        self,
        optimizer="adam",
        loss=None,
        estimator="auto",
        critic_optimizer=None,
        critic_target="td",
        critic_lambda=0.9,
        tau=0.01,
        target_update_period=None,
        critic_steps=1,
        critic_warmup_steps=0,
        critic_hidden_units=(64, 64),
        critics=None,
        contexts=None,
        actor_reads="target",
        num_samples=1,
        **kwargs,
    ):
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
          **kwargs: passed on to `keras.Model.compile` (`metrics`,
            `steps_per_execution`, `jit_compile`, `run_eagerly`, ...).
        """
        # Every argument, for get_compile_config() (saving).
        arguments = saving_lib.CompileArguments(locals())
        if "loss_weights" in kwargs and kwargs["loss_weights"] is not None:
            raise ValueError(
                "BackpropQModel does not take loss_weights: scale a cost where it "
                "is computed instead."
            )
        targets_lib.check_kind(critic_target, critic_lambda)
        if actor_reads not in ("target", "online"):
            raise ValueError(f"actor_reads must be 'target' or 'online'; got {actor_reads!r}.")
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1]; got {tau}.")
        if int(critic_steps) < 1:
            raise ValueError(f"critic_steps must be at least 1; got {critic_steps}.")
        super().compile(optimizer=optimizer, **kwargs)
        self.critic_optimizer = keras.optimizers.get(critic_optimizer or keras.optimizers.Adam(1e-3))
        self._critic_options = _critic_options(
            critic_target, critic_lambda, tau, target_update_period, critic_steps,
            critic_warmup_steps, critic_hidden_units, critics, actor_reads,
        )
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be at least 1; got {num_samples}.")
        self._num_samples = int(num_samples)
        self._compiled_losses = costs_lib.CompiledLosses(loss)
        self._estimator_option = estimator
        contexts = {k: tuple(v) for k, v in (contexts or {}).items()}
        if self.machinery.built and contexts != self._contexts:
            raise ValueError(
                "contexts= cannot change after the model's critics exist; build a new model."
            )
        self._contexts = contexts
        spec = self._scg_spec
        if not self.machinery.built:
            # Nothing is built from the structure yet: rediscover it with the
            # new options, so every error shows here.
            self._scg, self._scg_cache = None, {}
        if spec is not None:
            self.scg(spec)
        elif self.network is not None:
            self.scg(self._input_spec_from_network())
        if self.machinery.built:
            self._resolve_estimators(self._scg)
        self._compile_arguments = arguments

    def _input_spec_from_network(self):
        def spec(t):
            return tf.TensorSpec((None,) + tuple(t.shape[1:]), t.dtype)

        return tf.nest.map_structure(spec, _keras_compat.functional_inputs(self.network))

    # -- structure ---------------------------------------------------------
    def scg(self, x=None):
        """The model's stochastic computation graph (`keras_bpq.graph.SCG`).

        `x` is a batch of inputs or a structure of `tf.TensorSpec`; it may be
        omitted once the structure is known. Discovery traces the forward pass
        once per input signature.
        """
        if x is None:
            if self._scg is None:
                if self.network is None:
                    raise ValueError(
                        f"The SCG of {self.name!r} is not known yet: pass a batch of "
                        "inputs, or train or evaluate first."
                    )
                return self.scg(self._input_spec_from_network())
            return self._scg
        spec = tf.nest.map_structure(_batchless_spec, x)
        key = tuple((tuple(s.shape), s.dtype.name) for s in tf.nest.flatten(spec))
        if key not in self._scg_cache:
            self._scg_cache[key] = self._discover(spec)
        return self._scg_cache[key]

    def _discover(self, spec):
        compiled = self._compiled_losses
        if not self.built:
            # Build once outside any recorder: Keras may run call() to build.
            tf.function(lambda i: self(i, training=True), autograph=False).get_concrete_function(spec)

        def forward(inputs):
            return compiled.dependencies(self(inputs, training=True))

        scg, cost_shapes = graph.discover(forward, spec, check_names=costs_lib.check_names)
        if not scg.nodes:
            raise ValueError(
                f"Model {self.name!r} has no stochastic node: its forward pass never "
                "called a keras_bpq node layer (Bernoulli, Categorical, Normal, "
                "StochasticNode). Use keras.Model for deterministic models."
            )
        if not scg.costs:
            raise ValueError(
                f"Model {self.name!r} has no cost: pass costs={{...}} to the "
                "constructor, call keras_bpq.add_cost() in call(), or compile(loss=...)."
            )
        for name, shape in cost_shapes.items():
            if name not in compiled.names:
                costs_lib.check_per_example(name, shape)
        scg = graph.with_contexts(scg, self._contexts)
        if self._scg is None:
            self._resolve_estimators(scg)
            self._scg = scg
            self._scg_spec = spec
        elif scg.node_names != self._scg.node_names or scg.costs != self._scg.costs:
            raise ValueError(
                f"Model {self.name!r} built a different SCG for inputs {spec}: nodes "
                f"{scg.node_names} and costs {scg.costs}, where earlier inputs gave "
                f"nodes {self._scg.node_names} and costs {self._scg.costs}."
            )
        return scg

    def _ensure_machinery(self):
        """Creates estimator state and critics on first use (after the last
        `compile()`, so recompiling before training may change estimators)."""
        if self.machinery.built:
            return
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            raise RuntimeError(
                f"Model {self.name!r}: its critics and estimator state must be created "
                "before a distributed step runs. Call model.scg(example_batch) under "
                "strategy.scope() before fit(), or use a functional BackpropQModel."
            )
        with self.distribute_strategy.scope():
            self._setup_machinery(self._scg, self._scg_spec)

    def _setup_machinery(self, scg, spec):
        options = self._critic_options
        heads = {}
        if any(e.needs_critic for e in self._node_estimators.values()):
            # Every learned head gets a critic, so bootstrapped targets always
            # find their successor's critic.
            heads = {n: h for n, h in targets_lib.learned_heads(scg).items() if h}
        unknown = set(options.models) - set(scg.node_names)
        if unknown:
            raise ValueError(
                f"compile(critics=...) names unknown nodes {sorted(unknown)}; the "
                f"model's nodes are {list(scg.node_names)}."
            )
        if options.target == "expected":
            for name in {c for h in heads.values() for c in h}:
                for node in scg.cost_ancestors[name][1:]:
                    size = scg.node(node).support_size
                    if size is None or size > 256:
                        raise ValueError(
                            f"critic_target='expected' needs the full support of node "
                            f"{node!r} (a successor on cost {name!r}'s chain), which has "
                            f"{size or 'no finite'} outcomes (at most 256 allowed). Use 'td'."
                        )
        input_dim = sum(int(np.prod(s.shape[1:])) for s in tf.nest.flatten(spec))
        feature_dims = {}
        for info in scg.nodes:
            dims = [
                input_dim if n == "inputs" else int(np.prod(scg.node(n).event_shape))
                for n in info.context
            ]
            feature_dims[info.name] = sum(dims) + int(np.prod(info.event_shape))
        self.machinery.setup(
            scg, self._node_estimators, heads, feature_dims, options.models, options.hidden_units
        )
        critic_variables = self.critic_variables
        if critic_variables:
            if self.critic_optimizer is None:
                self.critic_optimizer = keras.optimizers.Adam(1e-3)
            self.critic_optimizer.build(critic_variables)

    def _resolve_estimators(self, scg):
        option = self._estimator_option
        if isinstance(option, dict):
            unknown = set(option) - set(scg.node_names) - {i.layer_name for i in scg.nodes}
            if unknown:
                raise ValueError(
                    f"compile(estimator=...) names unknown nodes {sorted(unknown)}; the "
                    f"model's nodes are {list(scg.node_names)}."
                )
        resolved = {}
        for info in scg.nodes:
            layer = self.node_layer(info)
            if isinstance(option, dict):
                choice = option.get(info.name, option.get(info.layer_name))
                choice = choice or layer.estimator or "auto"
            else:
                choice = layer.estimator or option
            resolved[info.name] = estimators_lib.get(choice, info, self._num_samples)
        if self._node_estimators is not None and self.machinery.built:
            for name, est in resolved.items():
                if est.name != self._node_estimators[name].name:
                    raise ValueError(
                        f"Node {name!r} was set up for estimator "
                        f"{self._node_estimators[name].name!r} when it first ran; changing "
                        f"it to {est.name!r} afterwards is not supported. Build a new model."
                    )
        self._node_estimators = resolved

    def node_layer(self, info):
        """The node layer that made node `info` (a `keras_bpq.graph.NodeInfo` of
        `scg()`); a KeyError naming the layer if the model holds none."""
        for layer in _keras_compat.flatten_layers(self, include_self=False):
            if layer.name == info.layer_name:
                return layer
        raise KeyError(info.layer_name)

    def scg_summary(self, x=None, print_fn=print):
        """Prints the SCG: node, distribution, context, costs, estimator, critic."""
        scg = self.scg(x)
        self._ensure_machinery()
        estimators = {n: e.describe() for n, e in self._node_estimators.items()}
        critics = {}
        for info in scg.nodes:
            if not self._node_estimators[info.name].needs_critic:
                continue
            critic = self.machinery.critics.get(info.name)
            learned = list(critic.heads) if critic is not None else []
            exact = [c for c in info.costs if c not in learned]
            parts = ([f"learned[{', '.join(learned)}]"] if learned else []) + (
                [f"exact[{', '.join(exact)}]"] if exact else []
            )
            critics[info.name] = " ".join(parts)
        text = graph.format_scg(scg, estimators=estimators, critics=critics)
        print_fn(text)
        return text

    # -- variables ---------------------------------------------------------
    @property
    def critic_variables(self):
        """Trainable variables of the critics (none for critic-free estimators)."""
        if self._scg is not None:
            self._ensure_machinery()
        return list(self.machinery.trainable_variables)

    @property
    def actor_variables(self):
        """Trainable variables other than critics, in `trainable_variables` order."""
        excluded = {id(v) for v in self.critic_variables}
        return [v for v in self.trainable_variables if id(v) not in excluded]

    @property
    def node_estimators(self):
        """`{node name: estimator}` (`keras_bpq.estimators.Estimator`) chosen for
        the SCG, read-only; None before the SCG is known. Reading it creates
        nothing."""
        if self._node_estimators is None:
            return None
        return types.MappingProxyType(self._node_estimators)

    @property
    def known_scg(self):
        """The SCG found by the first discovery (`keras_bpq.graph.SCG`), or None
        before it. Unlike `scg()`, reading it never traces or discovers."""
        return self._scg

    # -- the step ----------------------------------------------------------
    def record_forward(self, x, y=None, training=True, forced=None, keep_gradient=None):
        """One recorded forward pass.

        Returns `(y_pred, costs, total, records)`: `costs` maps every cost name to
        its per-example value `[batch]`, `total` is their sum (with gradients
        along deterministic paths) and `records` maps node names to
        `graph.NodeRecord`s. `forced` fixes node samples by name; `keep_gradient`
        names the nodes whose samples keep their gradient (by default those whose
        estimator asks for it).
        """
        scg = self.scg(x)
        self._ensure_machinery()
        if keep_gradient is None:
            keep_gradient = {
                i.name for i in scg.nodes if self._node_estimators[i.name].keeps_gradient
            }
        with graph.Recorder(forced=forced, keep_gradient=keep_gradient) as rec:
            y_pred = self(x, training=training)
        costs = {name: costs_lib.as_per_example(v) for name, v in rec.costs.items()}
        if self._compiled_losses.entries:
            costs.update(self._compiled_losses(y, y_pred))
        total = tf.add_n([costs[name] for name in scg.costs])
        return y_pred, costs, total, {r.name: r for r in rec.nodes}

    def run_forward(self, x, y=None, training=True, sample_weight=None):
        """A recorded forward pass and its surrogate loss.

        With `compile(num_samples=K)` every example is repeated `K` times
        (consecutive rows), so every row below is one (example, draw) pair.
        Returns a dict with `y_pred`, `costs`, `total` (see `record_forward`),
        `records`, `surrogate` (`[rows]`: `total + sum_X L_X`, whose gradient
        estimates `grad J`), `weights` (the per-row sample weights or None),
        `x`, `y` (the repeated inputs), `steps`, the per-node
        `estimators.NodeStep`s, and `regularization` (`regularization_loss()`
        of this pass, a scalar).
        """
        scg = self.scg(x)
        num_samples = self._num_samples
        if num_samples > 1:
            repeat = lambda t: tf.repeat(t, num_samples, axis=0)  # noqa: E731
            x = tf.nest.map_structure(repeat, x)
            y = None if y is None else tf.nest.map_structure(repeat, y)
            sample_weight = None if sample_weight is None else repeat(sample_weight)
        y_pred, costs, total, records = self.record_forward(x, y, training=training)
        # Read before any re-run of the model's layers replaces their losses.
        regularization = self.regularization_loss()
        steps = {}
        surrogate = total
        reads_target = self._critic_options.actor_reads_target
        for info in scg.nodes:
            estimator = self._node_estimators[info.name]
            downstream = tf.add_n([costs[c] for c in info.costs]) if info.costs else tf.zeros_like(total)
            q = None
            if estimator.needs_critic and info.costs:
                q = self._critic_fn(info, x, y, records, reads_target)
            step = estimators_lib.NodeStep(
                info=info,
                record=records[info.name],
                downstream=downstream,
                state=self.machinery.node_state[info.name],
                q=q,
                num_samples=num_samples,
                rerun=self._rerun_fn(info, x, y, records),
            )
            steps[info.name] = step
            if info.costs:
                surrogate = surrogate + estimator.surrogate(step)
        return {
            "y_pred": y_pred,
            "costs": costs,
            "total": total,
            "records": records,
            "surrogate": surrogate,
            "regularization": regularization,
            "weights": sample_weight,
            "x": x,
            "y": y,
            "steps": steps,
        }

    def regularization_loss(self):
        """The scalar sum of the actor's Keras regularisation losses: `add_loss`
        terms of the model's layers from the last call (the critics' excluded)
        and the weight regularisers of `actor_variables`."""
        critic_layers = {id(layer) for layer in _keras_compat.flatten_layers(self.machinery)}
        losses = [
            loss
            for layer in _keras_compat.flatten_layers(self)
            if id(layer) not in critic_layers
            for loss in _keras_compat.own_losses(layer)
        ]
        return _sum_losses(losses + _weight_penalties(self.actor_variables))

    # -- critics -----------------------------------------------------------
    def _context(self, info, x, records):
        """`{"inputs": x, name: sample}` for the entries of the node's context."""
        context = {"inputs": x} if "inputs" in info.context else {}
        for name in info.context:
            if name != "inputs":
                context[name] = tf.stop_gradient(records[name].sample)
        return context

    def q_heads(self, info, x, y, records, values, target=True):
        """`{cost: [batch, A]}`: every head `Q^c_X` of node `info` at `values`
        (`[batch, A, *event]`, a tensor or `outcomes.UnitEdits`), given the
        recorded context of this pass.

        Learned heads come from the node's critic (`target` selects the target
        copy); exact heads (the node is the cost's last stochastic ancestor)
        re-evaluate the costs with the context and the node forced: on a
        functional model only the operations downstream of the node, with
        rank-one updates through `Dense` layers (`outcomes`); otherwise by
        re-running the whole forward pass on `batch x A` rows.
        """
        scg = self._scg
        num = values.shape[1]
        context = self._context(info, x, records)
        heads = {}
        critic = self.machinery.critics.get(info.name)
        if critic is not None:
            learned = critic.q_outcomes(context, values, target=target)
            heads.update({c: learned[:, :, i] for i, c in enumerate(critic.heads)})
        exact = tuple(c for c in info.costs if scg.cost_ancestors[c][-1] == info.name)
        if exact:
            evaluator = self._downstream_evaluator(info, exact)
            if evaluator is not None:
                forced = {n: context[n] for n in info.context if n != "inputs"}
                heads.update(evaluator(x, forced, values, training=True))
            else:
                heads.update(self._rerun_heads(info, x, y, context, values, exact))
        missing = [c for c in info.costs if c not in heads]
        if missing:
            raise ValueError(f"Node {info.name!r} has no critic for costs {missing}.")
        return heads

    def _downstream_evaluator(self, info, costs):
        """The cached `outcomes.DownstreamEvaluator` of `costs` at node `info`,
        or None where the model is not functional or the graph needs a re-run."""
        key = (info.name, costs)
        if key not in self._evaluators:
            try:
                evaluator = outcomes_lib.DownstreamEvaluator(
                    self.network, nodes_lib.StochasticNode, info.name,
                    [n for n in info.context if n != "inputs"], costs,
                )
            except outcomes_lib.Unsupported:
                evaluator = None
            self._evaluators[key] = evaluator
        return self._evaluators[key]

    def _rerun_heads(self, info, x, y, context, values, costs):
        """Exact heads by a forward pass on `batch x A` rows with the context and
        the node forced."""
        if isinstance(values, outcomes_lib.UnitEdits):
            values = values.dense()
        held = {n: context[n] for n in info.context if n != "inputs"}
        return self._forced_rerun(info, x, y, held, values, keep_gradient={info.name}, costs=costs)

    def _forced_rerun(self, info, x, y, held, values, keep_gradient, costs):
        """`{cost: [batch, A]}`: one forward pass on `batch x A` rows with the
        samples `held` (`{name: [batch, *event]}`) repeated per outcome, node
        `info` forced to `values` (`[batch, A, *event]`) and the other nodes
        sampled afresh."""
        num = values.shape[1]
        repeat = lambda t: tf.repeat(t, num, axis=0)  # noqa: E731
        forced = {n: repeat(v) for n, v in held.items()}
        forced[info.name] = tf.reshape(values, [-1] + list(values.shape[2:]))
        _, rerun, _, _ = self.record_forward(
            tf.nest.map_structure(repeat, x),
            None if y is None else tf.nest.map_structure(repeat, y),
            training=True,
            forced=forced,
            keep_gradient=keep_gradient,
        )
        return {c: tf.reshape(rerun[c], [-1, num]) for c in costs}

    def _rerun_fn(self, info, x, y, records):
        """`values [rows, A, *event] -> [rows, A]`: the node's realised downstream
        cost `c_X` with the node forced to each value, the earlier samples held
        and the later nodes sampled afresh (one batched forward pass)."""

        def rerun(values):
            position = self._scg.node_names.index(info.name)
            held = {n: records[n].sample for n in self._scg.node_names[:position]}
            costs = self._forced_rerun(info, x, y, held, values, keep_gradient=(), costs=info.costs)
            return tf.add_n([costs[c] for c in info.costs])

        return rerun

    def _critic_fn(self, info, x, y, records, target):
        def q(values):
            heads = self.q_heads(info, x, y, records, values, target=target)
            return tf.add_n([heads[c] for c in info.costs])

        return q

    def _critic_targets(self, out, x, y):
        """Targets for every learned head, and each node's Q at its sample."""
        scg, options = self._scg, self._critic_options
        records, costs = out["records"], out["costs"]
        q_at_sample, value = {}, {}
        for info in scg.nodes:
            heads = {c: costs[c] for c in info.costs if scg.cost_ancestors[c][-1] == info.name}
            critic = self.machinery.critics.get(info.name)
            if critic is not None:
                learned = critic.q(self._context(info, x, records), records[info.name].sample, target=True)
                heads.update({c: learned[:, i] for i, c in enumerate(critic.heads)})
            q_at_sample[info.name] = heads
        if options.target == "expected":
            successors = {n for c in scg.costs for n in scg.cost_ancestors[c][1:]}
            for name in successors:
                info = scg.node(name)
                record = records[name]
                support = tf.constant(self.node_layer(info).support(info.event_shape))
                batch = tf.shape(record.sample)[0]
                num = support.shape[0]
                values = tf.tile(support[None], [batch] + [1] * len(support.shape))
                repeat = lambda t: tf.repeat(t, num, axis=0)  # noqa: E731
                log_p = record.layer.log_prob(
                    tf.reshape(values, [-1] + list(info.event_shape)),
                    repeat(record.params),
                    None if record.mask is None else repeat(record.mask),
                )
                probs = tf.reshape(tf.exp(log_p), [batch, num])
                heads = self.q_heads(info, x, y, records, values, target=True)
                value[name] = {c: tf.reduce_sum(probs * v, axis=1) for c, v in heads.items()}
        targets = targets_lib.critic_targets(
            options.target, scg, costs, q_at_sample, value, options.lam
        )
        return targets, q_at_sample

    def _critic_loss(self, out, x, targets):
        """Squared error of every learned head, summed over heads and nodes
        (examples weighted by their sample weights, as the actor's objective),
        plus the critics' weight regularisers."""
        records = out["records"]
        total = 0.0
        per_node = {}
        for name, critic in self.machinery.learned_critics.items():
            info = self._scg.node(name)
            pred = critic.q(self._context(info, x, records), records[name].sample, target=False)
            wanted = tf.stack([targets[(name, c)] for c in critic.heads], axis=1)
            weights = out["weights"]
            loss = _weighted_mean(tf.reduce_sum(tf.square(pred - wanted), axis=1), weights)
            per_node[name] = (loss, _weighted_mean(tf.reduce_mean(tf.abs(wanted - pred), axis=1), weights))
            total += loss + _sum_losses(_weight_penalties(getattr(critic, "trainable_variables", [])))
        return total, per_node

    def _evaluate_critics(self, out, x, y, with_gradient):
        """This step's critic targets, Q-values at the samples and losses (with
        their gradient), computed once for the update and the metrics."""
        if not self.machinery.learned_critics:
            return None
        targets, q_at_sample = self._critic_targets(out, x, y)
        variables = self.critic_variables
        with tf.GradientTape() as tape:
            loss, per_node = self._critic_loss(out, x, targets)
            scaled = loss / _num_replicas()
        grads = tape.gradient(scaled, variables) if with_gradient else None
        return {"targets": targets, "q_at_sample": q_at_sample, "per_node": per_node, "grads": grads}

    def _update_critics(self, grads, evaluation, out, inputs=None):
        """Fits the learned critics on this step's targets (`critic_steps` times).

        `inputs` (`_critic_inputs`) are this replica's own when the update runs
        from a cross-replica `merge_call`, where `out` is the first replica's.
        """
        variables = self.critic_variables
        self.critic_optimizer.apply(grads, variables)
        if self._critic_options.steps == 1:
            return
        x, samples, targets, weights = inputs or self._critic_inputs(out, evaluation)
        records = {n: dataclasses.replace(r, sample=samples[n]) for n, r in out["records"].items()}
        for _ in range(self._critic_options.steps - 1):
            with tf.GradientTape() as tape:
                loss, _ = self._critic_loss({"records": records, "weights": weights}, x, targets)
                scaled = loss / _num_replicas()  # the optimizer sums over replicas
            self.critic_optimizer.apply(tape.gradient(scaled, variables), variables)

    @staticmethod
    def _critic_inputs(out, evaluation):
        """What the critic loss reads: `(x, {node: sample}, targets, sample weights)`."""
        if evaluation is None:
            return None
        samples = {n: r.sample for n, r in out["records"].items()}
        return out["x"], samples, evaluation["targets"], out["weights"]

    def _update_target_copies(self):
        options = self._critic_options
        critics = self.machinery.learned_critics.values()
        if options.period:
            def copy():
                for critic in critics:
                    critic.update_target(1.0)
                return tf.constant(0)

            steps = self.machinery.steps
            tf.cond(tf.equal(steps % int(options.period), 0), copy, lambda: tf.constant(0))
        else:
            for critic in critics:
                critic.update_target(options.tau)

    def train_step(self, data):
        x, y, sample_weight = _unpack(data)
        scg = self.scg(x)
        actor_variables = self.actor_variables
        if not self.optimizer.built:
            self.optimizer.build(actor_variables)
        replicas = _num_replicas()
        # What the step may write, read before anything writes it (the forward
        # pass too: it may update statistics such as BatchNormalization's).
        written = self._step_variables()
        saved = [tf.identity(v.value) for v, _ in written]
        with tf.GradientTape() as tape:
            out = self.run_forward(x, y, training=True, sample_weight=sample_weight)
            # Optimizers sum gradients over replicas: this makes the global mean.
            surrogate = (_weighted_mean(out["surrogate"], out["weights"]) + out["regularization"]) / replicas
            # Loss scaling (mixed_float16 wraps the optimizer in a
            # LossScaleOptimizer; or loss_scale_factor=): apply() unscales.
            scaled = self.optimizer.scale_loss(surrogate)
        grads = tape.gradient(scaled, actor_variables)
        # A LossScaleOptimizer skips steps whose scaled gradient overflows, and
        # lowers its scale: only the costs decide here then.
        loss_scaled = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        status = self._step_status(scg, out["costs"], [] if loss_scaled else grads)
        status, row = self._mask_status(scg, out["records"], status)
        critics = self._evaluate_critics(out, out["x"], out["y"], with_gradient=True)
        critic_grads = [] if critics is None else critics["grads"]
        # Weighted means of c_X; with weights that are all 0 (no data) the
        # estimator state stays as it is.
        weights = out["weights"]
        means = [_global_weighted_mean(out["steps"][info.name].downstream, weights) for info in scg.nodes]
        has_data = None if weights is None else _global_sum(tf.reduce_sum(tf.abs(tf.cast(weights, tf.float32)))) > 0
        # Estimators' own tuned parameters (relax's control variate): replica means.
        tuning = [
            [_global_sum(g) / replicas for g in self._node_estimators[n].tuning_gradients(out["steps"][n])]
            for n in scg.node_names
        ]
        skip = _global_sum(tf.cast(tf.not_equal(status, 0), tf.float32)) > 0
        undone = self._apply_updates(
            skip, grads, critic_grads, (means, has_data), critics, out, tuning, written=(written, saved)
        )
        # A step that would have written a non-finite value was undone: code
        # -2 - i names the first such variable, written[i].
        status = tf.where(tf.logical_and(tf.equal(status, 0), undone >= 0), -2 - undone, status)
        previous = self.machinery.status
        first = tf.equal(previous, 0)
        self.machinery.status_row.assign(tf.where(first, row, self.machinery.status_row))
        previous.assign(tf.where(first, status, previous))
        return self._update_metrics(out, critics)

    def _apply_updates(self, skip, grads, critic_grads, means, critics, out, tuning, written):
        """Critics, then actor (after warm-up), then estimator state (and the
        estimators' tuning steps, `tuning`: per node, replica-mean gradients)
        and target copies; nothing at all when `skip` (a non-finite cost or
        gradient on any replica). Under a `tf.distribute` strategy that
        synchronises through `merge_call`, the decision runs in cross-replica
        context and every update on each replica, as Keras' `LossScaleOptimizer`
        does.

        `means` is `(per-node global means of c_X, has_data)`: `has_data`, a
        boolean or None (no sample weights), is false when every sample
        weight is 0, and the estimator state then stays as it is.
        `written` is `(self._step_variables(), their values before the step)`.
        After the updates every floating one is checked: if any holds a NaN or
        inf (an optimizer's slot that overflowed, say), all of them are set
        back to their values before the step, so the step leaves nothing
        non-finite behind. Returns the index in `written` of the first
        non-finite variable (of any replica), or -1 when the step stands."""
        warmup = self._critic_options.warmup
        actor_variables = self.actor_variables
        nodes = self._scg.nodes

        def update_critics(critic_grads, inputs=None):
            if critics is not None:
                self._update_critics(critic_grads, critics, out, inputs)

        def update_actor(grads):
            self.optimizer.apply(grads, actor_variables)

        means, has_data = means

        def update_state(means, tuning, has_data):
            def update():
                for info, mean, gradients in zip(nodes, means, tuning):
                    estimator, state = self._node_estimators[info.name], self.machinery.node_state[info.name]
                    estimator.update(state, mean)
                    if gradients:
                        estimator.apply_tuning(state, gradients)
                return noop()

            tf.cond(has_data, update, noop) if has_data is not None else update()
            self.machinery.steps.assign_add(1)

        def noop():
            return tf.constant(0)

        variables, saved = [v for v, _ in written[0]], written[1]

        def first_nonfinite():
            return _first_nonfinite(variables)

        def restore(saved):
            for variable, value in zip(variables, saved):
                variable.assign(value)
            return noop()

        context = tf.distribute.get_replica_context()
        # Not `num_replicas_in_sync == 1`: a one-device MirroredStrategy still
        # synchronises through merge_call, which cannot run inside a tf.cond.
        if (
            context is None
            or not tf.distribute.has_strategy()
            or _keras_compat.strategy_supports_no_merge_call()
        ):

            def apply():
                update_critics(critic_grads)
                ready = self.machinery.steps >= warmup

                def actor():
                    update_actor(grads)
                    return noop()

                tf.cond(ready, actor, noop) if warmup else actor()
                update_state(means, tuning, has_data)
                self._update_target_copies()
                return noop()

            tf.cond(skip, noop, apply)
            # Replicas hold the same values; agree anyway on undoing the step.
            undo = _global_sum(tf.cast(tf.logical_not(_all_finite(variables)), tf.float32)) > 0

            def undo_step():
                first = tf.maximum(first_nonfinite(), 0)  # read before restoring
                restore(saved)
                return first

            return tf.cond(undo, undo_step, lambda: tf.constant(-1))

        def cross_replica(strategy, skip, grads, critic_grads, means, has_data, tuning, critic_inputs, saved):
            each = strategy.extended.call_for_each_replica
            # Every replica holds the same all-reduced flag; take the first's.
            skip = strategy.experimental_local_results(each(tf.identity, args=(skip,)))[0]

            def apply():
                each(update_critics, args=(critic_grads, critic_inputs))
                tf.cond(
                    self.machinery.steps >= warmup,
                    lambda: each(update_actor, args=(grads,)),
                    lambda: None,
                )
                each(update_state, args=(means, tuning, has_data))
                self._update_target_copies()

            tf.cond(skip, lambda: None, apply)
            finite = strategy.experimental_local_results(each(lambda: _all_finite(variables)))
            undo = tf.logical_not(tf.reduce_all(finite))

            def undo_step():
                first = tf.reduce_max(strategy.experimental_local_results(each(first_nonfinite)))
                each(restore, args=(saved,))
                return tf.maximum(first, 0)

            return tf.cond(undo, undo_step, lambda: tf.constant(-1))

        critic_inputs = self._critic_inputs(out, critics) if self._critic_options.steps > 1 else None
        return context.merge_call(
            cross_replica, args=(skip, grads, critic_grads, means, has_data, tuning, critic_inputs, saved)
        )

    def _step_variables(self):
        """`[(variable, role)]`: every variable a training step may write (the
        model's weights, critics and their target copies, estimator state, both
        optimizers' variables), for undoing a step; `role` names it in errors."""
        roles = {}

        def add(variables, role):
            for variable in variables:
                roles.setdefault(id(variable), (variable, role))

        state = {id(v): n for n, s in self.machinery.node_state.items() for v in s.values()}
        critic_ids = {id(v) for v in self.critic_variables}
        for variable in self.weights:
            if variable is self.machinery.status or variable is self.machinery.status_row:
                continue  # the step's own report, written after the check
            if not tf.as_dtype(variable.dtype).is_floating:
                role = "counter"  # never non-finite; set back with the rest
            elif id(variable) in state:
                role = f"estimator state of node {state[id(variable)]!r}"
            elif id(variable) in critic_ids:
                role = "critic weight"
            elif variable.trainable:
                role = "weight"
            elif any(variable is w for w in self.machinery.non_trainable_weights):
                role = "critic target copy"
            else:
                role = "non-trainable weight"
            add([variable], role)
        if getattr(self, "optimizer", None) is not None:
            add(self.optimizer.variables, "actor optimizer variable")
        if self.critic_optimizer is not None:
            add(self.critic_optimizer.variables, "critic optimizer variable")
        return list(roles.values())

    def test_step(self, data):
        x, y, sample_weight = _unpack(data)
        out = self.run_forward(x, y, training=False, sample_weight=sample_weight)
        critics = self._evaluate_critics(out, out["x"], out["y"], with_gradient=False)
        return self._update_metrics(out, critics)

    def _step_status(self, scg, costs, grads):
        """0 when every cost and gradient is finite, else the 1-based index of the
        first non-finite cost, or -1 for a non-finite gradient."""
        status = tf.constant(0)
        for index in reversed(range(len(scg.costs))):
            finite = tf.reduce_all(tf.math.is_finite(costs[scg.costs[index]]))
            status = tf.where(finite, status, index + 1)
        grads_finite = tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None] or [True]
        )
        return tf.where(tf.logical_and(tf.equal(status, 0), tf.logical_not(grads_finite)), -1, status)

    @staticmethod
    def _mask_status(scg, records, status):
        """`(status, row)`: `status`, or `len(scg.costs) + 1 + j` where node `j`'s
        Categorical mask allows no outcome in batch row `row` (the first such
        node and row). Outside XLA the node's own assertion stops the step
        first; under XLA, which drops assertions, its sample is NaN and this
        names the cause instead of the cost it made non-finite."""
        row = tf.constant(0)
        for index in reversed(range(len(scg.nodes))):
            record = records[scg.nodes[index].name]
            if record.mask is None or not hasattr(record.layer, "empty_rows"):
                continue
            empty = tf.reshape(record.layer.empty_rows(record.mask), [-1])
            found = tf.reduce_any(empty)
            status = tf.where(found, len(scg.costs) + 1 + index, status)
            row = tf.where(found, tf.argmax(tf.cast(empty, tf.int32), output_type=tf.int32), row)
        return status, row

    def raise_if_nonfinite(self):
        """Raises `FloatingPointError` if a training step met a non-finite value."""
        code = int(self.machinery.status.numpy())
        if code == 0:
            return
        self.machinery.status.assign(0)
        row = int(self.machinery.status_row.numpy())
        self.machinery.status_row.assign(0)
        if code > len(self._scg.costs):
            node = self._scg.nodes[code - len(self._scg.costs) - 1].name
            raise FloatingPointError(
                f"Model {self.name!r}: Categorical node {node!r}: row {row} of its mask allows no "
                "outcome in a training step (the row of the step's batch; with num_samples=K the "
                "example is row // K). The step was skipped: nothing it would have written was "
                "kept. Give every example at least one allowed outcome (a no-op action, say)."
            )
        if code > 0:
            cause = f"cost {self._scg.costs[code - 1]!r} was not finite (NaN or inf)"
            fix = f"Check the layers that compute {self._scg.costs[code - 1]!r} (log of 0, division by 0, overflow)."
        elif code == -1:
            cause = "the gradient was not finite although every cost was"
            fix = "Lower the learning rate or clip the parameters feeding the stochastic nodes."
        else:
            variable, role = self._step_variables()[-2 - code]
            cause = (
                f"the update would have written a non-finite value (NaN or inf) into "
                f"{role} {variable.path!r}, although every cost was finite"
            )
            fix = (
                "Costs or gradients this large overflow the optimizers (their squared "
                "gradients, say): scale the costs down, lower the learning rate or clip "
                "the gradients (clipnorm=)."
            )
        raise FloatingPointError(
            f"Model {self.name!r}: {cause} in a training step. Nothing that step would "
            "have written was kept, so every weight, critic, target copy, optimizer "
            f"slot and estimator state holds finite values. {fix}"
        )

    def _update_metrics(self, out, critics=None):
        x, y, sample_weight = out["x"], out["y"], out["weights"]
        total = out["total"]
        _keras_compat.loss_tracker(self).update_state(
            _weighted_mean(total, sample_weight) + out["regularization"], sample_weight=tf.shape(total)[0]
        )
        # Every cost's log is weighted as `loss` is, so they add up to it.
        for metric in self.machinery.cost_metrics:
            metric.update_state(
                _weighted_mean(out["costs"][metric.name], sample_weight), sample_weight=tf.shape(total)[0]
            )
        if critics is not None:
            for name, (loss_metric, td_metric, q_metric) in self.machinery.critic_metrics.items():
                loss, td_error = critics["per_node"][name]
                loss_metric.update_state(loss)
                td_metric.update_state(td_error)
                q_metric.update_state(tf.add_n(list(critics["q_at_sample"][name].values())))
        return self.compute_metrics(x, y, out["y_pred"], sample_weight)

    def get_metrics_result(self):
        """`keras.Model.get_metrics_result`, refusing two terms logged under one
        name (Keras would keep only the last one's value)."""
        results, owners = {}, {}
        cost_metrics = {id(m) for m in self.machinery.cost_metrics}
        for metric in self.metrics:
            result = metric.result()
            if isinstance(result, dict):
                items, owner = result.items(), "compile(metrics=...)"
            else:
                items = [(metric.name, result)]
                owner = (
                    "the total objective" if metric is _keras_compat.loss_tracker(self)
                    else "a cost" if id(metric) in cost_metrics
                    else f"metric {metric.name!r}"
                )
            for name, value in items:
                if name in results:
                    raise ValueError(
                        f"Model {self.name!r} logs two values under the name {name!r}: "
                        f"{owners[name]} and {owner}. Rename the cost or metric."
                    )
                results[name], owners[name] = value, owner
        return results

    # -- fit ---------------------------------------------------------------
    def evaluate(self, *args, **kwargs):
        # Training state is created before Keras traces a (distributed) step.
        self.build_training_state()
        return super().evaluate(**_weights_without_targets(super().evaluate, args, kwargs))

    def fit(self, *args, **kwargs):
        # Before tracing, and optimizer slots before BackupAndRestore restores.
        self.build_training_state()
        kwargs = _weights_without_targets(super().fit, args, kwargs)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        # The guard and the position run first, so that no checkpointing
        # callback saves after a failed step, and every checkpoint knows where
        # fit stands; the resume runs after BackupAndRestore has restored.
        callbacks = (
            [NonFiniteGuard(), saving_lib.FitPosition(callbacks)]
            + callbacks
            + [saving_lib.ResumeAtPosition()]
        )
        try:
            return super().fit(callbacks=callbacks, **kwargs)
        finally:
            saving_lib.FitPosition.clear(self)

    def train_on_batch(self, *args, **kwargs):
        self.build_training_state()
        logs = super().train_on_batch(*args, **kwargs)
        self.raise_if_nonfinite()
        return logs

    # -- config ------------------------------------------------------------
    def get_config(self):
        if self.network is None:
            return super().get_config()
        return {
            "name": self.name,
            "trainable": self.trainable,
            "network": keras.saving.serialize_keras_object(self.network),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        if "network" in config:
            config = dict(config)
            network = saving_lib.deserialize_network(config.pop("network"), custom_objects)
            return cls(network=network, **config)
        return super().from_config(config)

    # -- saving and export -------------------------------------------------
    def input_signature(self):
        """The model's inputs as a structure of `tf.TensorSpec` with a dynamic
        batch dimension, or None while they are unknown (a subclassed model
        never called)."""
        if self._scg_spec is not None:
            return self._scg_spec
        if self.network is not None:
            return self._input_spec_from_network()
        return getattr(self, "_call_input_spec", None)

    def __call__(self, *args, **kwargs):
        # A subclassed model's input signature, for its build config and for
        # creating the training state before a checkpoint is restored.
        if args and self.network is None and getattr(self, "_call_input_spec", None) is None:
            try:
                self._call_input_spec = tf.nest.map_structure(_batchless_spec, args[0])
            except (TypeError, ValueError, AttributeError):
                pass
        return super().__call__(*args, **kwargs)

    def build_training_state(self):
        """Creates now what training creates on first use: the critics, their
        target copies, estimator state and both optimizers' slots.

        Saving, loading and `fit` call it, so every checkpoint has the layout
        of a model that has trained. Returns False (doing nothing) while the
        model is not compiled or its inputs are unknown.
        """
        spec = self.input_signature()
        if not self.compiled or spec is None:
            return False
        self.scg(spec)
        self._ensure_machinery()
        with self.distribute_strategy.scope():
            if self.optimizer is not None and not self.optimizer.built:
                self.optimizer.build(self.actor_variables)
            critic_variables = self.critic_variables
            if critic_variables and not self.critic_optimizer.built:
                self.critic_optimizer.build(critic_variables)
        return True

    def get_build_config(self):
        config = dict(super().get_build_config() or {})
        spec = self.input_signature()
        if spec is not None:
            config["input_spec"] = saving_lib.serialize_spec(spec)
        return config or None

    def build_from_config(self, config):
        spec = saving_lib.deserialize_spec((config or {}).get("input_spec"))
        if spec is None:
            return super().build_from_config(config)
        self._call_input_spec = spec
        if self.network is None and not self.built:
            # Subclassed: run call() once to create the layers' variables.
            tf.function(lambda i: self(i, training=True), autograph=False).get_concrete_function(spec)
        self.built = True

    def get_compile_config(self):
        arguments = getattr(self, "_compile_arguments", None)
        if not self.compiled or arguments is None:
            return super().get_compile_config()
        return saving_lib.serialize_compile_config(arguments, self.optimizer, self.critic_optimizer)

    def compile_from_config(self, config):
        """Recompiles a loaded model and recreates its training state (critics,
        target copies, estimator state, optimizer slots) for the weights."""
        self.compile(**saving_lib.deserialize_compile_config(config))
        self.build_training_state()

    def _check_savable(self, what):
        self.build_training_state()
        variables = list(self.variables)
        for optimizer in (getattr(self, "optimizer", None), self.critic_optimizer):
            if optimizer is not None:
                variables += list(optimizer.variables)
        saving_lib.check_finite(variables, f"{what} of {self.name!r}")

    def save(self, filepath, overwrite=True, zipped=None, **kwargs):
        """`keras.Model.save`, written atomically (a temporary file renamed over
        `filepath`), with the training state; refuses non-finite values."""
        self._check_savable("the model")
        if zipped is False or not saving_lib.atomic_target(filepath, ".keras", overwrite):
            return super().save(filepath, overwrite=overwrite, zipped=zipped, **kwargs)
        with saving_lib.atomic_write(filepath) as temporary:
            super().save(temporary, overwrite=True, zipped=zipped, **kwargs)

    def save_weights(self, filepath, overwrite=True, max_shard_size=None):
        """`keras.Model.save_weights`, written atomically, with the training
        state (critics, target copies, estimator state, seed generators, both
        optimizers, the fit position); refuses non-finite values."""
        self._check_savable("the weights")
        if max_shard_size is not None or not saving_lib.atomic_target(filepath, ".weights.h5", overwrite):
            return super().save_weights(filepath, overwrite=overwrite, max_shard_size=max_shard_size)
        with saving_lib.atomic_write(filepath) as temporary:
            super().save_weights(temporary, overwrite=True)

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """`keras.Model.load_weights`, after creating the training state the
        file holds (compile the model first, with the options it was saved with)."""
        ready = self.build_training_state()
        with saving_lib.explained_load_errors(self, filepath, ready, strict=not skip_mismatch):
            return super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """Exports the stochastic forward pass as a SavedModel for TF Serving.

        Signatures `serving_default` (samples), `mode` (most likely values) and
        `seeded` (samples fixed by an int64 `seed` input per example); no
        critics, target copies, estimator state or optimizer state. See
        `keras_bpq.export.export`.
        """
        if format != "tf_saved_model":
            raise ValueError(
                f"BackpropQModel.export supports format='tf_saved_model' only; got "
                f"{format!r}. Stochastic nodes need TF's stateless random ops."
            )
        if kwargs:
            raise TypeError(f"Unexpected export arguments {sorted(kwargs)}.")
        return export_lib.export(
            self, filepath, input_signature=input_signature, verbose=verbose is None or verbose
        )


@dataclasses.dataclass(frozen=True)
class CriticOptions:
    """The critic settings of `compile()` (a plain object: Keras does not track it)."""

    target: str = "td"
    lam: float = 0.9
    tau: float = 0.01
    period: object = None
    steps: int = 1
    warmup: int = 0
    hidden_units: tuple = (64, 64)
    models: dict = dataclasses.field(default_factory=dict)
    actor_reads_target: bool = True


def _critic_options(
    target="td", lam=0.9, tau=0.01, period=None, steps=1, warmup=0,
    hidden_units=(64, 64), models=None, actor_reads="target",
):
    return CriticOptions(
        target=target,
        lam=float(lam),
        tau=float(tau),
        period=period,
        steps=int(steps),
        warmup=int(warmup),
        hidden_units=tuple(hidden_units),
        models=dict(models or {}),
        actor_reads_target=actor_reads == "target",
    )


def _batchless_spec(value):
    if isinstance(value, tf.TensorSpec):
        return tf.TensorSpec((None,) + tuple(value.shape[1:]), value.dtype)
    value = tf.convert_to_tensor(value) if not hasattr(value, "shape") else value
    return tf.TensorSpec((None,) + tuple(value.shape[1:]), tf.as_dtype(value.dtype))


def _num_replicas():
    context = tf.distribute.get_replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def _global_sum(value):
    """Sum over replicas (the value itself outside tf.distribute)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def _global_mean(value):
    """Mean of a per-example tensor over the global batch (equal replica batches)."""
    return _global_sum(tf.reduce_mean(value)) / _num_replicas()


def _weight_penalties(variables):
    """The penalties of the variables' Keras weight regularisers."""
    return [v.regularizer(v) for v in variables if getattr(v, "regularizer", None) is not None]


def _sum_losses(losses):
    if not losses:
        return tf.constant(0.0)
    return tf.add_n([tf.cast(loss, tf.float32) for loss in losses])


def _all_finite(variables):
    """Whether every floating variable holds finite values only (one check per
    dtype over all of them: a step pays a few ops, not a few per variable)."""
    by_dtype = {}
    for v in variables:
        if tf.as_dtype(v.dtype).is_floating:
            by_dtype.setdefault(tf.as_dtype(v.dtype), []).append(tf.reshape(v.value, [-1]))
    checks = [tf.reduce_all(tf.math.is_finite(tf.concat(flat, 0))) for flat in by_dtype.values()]
    return tf.reduce_all(checks) if checks else tf.constant(True)


def _first_nonfinite(variables):
    """The index of the first floating variable holding a NaN or inf, or -1."""
    finite = [
        tf.reduce_all(tf.math.is_finite(v.value)) if tf.as_dtype(v.dtype).is_floating else tf.constant(True)
        for v in variables
    ]
    if not finite:
        return tf.constant(-1)
    finite = tf.stack(finite)
    first = tf.cast(tf.argmin(tf.cast(finite, tf.int32)), tf.int32)
    return tf.where(tf.reduce_all(finite), -1, first)


def _no_targets(x):
    """A `[n, 0]` boolean array standing for "no targets" next to the `n`
    examples of `x` (see `_weights_without_targets`)."""
    rows = len(tf.nest.flatten(x)[0])
    return np.zeros((rows, 0), dtype=bool)


def _is_no_targets(y):
    return (
        isinstance(y, (tf.Tensor, np.ndarray))
        and y.dtype == bool
        and len(y.shape) == 2
        and y.shape[1] == 0
    )


def _unpack(data):
    """`(x, y, sample_weight)` of a batch, with y None where it is `_no_targets`."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    return x, (None if _is_no_targets(y) else y), sample_weight


def _weights_without_targets(method, args, kwargs):
    """`method`'s (`keras.Model.fit` or `.evaluate`) arguments as keywords,
    with sample weights given without targets carried by a `_no_targets` array.

    Keras packs arrays as `(x, y, sample_weight)` only when `y` is given and
    drops the weights otherwise (`pack_x_y_sample_weight`); a BackpropQModel
    usually has no targets. Validation data `(x, None, w)` is rewritten alike.
    """
    bound = inspect.signature(method).bind(*args, **kwargs)
    arguments = bound.arguments
    x = arguments.get("x")
    if arguments.get("y") is None and arguments.get("sample_weight") is not None and x is not None:
        if _array_like(x):
            arguments["y"] = _no_targets(x)
    validation = arguments.get("validation_data")
    if isinstance(validation, (tuple, list)) and len(validation) == 3:
        val_x, val_y, val_w = validation
        if val_y is None and val_w is not None and _array_like(val_x):
            arguments["validation_data"] = (val_x, _no_targets(val_x), val_w)
    keywords = dict(arguments)
    keywords.update(keywords.pop("kwargs", {}))
    return keywords


def _array_like(x):
    """Whether every leaf of `x` is an array or tensor (Keras' array adapter)."""
    leaves = tf.nest.flatten(x)
    return bool(leaves) and all(hasattr(leaf, "shape") and hasattr(leaf, "dtype") for leaf in leaves)


def _global_weighted_mean(value, sample_weight):
    """`sum_i w_i v_i / sum_i w_i` over the global batch (the plain mean without
    weights; 0 where every weight is 0)."""
    if sample_weight is None:
        return _global_mean(value)
    weight = tf.reshape(tf.cast(sample_weight, value.dtype), [-1])
    sums = _global_sum(tf.stack([tf.reduce_sum(value * weight), tf.reduce_sum(weight)]))
    return tf.math.divide_no_nan(sums[0], sums[1])


_weighted_mean = costs_lib.weighted_mean
