"""Replay for the critics: what forward passes sampled, kept in an in-graph ring buffer.

`compile(replay=Replay(capacity, ...))` keeps, for every row of every training
forward pass (one example, or one (example, draw) pair under
`compile(num_samples=...)`), the row's

* model inputs `x` (any nest of dense numeric tensors of fixed shape;
  others are refused at `compile()` or at the first step, naming the input)
  and, where the model has compiled losses, its targets `y` (their shapes are
  read off the data first given to `fit`);
* every node's sample `x_X` and its *behaviour* log-probability
  `log mu_X(x_X | pa_X)`, under the weights that drew it;
* every cost's realised value and the row's sample weight (1 without weights).

Each training step then gives the learned critics `updates_per_step` extra
updates on rows drawn uniformly from the filled part of the buffer. A drawn
row is *replayed*: the deterministic parts of the model run again under the
current weights with every node forced to its stored sample, which gives the
current policy's parameters `pi_X(. | pa_X)` at the stored parents and the
costs the current weights assign to the stored samples; the critic targets
are computed from that replayed pass (`keras_bpq.targets`) with one of three
off-policy corrections:

| `correction` | target of the learned head `Q^c_{a_j}` on a replayed row | bias |
|---|---|---|
| `"expected"` | `Vbar^c_{a_{j+1}}(s) = sum_x' pi(x' \\| pa) Qbar^c_{a_{j+1}}(x', s)` | none beyond the critics' own: the expectation is exact and needs no ratio |
| `"retrace"` | `G_j = Vbar_{j+1} + min(1, rho_{j+1}) (G_{j+1} - Qbar_{j+1}(x_{j+1}, s))`, `G_m = c` | none beyond the critics' own; multi-step where the policy has not moved |
| `"none"` | the `compile(critic_target=...)` target, as if the row were on-policy | towards the behaviour policy (below) |

"Bias" here is that of the regression's fixed point; the replayed rows'
distribution (past policies', not the current one's) still decides where a
critic of limited capacity fits best. With
`rho_X = pi_X(x_X | pa_X) / mu_X(x_X | pa_X)` the ratio of the current
to the behaviour probability of the stored sample, `a_1 ... a_m` the cost's
stochastic ancestors in execution order, `s` the replayed context and `Qbar`
the target copies. Unrolled, Retrace's target is
`Qbar_j + sum_{t >= j} (prod_{i=j+1}^{t} min(1, rho_i)) delta_t`,
`delta_t = Vbar_{t+1} - Qbar_t(x_t)` (Munos et al. 2016, with no discount and
no intermediate reward): the truncated ratios multiply along the chain, so a
step where the current policy would rarely have drawn the stored sample cuts
the trace there and the target falls back to the expectation. Both
`"expected"` and `"retrace"` sum `Vbar` exactly over a successor's support of
at most 256 outcomes (`targets.MAX_SUPPORT`); a larger or continuous support
(a wide Bernoulli layer, a Normal node) takes instead the heads at one fresh
draw from the current policy at the stored parents, an unbiased estimate of
`Vbar` that still needs no ratio.

`"none"` regresses on targets built from samples the *behaviour* policy drew:
`"td"` bootstraps from `Qbar_{j+1}` at a successor sample drawn by `mu`, `"mc"`
from the realised cost of a whole chain drawn by `mu`, so their mean is
`E_mu[...]` rather than `E_pi[...]`: the critic learns a mixture of the past
policies' values, biased wherever the policy has moved since the row was
stored. The bias shrinks with the buffer's age (a small `capacity`) and is
nil for a fixed policy.

The replayed pass runs the model in training mode, as the step's own pass
does: a layer with state of its own in training mode (BatchNormalization's
moving statistics) sees the replayed rows too.

Replay trains the critics only. The actor's gradient and the estimators'
state (baselines, tuned parameters) are computed from the step's own forward
pass before any replayed update, so an estimator that is unbiased for any
critic (the default `critic_cv`) stays unbiased with replay on; replay changes
how good the critic is, that is the variance.

The buffer is held in non-trainable variables of the model's training state:
it compiles under XLA (`jit_compile=True`), runs inside
`steps_per_execution` loops, is saved with the model's weights (`.weights.h5`
and `.keras`) and restored on resume, with the state of the seed generator
that draws the replayed rows (a `keras.random.SeedGenerator`: stateless
Philox draws). Under `tf.distribute` each replica keeps its own buffer of the
rows it computed and replays them (variables synchronised on read; a write
rewrites the replica's copy of each field, where a single device updates only
the written slots); a checkpoint holds the first replica's buffer, which a
restore gives to every replica.

The model's side of replay are module functions that take what they need as
arguments: the compiled option (`checked_option`), the layout of a row
(`layout`), and a training step's rows and replay updates (`step_rows`,
`step_updates`); the model keeps the targets' signature the buffer stores.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from keras_bpq import _keras_compat
from keras_bpq import critics as critics_lib
from keras_bpq import distribute

if TYPE_CHECKING:
    from keras_bpq import costs as costs_lib
    from keras_bpq import estimators as estimators_lib
    from keras_bpq import forward as forward_lib
    from keras_bpq import graph
    from keras_bpq import state as state_lib

CORRECTIONS = ("expected", "retrace", "none")


@keras.saving.register_keras_serializable(package="keras_bpq")
class Replay:
    """Replay for the critics, passed as `BackpropQModel.compile(replay=...)`.

    Args:
      capacity: rows the buffer holds (a positive int); once full, every new
        row replaces the oldest.
      updates_per_step: extra critic updates per training step, each on one
        batch of replayed rows (a positive int).
      correction: `"expected"`, `"retrace"` or `"none"`: the off-policy
        correction of the replayed targets (module docstring).
      batch_size: rows per replayed batch, or None for the rows of the step's
        own forward pass.
    """

    def __init__(
        self,
        capacity: int,
        updates_per_step: int = 1,
        correction: str = "expected",
        batch_size: Optional[int] = None,
    ) -> None:
        self.capacity = _positive_int(capacity, "capacity", "the number of rows the buffer holds")
        self.updates_per_step = _positive_int(
            updates_per_step, "updates_per_step", "the extra critic updates per step"
        )
        if correction not in CORRECTIONS:
            raise ValueError(
                f"Replay(correction=...) must be one of {list(CORRECTIONS)}; got {correction!r}."
            )
        self.correction = correction
        self.batch_size = None if batch_size is None else _positive_int(
            batch_size, "batch_size", "rows per replayed batch, or None for the step's own batch size"
        )

    def get_config(self) -> Dict[str, Any]:
        return {
            "capacity": self.capacity,
            "updates_per_step": self.updates_per_step,
            "correction": self.correction,
            "batch_size": self.batch_size,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Replay:
        return cls(**config)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Replay) and self.get_config() == other.get_config()

    def __repr__(self) -> str:
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"Replay({arguments})"


def _positive_int(value, name, meaning):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Replay({name}=...) must be a positive int ({meaning}); got {value!r}.")
    return int(value)


def check_option(replay: Any) -> Optional[Replay]:
    """`compile(replay=...)`'s value: a `Replay` or None; anything else is a TypeError."""
    if replay is None or isinstance(replay, Replay):
        return replay
    raise TypeError(
        "compile(replay=...) takes keras_bpq.Replay(capacity, updates_per_step=1, "
        f"correction='expected', batch_size=None) or None; got {replay!r}."
    )


