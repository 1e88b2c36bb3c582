"""How a `BackpropQModel` finds its stochastic computation graph and creates
what training needs for it.

What `compile()` and discovery decide is one frozen value, `Setup`, that the
model holds and replaces whole; the functions here take it (and the parts of
the model they use, as arguments) and return a new one, and never call back
into the model.

Discovery traces the forward pass once per input signature (`graph.discover`),
checks what it found, applies `compile(contexts=...)`, and chooses every node's
estimator; the first discovery fixes the model's SCG and its Q-function. The
training state (estimator state, critics, the critics' optimizer slots) is
created in one place, `create_training_state`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import keras
import tensorflow as tf

from keras_bpq import _keras_compat
from keras_bpq import costs as costs_lib
from keras_bpq import critics as critics_lib
from keras_bpq import estimators as estimators_lib
from keras_bpq import forward as forward_lib
from keras_bpq import graph
from keras_bpq import q_values
from keras_bpq import replay as replay_lib
from keras_bpq import saving as saving_lib
from keras_bpq import state as state_lib


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a model's `compile()` and the discovery of its SCG decided. The
    model holds one and replaces it whole (`dataclasses.replace`); a fresh
    model's is `Setup()`.

    Attributes:
      estimator_option: `compile(estimator=...)`.
      compiled_losses: the per-example costs of `compile(loss=...)`
        (`costs.CompiledLosses`).
      num_samples: draws per example in every step.
      critic_options: the critic settings (`critics.CriticOptions`).
      replay: `compile(replay=...)` (`keras_bpq.Replay`), or None.
      contexts: `compile(contexts=...)`, `{node: (name, ...)}`.
      compile_arguments: every argument of the last `compile()`, for saving
        (`saving.CompileArguments`), or None.
      scg: the SCG of the first discovery (`graph.SCG`), or None before it.
      spec: its input signature (a structure of `tf.TensorSpec`), or None.
      cache: `{signature: SCG}`, the SCG of every input signature discovered.
      node_estimators: `{node: estimators.Estimator}` for `scg`, read-only, or
        None before it.
      q_function: the `q_values.QFunction` of `scg` and `compiled_losses`, or None.
      target_spec: the targets' signature of the data given to training, for a
        replay buffer that stores targets, or None while unknown.
    """

    estimator_option: Union[str, estimators_lib.Estimator, Mapping[str, Any]] = "auto"
    compiled_losses: costs_lib.CompiledLosses = dataclasses.field(
        default_factory=lambda: costs_lib.CompiledLosses(None)
    )
    num_samples: int = 1
    critic_options: critics_lib.CriticOptions = dataclasses.field(default_factory=critics_lib.critic_options)
    replay: Optional[replay_lib.Replay] = None
    contexts: Mapping[str, Tuple[str, ...]] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({})
    )
    compile_arguments: Optional[saving_lib.CompileArguments] = None
    scg: Optional[graph.SCG] = None
    spec: Any = None
    cache: Mapping[Tuple[Any, ...], graph.SCG] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({})
    )
    node_estimators: Optional[Mapping[str, estimators_lib.Estimator]] = None
    q_function: Optional[q_values.QFunction] = None
    target_spec: Any = None

    def replay_layout(
        self, scg: graph.SCG, model_name: str, check_targets: bool = False
    ) -> Optional[replay_lib.ReplayLayout]:
        """What a row of the replay buffer holds (`replay.ReplayLayout`), or
        None without `replay`: `keras_bpq.replay.layout` of these options, with
        its errors (`check_targets`: also where the targets' signature the
        buffer stores is unknown)."""
        return replay_lib.layout(
            self.replay, scg, self.node_estimators, self.critic_options, self.compiled_losses,
            self.spec, self.target_spec, model_name, check_targets,
        )


def input_spec(network: keras.Model) -> Any:
    """A functional `network`'s inputs as a structure of `tf.TensorSpec` with a
    dynamic batch dimension."""
    return tf.nest.map_structure(graph.batchless_spec, _keras_compat.functional_inputs(network))


