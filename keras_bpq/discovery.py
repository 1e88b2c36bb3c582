"""How a `BackpropQModel` finds its stochastic computation graph and creates
what training needs for it (`ScgDiscovery`, a mixin of the model, as Keras'
`Trainer` is of `keras.Model`).

Discovery traces the forward pass once per input signature (`graph.discover`),
checks what it found, applies `compile(contexts=...)`, and chooses every node's
estimator; the first discovery fixes the model's SCG and its Q-function. The
training state (estimator state, critics, both optimizers' slots) is created
in one place, `build_training_state` (training creates what is missing on
first use, through the same code).
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable, Mapping, Optional, Union

import keras
import tensorflow as tf

from keras_bpq import _keras_compat
from keras_bpq import costs as costs_lib
from keras_bpq import critics as critics_lib
from keras_bpq import estimators as estimators_lib
from keras_bpq import forward as forward_lib
from keras_bpq import graph
from keras_bpq import q_values


class ScgDiscovery:
    """The SCG of a `BackpropQModel`, its estimators and its training state."""

    def _input_spec_from_network(self):
        return tf.nest.map_structure(graph.batchless_spec, _keras_compat.functional_inputs(self.network))

    # -- structure ---------------------------------------------------------
    @property
    def known_scg(self) -> Optional[graph.SCG]:
        """The SCG found by the first discovery (`keras_bpq.graph.SCG`), or None
        before it. Unlike `scg()`, reading it never traces or discovers."""
        return self._scg

    @property
    def node_estimators(self) -> Optional[Mapping[str, estimators_lib.Estimator]]:
        """`{node name: estimator}` (`keras_bpq.estimators.Estimator`) chosen for
        the SCG, read-only; None before the SCG is known. Reading it creates
        nothing."""
        if self._node_estimators is None:
            return None
        return types.MappingProxyType(self._node_estimators)

    def scg(self, x: Any = None) -> graph.SCG:
        """The model's stochastic computation graph (`keras_bpq.graph.SCG`).

        `x` is a batch of inputs or a structure of `tf.TensorSpec`; it may be
        omitted once the structure is known. The SCG of an input signature
        seen before is answered from the cache; a new one is discovered
        (`discover`).
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
        spec = tf.nest.map_structure(graph.batchless_spec, x)
        cached = self._scg_cache.get(_signature(spec))
        return cached if cached is not None else self.discover(spec)

    def discover(self, x: Any) -> graph.SCG:
        """Traces the forward pass on inputs like `x` (a batch or a structure
        of `tf.TensorSpec`) and returns the SCG it shows, cached for `x`'s
        input signature. The first discovery fixes the model's SCG
        (`known_scg`), its estimators and its Q-function; a later one that
        differs from it is a ValueError."""
        spec = tf.nest.map_structure(graph.batchless_spec, x)
        scg = self._scg_cache[_signature(spec)] = self._discover(spec)
        return scg

    def _discover(self, spec):
        compiled = self._compiled_losses
        if not self.built:
            # Build once outside any recorder: Keras may run call() to build.
            self._build_by_tracing(spec)

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
            self.q_function = self._q_function(scg)
        elif scg.node_names != self._scg.node_names or scg.costs != self._scg.costs:
            raise ValueError(
                f"Model {self.name!r} built a different SCG for inputs {spec}: nodes "
                f"{scg.node_names} and costs {scg.costs}, where earlier inputs gave "
                f"nodes {self._scg.node_names} and costs {self._scg.costs}."
            )
        return scg

    def _q_function(self, scg):
        """The `q_values.QFunction` of `scg` for the last `compile()`: its
        re-runs are `forward.record` of the model's Keras call with the
        compiled losses bound."""
        rerun = functools.partial(forward_lib.record, self, self._compiled_losses, scg.costs)
        return q_values.QFunction(
            scg, self.training_state.critics, self.network, rerun,
            q_values.common_noise_nodes(self._node_estimators),
        )

    def _build_by_tracing(self, spec):
        """Runs `call()` once, traced on inputs like `spec` (a structure of
        `tf.TensorSpec`), so that its layers create their variables."""
        tf.function(lambda i: self(i, training=True), autograph=False).get_concrete_function(spec)

    def _rediscover(self, contexts):
        """For `compile()`: takes its `contexts=` and finds the SCG again with
        the new options (where nothing is built from it yet; else chooses the
        estimators again), so every error of the options shows in `compile()`."""
        contexts = {k: tuple(v) for k, v in (contexts or {}).items()}
        if self.training_state.built and contexts != self._contexts:
            raise ValueError(
                "contexts= cannot change after the model's critics exist; build a new model."
            )
        self._contexts = contexts
        spec = self._scg_spec
        if not self.training_state.built:
            # Nothing is built from the structure yet: rediscover it with the
            # new options, so every error shows here.
            self._scg, self._scg_cache = None, {}
        if spec is not None:
            self.scg(spec)
        elif self.network is not None:
            self.scg(self._input_spec_from_network())
        if self.training_state.built:
            self._resolve_estimators(self._scg)
        if self._scg is not None:
            self.q_function = self._q_function(self._scg)  # with this compile()'s losses
            # Their errors show here.
            critics_lib.heads_to_learn(self._scg, self._node_estimators, self._critic_options)
            self.replay_layout(self._scg)

    def input_signature(self) -> Optional[Any]:
        """The model's inputs as a structure of `tf.TensorSpec` with a dynamic
        batch dimension, or None while they are unknown (a subclassed model
        never called)."""
        if self._scg_spec is not None:
            return self._scg_spec
        if self.network is not None:
            return self._input_spec_from_network()
        return self._call_input_spec

    def __call__(self, *args, **kwargs):
        # A subclassed model's input signature, for its build config and for
        # creating the training state before a checkpoint is restored.
        if args and self.network is None and self._call_input_spec is None:
            try:
                self._call_input_spec = tf.nest.map_structure(graph.batchless_spec, args[0])
            except (TypeError, ValueError, AttributeError):
                pass
        return super().__call__(*args, **kwargs)

    def build_training_state(self) -> bool:
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
        self._create_training_state()
        with self.distribute_strategy.scope():
            if self.optimizer is not None and not self.optimizer.built:
                self.optimizer.build(self.actor_variables)
            critic_variables = self.critic_variables
            if critic_variables and not self.critic_optimizer.built:
                self.critic_optimizer.build(critic_variables)
        return True

    def _create_training_state(self):
        """Creates estimator state and critics on first use
        (after the last `compile()`, so recompiling before training may change
        estimators); `build_training_state` also builds the optimizers."""
        if self.training_state.built:
            return
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            raise RuntimeError(
                f"Model {self.name!r}: its critics and estimator state must be created "
                "before a distributed step runs. Call model.scg(example_batch) under "
                "strategy.scope() before fit(), or use a functional BackpropQModel."
            )
        scg, options = self._scg, self._critic_options
        layout = self.replay_layout(scg, check_targets=True)
        replay = None if layout is None else (self._replay.capacity, layout)
        with self.distribute_strategy.scope():
            heads = critics_lib.heads_to_learn(scg, self._node_estimators, options)
            dims = critics_lib.feature_dims(scg, self._scg_spec)
            self.training_state.setup(
                scg, self._node_estimators, heads, dims, options.models, options.hidden_units, replay
            )
            critic_variables = self.critic_variables
            if critic_variables:
                if self.critic_optimizer is None:
                    self.critic_optimizer = get_critic_optimizer()
                self.critic_optimizer.build(critic_variables)

    def _resolve_estimators(self, scg):
        built = self._node_estimators is not None and self.training_state.built
        self._node_estimators = estimators_lib.resolve(
            self._estimator_option, scg, self.node_layer, self._num_samples,
            created=self._node_estimators if built else None,
        )

    def node_layer(self, info: graph.NodeInfo) -> keras.layers.Layer:
        """The node layer that made node `info` (a `keras_bpq.graph.NodeInfo` of
        `scg()`); a KeyError naming the layer if the model holds none."""
        for layer in _keras_compat.flatten_layers(self, include_self=False):
            if layer.name == info.layer_name:
                return layer
        raise KeyError(info.layer_name)

    def scg_summary(self, x: Any = None, print_fn: Callable[[str], Any] = print) -> str:
        """Prints the SCG: node, distribution, context, costs, estimator, critic."""
        scg = self.scg(x)
        self._create_training_state()
        text = graph.format_scg(
            scg,
            estimators={n: e.describe() for n, e in self._node_estimators.items()},
            critics=critics_lib.describe(scg, self._node_estimators, self.training_state.critics),
        )
        print_fn(text)
        return text


def get_critic_optimizer(
    identifier: Union[None, str, keras.optimizers.Optimizer] = None,
) -> keras.optimizers.Optimizer:
    """The critics' optimizer: `identifier` as `keras.optimizers.get` reads it,
    or, without one, a fresh `Adam(1e-3)`."""
    return keras.optimizers.get(identifier or keras.optimizers.Adam(1e-3))


def _signature(spec):
    """The cache key of an input signature (shapes and dtypes)."""
    return tuple((tuple(s.shape), s.dtype.name) for s in tf.nest.flatten(spec))