# -- what a row holds ----------------------------------------------------------
class ReplayRows(NamedTuple):
    """Rows of forward passes, as stored and as drawn (`[rows, ...]` each)."""

    x: Any  # the model inputs, in their structure
    y: Any  # the targets in their structure, or None (no compiled losses)
    samples: Dict[str, tf.Tensor]  # node -> sample [rows, *event], float32
    log_probs: Dict[str, tf.Tensor]  # node -> behaviour log mu(sample | parents) [rows]
    costs: Dict[str, tf.Tensor]  # cost -> realised value [rows]
    weights: tf.Tensor  # the rows' sample weights [rows] (1 without weights)


class ReplayLayout(NamedTuple):
    """What one row holds: the shapes and dtypes the buffer is made of."""

    inputs: Any  # a structure of tf.TensorSpec with a dynamic batch dimension
    targets: Any  # likewise for `y`, or None
    samples: Dict[str, Tuple[int, ...]]  # node -> event shape, in execution order
    costs: Tuple[str, ...]


def rows(forward: forward_lib.ForwardPass, layout: ReplayLayout) -> ReplayRows:
    """The `ReplayRows` of a training step's forward pass (its rows, repeated
    examples included): the behaviour log-probabilities are each node's
    `log p(sample | parameters)` under the weights that drew the sample."""
    weights = forward.weights
    if weights is None:
        weights = tf.ones_like(forward.total, tf.float32)
    return ReplayRows(
        x=forward.x,
        y=forward.y if layout.targets is not None else None,
        samples={n: tf.cast(forward.records[n].sample, tf.float32) for n in layout.samples},
        log_probs={n: forward.records[n].log_prob() for n in layout.samples},
        costs={c: tf.cast(forward.costs[c], tf.float32) for c in layout.costs},
        weights=tf.reshape(tf.cast(weights, tf.float32), [-1]),
    )