def find_scg(
    setup: Setup, x: Any, model: keras.Model, critics: Mapping[str, critics_lib.Critic],
    network: Optional[keras.Model],
) -> Tuple[graph.SCG, Setup]:
    """`(scg, setup)`: the SCG of inputs like `x` (a batch or a structure of
    `tf.TensorSpec`; None: `setup.scg` once known, else the functional
    `network`'s inputs, and a ValueError for a subclassed `model` not called
    yet), answered from `setup.cache` for an input signature seen before and
    else discovered (`discover`), and `setup` with it cached."""
    if x is None and setup.scg is not None:
        return setup.scg, setup
    if x is None and network is None:
        raise ValueError(
            f"The SCG of {model.name!r} is not known yet: pass a batch of "
            "inputs, or train or evaluate first."
        )
    spec = tf.nest.map_structure(graph.batchless_spec, input_spec(network) if x is None else x)
    cached = setup.cache.get(_signature(spec))
    return (cached, setup) if cached is not None else discover(setup, spec, model, critics, network)


def discover(
    setup: Setup, x: Any, model: keras.Model, critics: Mapping[str, critics_lib.Critic],
    network: Optional[keras.Model],
) -> Tuple[graph.SCG, Setup]:
    """Traces `model`'s forward pass (its Keras call) on inputs like `x` (a
    batch or a structure of `tf.TensorSpec`) and returns `(scg, setup)`: the
    SCG it shows, and `setup` with it cached for `x`'s input signature. The
    first discovery fixes the SCG (`Setup.scg`, `Setup.spec`), its
    estimators and its Q-function (on the model's `critics` and functional
    `network`, None for a subclassed model); a later one that differs from it
    is a ValueError."""
    spec = tf.nest.map_structure(graph.batchless_spec, x)
    compiled = setup.compiled_losses
    if not model.built:
        # Build once outside any recorder: Keras may run call() to build.
        build_by_tracing(model, spec)

    def forward(inputs):
        return compiled.dependencies(model(inputs, training=True))

    scg, cost_shapes = graph.discover(forward, spec, check_names=costs_lib.check_names)
    if not scg.nodes:
        raise ValueError(
            f"Model {model.name!r} has no stochastic node: its forward pass never "
            "called a keras_bpq node layer (Bernoulli, Categorical, Normal, "
            "StochasticNode). Use keras.Model for deterministic models."
        )
    if not scg.costs:
        raise ValueError(
            f"Model {model.name!r} has no cost: pass costs={{...}} to the "
            "constructor, call keras_bpq.add_cost() in call(), or compile(loss=...)."
        )
    for name, shape in cost_shapes.items():
        if name not in compiled.names:
            costs_lib.check_per_example(name, shape)
    scg = graph.with_contexts(scg, setup.contexts)
    if setup.scg is None:
        estimators = _resolve_estimators(setup, scg, model, None)
        setup = dataclasses.replace(
            setup, scg=scg, spec=spec, node_estimators=estimators,
            q_function=q_function(scg, compiled, estimators, model, critics, network, setup.num_samples),
        )
    elif scg.node_names != setup.scg.node_names or scg.costs != setup.scg.costs:
        raise ValueError(
            f"Model {model.name!r} built a different SCG for inputs {spec}: nodes "
            f"{scg.node_names} and costs {scg.costs}, where earlier inputs gave "
            f"nodes {setup.scg.node_names} and costs {setup.scg.costs}."
        )
    cache = types.MappingProxyType({**setup.cache, _signature(spec): scg})
    return scg, dataclasses.replace(setup, cache=cache)


def q_function(
    scg: graph.SCG, compiled_losses: costs_lib.CompiledLosses,
    node_estimators: Mapping[str, estimators_lib.Estimator], model: keras.Model,
    critics: Mapping[str, critics_lib.Critic], network: Optional[keras.Model], num_samples: int,
) -> q_values.QFunction:
    """The `q_values.QFunction` of `scg` on `critics`: its re-runs are
    `forward.record` of `model`'s Keras call with `compiled_losses` bound;
    the nodes whose `node_estimators` ask for common noise get its heads;
    a training pass draws `num_samples` per example."""
    rerun = functools.partial(forward_lib.record, model, compiled_losses, scg.costs)
    return q_values.QFunction(
        scg, critics, network, rerun, q_values.common_noise_nodes(node_estimators), num_samples
    )