def check_storable(spec: Any, what: str) -> None:
    """Raises a ValueError naming the entry of `spec` (a structure of specs of
    `what`, "input" or "target") that a fixed-shape variable cannot hold:
    ragged, sparse or string tensors, or unknown sizes past the batch axis."""
    for path, leaf in keras.tree.flatten_with_path(spec):
        name = "/".join(str(p) for p in path) or "(the only one)"
        fix = (
            "Replay stores every row in fixed-shape variables: feed it as a dense "
            "numeric tensor of fixed shape (pad it, or look strings up to ids in the "
            "data pipeline), or compile without replay."
        )
        if not isinstance(leaf, tf.TensorSpec):
            raise ValueError(
                f"compile(replay=...): {what} {name!r} is a {type(leaf).__name__}, which "
                f"the replay buffer cannot store. {fix}"
            )
        dtype = tf.as_dtype(leaf.dtype)
        if not (dtype.is_floating or dtype.is_integer or dtype.is_bool):
            raise ValueError(
                f"compile(replay=...): {what} {name!r} has dtype {dtype.name}, which the "
                f"replay buffer cannot store. {fix}"
            )
        if leaf.shape.rank is None or any(d is None for d in leaf.shape[1:]):
            raise ValueError(
                f"compile(replay=...): {what} {name!r} has shape {leaf.shape} with an "
                f"unknown size past the batch axis. {fix}"
            )


# -- the buffer ------------------------------------------------------------------
class ReplayBuffer(keras.layers.Layer):
    """A ring buffer of `ReplayRows` in non-trainable variables.

    Every field is a variable `[capacity, *row shape]`; `count` is the number
    of rows ever written. Row number `n` (from 0) lives at slot
    `n mod capacity`, so the buffer holds the last `min(count, capacity)` rows
    (`filled()`). Draws are uniform over the filled slots, with stateless
    Philox seeds from the buffer's `keras.random.SeedGenerator` (saved with
    the other variables, so a restored model draws what the saved one would).

    Args:
      capacity: slots.
      layout: a `ReplayLayout`, the fields of a row (`check_storable` says
        which inputs and targets it can hold).
    """

    def __init__(self, capacity: int, layout: ReplayLayout, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.capacity = int(capacity)
        self.layout = layout
        self.input_slots = [
            self._slots(f"input_{i}", s.shape[1:], s.dtype) for i, s in enumerate(tf.nest.flatten(layout.inputs))
        ]
        targets = [] if layout.targets is None else tf.nest.flatten(layout.targets)
        self.target_slots = [self._slots(f"target_{i}", s.shape[1:], s.dtype) for i, s in enumerate(targets)]
        self.sample_slots = {
            n: self._slots(f"sample_{n}", shape, "float32") for n, shape in layout.samples.items()
        }
        self.log_prob_slots = {n: self._slots(f"log_prob_{n}", (), "float32") for n in layout.samples}
        self.cost_slots = {c: self._slots(f"cost_{c}", (), "float32") for c in layout.costs}
        self.weight_slots = self._slots("weight", (), "float32")
        self.count = self._variable("count", (), "int64")
        self.seed_generator = keras.random.SeedGenerator(None, name="replay_seed_generator")
        self.built = True

    def _slots(self, name, shape, dtype):
        return self._variable(name, (self.capacity,) + tuple(shape), dtype)

    def _variable(self, name, shape, dtype):
        # Synchronised on read: under tf.distribute every replica keeps its own
        # copy (its own rows), and a checkpoint holds the first replica's. A
        # node called twice is named "<layer>@2"; "@" is not allowed in a name.
        with keras.name_scope(self.name, caller=self):
            return keras.Variable(
                initializer="zeros", shape=shape, dtype=dtype, trainable=False, autocast=False,
                aggregation="only_first_replica", synchronization="on_read", name=name.replace("@", "_"),
            )

    def _fields(self) -> List[tf.Variable]:
        """Every slot variable, in one fixed order (`_values` gives the rows')."""
        return (
            self.input_slots + self.target_slots + list(self.sample_slots.values())
            + list(self.log_prob_slots.values()) + list(self.cost_slots.values()) + [self.weight_slots]
        )

    def _values(self, rows: ReplayRows) -> List[tf.Tensor]:
        layout = self.layout
        return (
            tf.nest.flatten(rows.x)
            + (tf.nest.flatten(rows.y) if layout.targets is not None else [])
            + [rows.samples[n] for n in layout.samples]
            + [rows.log_probs[n] for n in layout.samples]
            + [rows.costs[c] for c in layout.costs]
            + [rows.weights]
        )

    def _rows(self, values: List[tf.Tensor]) -> ReplayRows:
        layout = self.layout
        values = list(values)

        def take(count):
            taken = values[:count]
            del values[:count]
            return taken

        x = tf.nest.pack_sequence_as(layout.inputs, take(len(self.input_slots)))
        y = None
        if layout.targets is not None:
            y = tf.nest.pack_sequence_as(layout.targets, take(len(self.target_slots)))
        samples = dict(zip(layout.samples, take(len(layout.samples))))
        log_probs = dict(zip(layout.samples, take(len(layout.samples))))
        costs = dict(zip(layout.costs, take(len(layout.costs))))
        return ReplayRows(x, y, samples, log_probs, costs, values[0])

    def filled(self) -> tf.Tensor:
        """The number of slots holding a row, `min(count, capacity)` (int64)."""
        return tf.minimum(self.count.value, self.capacity)

    def holds_rows(self) -> tf.Tensor:
        """Whether any slot holds a row (a boolean tensor,
        `distribute.ReplayUpdates.ready`)."""
        return self.filled() > 0

    def write(self, rows: ReplayRows) -> None:
        """Stores `rows` (`n` of them) in the slots after the last written one;
        where `n > capacity` only the last `capacity` rows are kept."""
        values = self._values(rows)
        n = tf.cast(tf.shape(values[-1])[0], tf.int64)
        keep = tf.minimum(n, self.capacity)
        start = n - keep
        slots = (self.count.value + start + tf.range(keep, dtype=tf.int64)) % self.capacity
        for variable, value in zip(self._fields(), values):
            kept = tf.cast(value, variable.dtype)[start:]
            stored = variable.value
            if isinstance(stored, tf.distribute.DistributedValues):
                # A replica's own copy takes no in-place scatter: rewrite it.
                variable.assign(tf.tensor_scatter_nd_update(stored, slots[:, None], kept))
            else:
                stored.scatter_nd_update(slots[:, None], kept)
        self.count.assign_add(n)

    def next_seed(self) -> tf.Tensor:
        """The next int32 stateless seed `[2]` of the buffer's generator, folded
        with the replica id under `tf.distribute` (replicas draw apart)."""
        seed = tf.cast(self.seed_generator.next(), tf.int32)
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            seed = tf.random.experimental.stateless_fold_in(seed, context.replica_id_in_sync_group)
        return seed

    def draw(self, batch_size: tf.Tensor) -> ReplayRows:
        """`batch_size` rows drawn uniformly, with replacement, from the filled
        slots (call it only when `filled() > 0`)."""
        index = tf.random.stateless_uniform(
            tf.reshape(tf.cast(batch_size, tf.int32), [1]), self.next_seed(), minval=tf.constant(0, tf.int64),
            maxval=self.filled(), dtype=tf.int64, alg="philox",
        )
        return self._rows([tf.gather(v.value, index) for v in self._fields()])

    def contents(self) -> ReplayRows:
        """Every slot, in slot order (`[capacity, ...]`; slots past `filled()`
        hold zeros)."""
        return self._rows([tf.convert_to_tensor(v.value) for v in self._fields()])

    def save_own_variables(self, store: Dict[str, Any]) -> None:
        """Saves the slots and the count, then the seed generator's state."""
        super().save_own_variables(store)
        store[str(len(_keras_compat.own_variables(self)))] = self.seed_generator.state

    def load_own_variables(self, store: Mapping[str, Any]) -> None:
        own = _keras_compat.own_variables(self)
        if len(store.keys()) == len(own) + 1:
            self.seed_generator.state.assign(store[str(len(own))])
            store = {str(i): store[str(i)] for i in range(len(own))}
        super().load_own_variables(store)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return inputs


# -- the model's part ------------------------------------------------------------
def checked_option(replay: Any, training_state: state_lib.TrainingState, model_name: str) -> Optional[Replay]:
    """Takes `compile(replay=...)`'s value, the model's `training_state` and
    name, and gives the option (`check_option`); a ValueError where it would
    add, remove or resize the buffer of a training state that exists."""
    replay = check_option(replay)
    buffer = training_state.replay_buffer
    if training_state.built and (
        (buffer is None) != (replay is None) or (buffer is not None and buffer.capacity != replay.capacity)
    ):
        raise ValueError(
            f"compile(replay={replay!r}) cannot add, remove or resize the replay buffer of "
            f"model {model_name!r}: its training state exists already (with "
            f"{'no buffer' if buffer is None else f'capacity={buffer.capacity}'}). Build a "
            "new model, or keep the buffer as it is."
        )
    return replay


def layout(
    replay: Optional[Replay],
    scg: graph.SCG,
    estimators: Mapping[str, estimators_lib.Estimator],
    options: critics_lib.CriticOptions,
    compiled_losses: costs_lib.CompiledLosses,
    input_spec: Any,
    target_spec: Any,
    model_name: str,
    check_targets: bool = False,
) -> Optional[ReplayLayout]:
    """What a row of the replay buffer holds (`ReplayLayout`), or None without
    `replay`. Takes the compiled option, the SCG with its node `estimators`
    and critic `options`, the `compiled_losses`, the model's `input_spec` and
    the targets' `target_spec` (None while unknown).

    Raises a ValueError where the compiled options leave replay nothing
    to train (no learned critic) or where an input cannot be stored; with
    `check_targets`, also where the model has compiled losses, whose
    targets the buffer stores, and their signature is unknown."""
    if replay is None:
        return None
    heads = critics_lib.heads_to_learn(scg, estimators, options)
    if not heads:
        raise ValueError(
            f"compile(replay=...): model {model_name!r} has no learned critic for replay to "
            "train: its estimators need none, or each of its nodes is the last stochastic "
            "ancestor of all its costs (exact heads) or serves them with common-noise heads "
            "(CriticCV(common_noise=True), as 'auto' does on Bernoulli nodes). Compile without "
            "replay, or pass estimator='critic_cv' to learn critics for replay to train."
        )
    targets = target_spec if compiled_losses.entries else None
    if check_targets and compiled_losses.entries and targets is None:
        raise ValueError(
            f"compile(replay=...): model {model_name!r} has compiled losses, so the replay "
            "buffer stores every row's targets, whose shapes are not known yet. Pass the "
            "targets to fit() as arrays or in a tf.data.Dataset (its first call creates "
            "the buffer), before anything else (save, evaluate) creates the training state."
        )
    result = ReplayLayout(
        inputs=input_spec,
        targets=targets,
        samples={info.name: info.event_shape for info in scg.nodes},
        costs=scg.costs,
    )
    check_storable(result.inputs, "input")
    if targets is not None:
        check_storable(targets, "target")
    return result


def step_rows(buffer: Optional[ReplayBuffer], forward: forward_lib.ForwardPass) -> Optional[ReplayRows]:
    """Takes the training state's replay `buffer` (None without one) and a
    step's forward pass, and gives the step's rows for the buffer (`rows`),
    None without a buffer."""
    return None if buffer is None else rows(forward, buffer.layout)


def step_updates(
    buffer: Optional[ReplayBuffer], options: Optional[Replay], critics: critics_lib.CriticSet
) -> Optional[distribute.ReplayUpdates]:
    """Takes the training state's replay `buffer` (None without one), the
    compiled `Replay` options and the model's `critics.CriticSet`, and gives
    the step's `distribute.ReplayUpdates`, None without a buffer."""
    if buffer is None:
        return None
    return distribute.ReplayUpdates(
        ready=buffer.holds_rows,
        update=functools.partial(critics.replay, buffer, options),
        store=buffer.write,
    )