def build_by_tracing(model: keras.Model, spec: Any) -> None:
    """Runs `model`'s `call()` once, traced on inputs like `spec` (a structure
    of `tf.TensorSpec`), so that its layers create their variables."""
    tf.function(lambda i: model(i, training=True), autograph=False).get_concrete_function(spec)


def compile_options(
    arguments: saving_lib.CompileArguments, training_state: state_lib.TrainingState, model_name: str
) -> Tuple[critics_lib.CriticOptions, Optional[replay_lib.Replay]]:
    """For `compile()`, before Keras compiles: the critic settings
    (`critics.critic_options`) and the replay option
    (`replay.checked_option`, against the model's `training_state`) of
    `compile()`'s `arguments`; a ValueError for `loss_weights=`, which a
    model of costs does not take."""
    values = arguments.values
    if values.get("loss_weights") is not None:
        raise ValueError(
            "BackpropQModel does not take loss_weights: scale a cost where it "
            "is computed instead."
        )
    options = critics_lib.critic_options(*(values[k] for k in (
        "critic_target", "critic_lambda", "tau", "target_update_period", "critic_steps",
        "critic_warmup_steps", "critic_hidden_units", "critics", "actor_reads", "critic_update_period",
    )))
    return options, replay_lib.checked_option(values["replay"], training_state, model_name)


def compiled(
    setup: Setup, arguments: saving_lib.CompileArguments, options: critics_lib.CriticOptions,
    replay: Optional[replay_lib.Replay], state_built: bool,
) -> Setup:
    """For `compile()`, after Keras compiled: `setup` with the compiled
    options (`options` and `replay` of `compile_options`; `num_samples`,
    `loss`, `estimator` and `contexts` of `arguments`), its SCG forgotten
    where nothing is built from it yet (`state_built` is whether the training
    state exists; `rediscover` finds it again with the new options)."""
    values = arguments.values
    if int(values["num_samples"]) < 1:
        raise ValueError(f"num_samples must be at least 1; got {values['num_samples']}.")
    contexts = {k: tuple(v) for k, v in (values["contexts"] or {}).items()}
    if state_built and contexts != setup.contexts:
        raise ValueError(
            "contexts= cannot change after the model's critics exist; build a new model."
        )
    setup = dataclasses.replace(
        setup, critic_options=options, replay=replay, num_samples=int(values["num_samples"]),
        compiled_losses=costs_lib.CompiledLosses(values["loss"]), estimator_option=values["estimator"],
        contexts=types.MappingProxyType(contexts),
    )
    if not state_built:
        setup = dataclasses.replace(setup, scg=None, cache=types.MappingProxyType({}))
    return setup


def rediscover(
    setup: Setup, model: keras.Model, critics: Mapping[str, critics_lib.Critic],
    network: Optional[keras.Model], state_built: bool, arguments: saving_lib.CompileArguments,
) -> Setup:
    """For `compile()`, after `compiled`: `setup` with the SCG found again for
    its known inputs (`Setup.spec`, else the functional `network`'s; none
    for a subclassed model not called yet) where nothing is built from it
    yet, else (`state_built`) the estimators chosen again. The Q-function
    takes the new compiled losses, every error of the options shows here,
    and then `compile()`'s `arguments` are kept (for saving)."""
    if setup.spec is not None or network is not None:
        _, setup = find_scg(setup, setup.spec, model, critics, network)
    if state_built:
        setup = dataclasses.replace(
            setup, node_estimators=_resolve_estimators(setup, setup.scg, model, setup.node_estimators)
        )
    if setup.scg is not None:
        setup = dataclasses.replace(setup, q_function=q_function(
            setup.scg, setup.compiled_losses, setup.node_estimators, model, critics, network, setup.num_samples,
        ))
        # Their errors show here.
        critics_lib.heads_to_learn(setup.scg, setup.node_estimators, setup.critic_options)
        setup.replay_layout(setup.scg, model.name)
    return dataclasses.replace(setup, compile_arguments=arguments)


def create_training_state(
    setup: Setup, training_state: state_lib.TrainingState, strategy: tf.distribute.Strategy,
    critic_optimizer: Optional[keras.optimizers.Optimizer], model_name: str,
) -> Optional[keras.optimizers.Optimizer]:
    """Creates in `training_state`, under `strategy`, what training creates
    on first use for `setup` (after the last `compile()`, so recompiling
    before training may change estimators): every node's estimator state,
    the critics and the replay buffer; and builds the critics' optimizer for
    the critics' variables, `critic_optimizer` or, where it is None, a fresh
    one (`get_critic_optimizer`). Returns the critics' optimizer."""
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        raise RuntimeError(
            f"Model {model_name!r}: its critics and estimator state must be created "
            "before a distributed step runs. Call model.scg(example_batch) under "
            "strategy.scope() before fit(), or use a functional BackpropQModel."
        )
    scg, options, estimators = setup.scg, setup.critic_options, setup.node_estimators
    layout = setup.replay_layout(scg, model_name, check_targets=True)
    replay = None if layout is None else (setup.replay.capacity, layout)
    with strategy.scope():
        heads = critics_lib.heads_to_learn(scg, estimators, options)
        dims = critics_lib.feature_dims(scg, setup.spec)
        training_state.setup(scg, estimators, heads, dims, options.models, options.hidden_units, replay)
        critic_variables = list(training_state.trainable_variables)
        if critic_variables:
            if critic_optimizer is None:
                critic_optimizer = get_critic_optimizer()
            critic_optimizer.build(critic_variables)
    return critic_optimizer


def build_optimizers(
    strategy: tf.distribute.Strategy,
    optimizer: Optional[keras.optimizers.Optimizer], actor_variables: Sequence[tf.Variable],
    critic_optimizer: Optional[keras.optimizers.Optimizer], critic_variables: Sequence[tf.Variable],
) -> None:
    """Builds, under `strategy`, the actor's `optimizer` for `actor_variables`
    and the `critic_optimizer` for `critic_variables` (where there are any),
    each unless it is built already."""
    with strategy.scope():
        if optimizer is not None and not optimizer.built:
            optimizer.build(actor_variables)
        if critic_variables and not critic_optimizer.built:
            critic_optimizer.build(critic_variables)


def _resolve_estimators(setup, scg, model, created):
    """`estimators.resolve` of `setup`'s option for `scg`, read-only; `created`:
    the estimators the nodes' state was created for, or None."""
    return types.MappingProxyType(estimators_lib.resolve(
        setup.estimator_option, scg, functools.partial(node_layer, model), setup.num_samples, created=created,
    ))


def node_layer(model: keras.Model, info: graph.NodeInfo) -> keras.layers.Layer:
    """The node layer of `model` that made node `info` (a `keras_bpq.graph.NodeInfo`
    of its SCG); a KeyError naming the layer if the model holds none."""
    for layer in _keras_compat.flatten_layers(model, include_self=False):
        if layer.name == info.layer_name:
            return layer
    raise KeyError(info.layer_name)


def summary(
    scg: graph.SCG,
    estimators: Mapping[str, estimators_lib.Estimator],
    critics: Mapping[str, critics_lib.Critic],
) -> str:
    """The text of `BackpropQModel.scg_summary` (`graph.format_scg`): every node
    of `scg` with its distribution, context, costs, estimator and critic."""
    return graph.format_scg(
        scg,
        estimators={n: e.describe() for n, e in estimators.items()},
        critics=critics_lib.describe(scg, estimators, critics),
    )


def get_critic_optimizer(
    identifier: Union[None, str, keras.optimizers.Optimizer] = None,
) -> keras.optimizers.Optimizer:
    """The critics' optimizer: `identifier` as `keras.optimizers.get` reads it,
    or, without one, a fresh `Adam(1e-3)`."""
    return keras.optimizers.get(identifier or keras.optimizers.Adam(1e-3))


def _signature(spec):
    """The cache key of an input signature (shapes and dtypes)."""
    return tuple((tuple(s.shape), s.dtype.name) for s in tf.nest.flatten(spec))
