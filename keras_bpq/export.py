"""SavedModel export of a `BackpropQModel`'s stochastic forward pass, for TF Serving.

The export holds the forward pass only: the layers' weights and the nodes' seed
generator states, never the training machinery (critics, their target copies,
estimator baselines, metrics) nor optimizer state. It uses standard TF ops
only, so it loads with `tf.saved_model.load` (or TF Serving, or
`saved_model_cli`) without `keras_bpq`, Keras or TFP installed. Every signature
takes the model's inputs with a dynamic batch dimension:

| signature         | inputs             | nodes return                                         |
|-------------------|--------------------|------------------------------------------------------|
| `serving_default` | the model inputs   | fresh samples (from the nodes' seed generators) and their `<node>_log_prob` |
| `mode`            | the model inputs   | their most likely values: mode (discrete), mean (continuous) |
| `seeded`          | the model inputs and `seed`, int64 `[batch]` | samples determined by each example's inputs and seed, and their `<node>_log_prob` |

Inputs are named after their `keras.Input(name=...)` (or the keys of a dict
of inputs); unnamed ones are `inputs` (`inputs_<index>` for several).

A SavedModel signature has no optional inputs, hence the separate `seeded`
signature. In `seeded`, example `i` draws from stateless seeds derived from
`seed[i]` and the node call's position in the pass: the same inputs and seed
always give the same sample, whatever else is in the batch (so server-side
batching keeps responses reproducible). Give examples different seeds for
independent draws.

Every signature returns a dict of `[batch, ...]` tensors:

* `output`: the model's output (for several outputs, `output_<key>` per dict
  key or `output_<index>` per list entry);
* one entry per stochastic node call, keyed by the node's name (a layer called
  twice also gives `<name>_2`): the float sample, one-hot for `Categorical`;
* in `serving_default` and `seeded` (not `mode`), `<node>_log_prob` per node
  call, float32 `[batch]`: `log p(x | params)` of the sample `x` it served,
  summed over the event axes as the node's distribution defines it (the log
  of a Categorical's probability of its outcome; the sum over a Bernoulli's
  units; a Normal's log-density). It is the propensity a serving system logs
  for learning from logged feedback (`keras_bpq.logged`:
  `propensity = exp(<node>_log_prob)`). A node whose name would make one of
  these keys collide with another output's key is refused at export.

Layers run in inference mode (`training=False`) in every signature; only the
nodes sample.

Every signature checks its inputs in the graph before it runs the model, and
fails with `InvalidArgumentError` whose message names the signature, the input
and what was expected: each input's shape (rank and fixed sizes), the same
number of rows in every input, and in `seeded` one seed per row. A masked
`Categorical` whose mask row allows no outcome fails naming the node and the
row. These messages are part of the SavedModel: a client needs neither
keras_bpq nor Keras to read them. Dtypes are checked by TensorFlow before the
graph runs.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Union

import keras
import tensorflow as tf

from keras_bpq import _keras_compat
from keras_bpq import graph
from keras_bpq import saving

if TYPE_CHECKING:
    from keras_bpq.model import BackpropQModel

SIGNATURES = ("serving_default", "mode", "seeded")
SEED_KEY = "seed"
LOG_PROB_SUFFIX = "_log_prob"
_AUTO_INPUT_NAME = re.compile(r"input_layer(_\d+)?")


def check_arguments(format: str, kwargs: Mapping[str, Any]) -> None:
    """Refuses what `BackpropQModel.export` cannot write: a `format` other than
    `"tf_saved_model"` (a ValueError) and any other `keras.Model.export`
    argument in `kwargs` (a TypeError)."""
    if format != "tf_saved_model":
        raise ValueError(
            f"BackpropQModel.export supports format='tf_saved_model' only; got "
            f"{format!r}. Stochastic nodes need TF's stateless random ops."
        )
    if kwargs:
        raise TypeError(f"Unexpected export arguments {sorted(kwargs)}.")


def export(
    model: BackpropQModel,
    filepath: Union[str, os.PathLike],
    input_signature: Optional[Any] = None,
    verbose: bool = True,
) -> Dict[str, Dict[str, Dict[str, tf.TensorSpec]]]:
    """Writes `model`'s stochastic forward pass as a SavedModel at `filepath`.

    Args:
      model: a `BackpropQModel`.
      filepath: the SavedModel directory (for TF Serving, a numbered version
        folder: `<model_base_path>/1`). It is written beside its place and
        then renamed into it (`saving.atomic_directory`), replacing a folder
        there whole, so a server polling `<model_base_path>` never loads it
        half written.
      input_signature: optional structure of `tf.TensorSpec` (or arrays) for the
        model's inputs; the batch dimension is made dynamic. Defaults to the
        inputs the model was built or trained with.
      verbose: print the signatures written.

    Returns:
      `{signature_name: {"inputs": {...}, "outputs": {...}}}` with the
      `tf.TensorSpec` of every input and output.
    """
    spec = _input_spec(model, input_signature)
    flat_spec = tf.nest.flatten(spec)
    input_names = _input_names(model, spec)
    if SEED_KEY in input_names:
        raise ValueError(
            f"Model {model.name!r} has an input named {SEED_KEY!r}, which the 'seeded' "
            "signature reserves for its seeds. Rename the input."
        )
    named = [tf.TensorSpec(s.shape, s.dtype, name=n) for s, n in zip(flat_spec, input_names)]
    seed_spec = tf.TensorSpec([None], tf.int64, name=SEED_KEY)

    def forward(signature, flat_inputs, seeds=None, most_likely=False):
        flat_inputs, seeds = _validated(signature, named, flat_inputs, seeds)
        inputs = tf.nest.pack_sequence_as(spec, list(flat_inputs))
        with graph.Recorder(seeds=seeds, most_likely=most_likely) as rec:
            outputs = model(inputs, training=False)
        return _output_dict(model, outputs, rec.nodes, with_log_prob=not most_likely)

    def sample(*inputs):
        return forward("serving_default", inputs)

    def mode(*inputs):
        return forward("mode", inputs, most_likely=True)

    def seeded(*inputs_and_seed):
        return forward("seeded", inputs_and_seed[:-1], seeds=inputs_and_seed[-1])

    functions = {
        "serving_default": tf.function(sample, input_signature=named, autograph=False),
        "mode": tf.function(mode, input_signature=named, autograph=False),
        "seeded": tf.function(seeded, input_signature=named + [seed_spec], autograph=False),
    }
    concrete = {name: fn.get_concrete_function() for name, fn in functions.items()}

    machinery = {id(v) for v in model.training_state.variables}
    forward_variables = [v for v in model.variables if id(v) not in machinery]
    tracked = {id(_tf_variable(v)) for v in forward_variables}
    for name, fn in concrete.items():
        extra = [v.name for v in fn.variables if id(v) not in tracked]
        if extra:
            raise ValueError(
                f"Export of {model.name!r}: signature {name!r} reads variables outside "
                f"the forward pass ({extra}); the forward pass must not use critics, "
                "target copies or estimator state."
            )

    module = tf.Module()
    module.forward_variables = [_tf_variable(v) for v in forward_variables]
    module.sample = functions["serving_default"]
    module.mode = functions["mode"]
    module.seeded = functions["seeded"]
    with saving.atomic_directory(filepath) as folder:
        tf.saved_model.save(module, folder, signatures=concrete)

    summary = {}
    for name, fn in concrete.items():
        inputs = {s.name: tf.TensorSpec(s.shape, s.dtype) for s in tf.nest.flatten(fn.structured_input_signature)}
        outputs = {k: tf.TensorSpec(v.shape, v.dtype) for k, v in fn.structured_outputs.items()}
        summary[name] = {"inputs": inputs, "outputs": outputs}
    if verbose:
        lines = [f"Saved the stochastic forward pass of {model.name!r} at {str(filepath)!r}:"]
        for name, parts in summary.items():
            ins = ", ".join(f"{k}: {_fmt(s)}" for k, s in parts["inputs"].items())
            outs = ", ".join(f"{k}: {_fmt(s)}" for k, s in parts["outputs"].items())
            lines.append(f"  {name}({ins}) -> {{{outs}}}")
        print("\n".join(lines))
    return summary


def _shape_text(tensor):
    """The runtime shape of `tensor` as a string, e.g. `"2,3"` (`""` for a scalar)."""
    return tf.strings.reduce_join(tf.strings.as_string(tf.shape(tensor)), separator=",")


def _check(condition, parts, name):
    """A `tf.debugging.Assert` whose message is `parts` (strings and int
    scalars) joined into one string. The message avoids quotes, which an
    assertion's message prints escaped."""
    text = [p if isinstance(p, str) else tf.strings.as_string(p) for p in parts]
    return tf.debugging.Assert(condition, [tf.strings.join(text)], name=name)


def _validated(signature, specs, flat_inputs, seeds=None):
    """The inputs (and seeds), after in-graph checks of their shapes and batch sizes.

    A signature's placeholders declare `[None, ...]`, yet a served graph is
    given whatever a client sends (TF does not check a signature input's
    shape, and constant folding would turn checks of its rank into no-ops):
    every input's runtime shape is matched as a string against its spec, then
    every input must hold as many rows as the first, and `seed` one seed per
    row. The failures are `tf.debugging.Assert`s whose messages live in the
    graph, so a client without keras_bpq reads which input is wrong and what
    was expected. Dtypes are checked by TF itself before the graph runs.
    """
    named = list(zip(specs, flat_inputs))
    if seeds is not None:
        named.append((tf.TensorSpec([None], tf.int64, name=SEED_KEY), seeds))
    shape_checks = []
    for spec, value in named:
        dims = [None] + spec.shape[1:].as_list()
        pattern = ",".join("[0-9]+" if d is None else str(d) for d in dims)
        wanted = ", ".join(["batch"] + ["any" if d is None else str(d) for d in dims[1:]])
        actual = _shape_text(value)
        shape_checks.append(
            _check(
                tf.strings.regex_full_match(actual, pattern),
                [f"Signature {signature}: input `{spec.name}` must have shape [{wanted}] "
                 f"({spec.dtype.name}); got shape [", actual, "]."],
                name=f"check_{spec.name}_shape",
            )
        )
    with tf.control_dependencies(shape_checks):
        values = [tf.identity(v) for _, v in named]
    first, batch = specs[0].name, tf.shape(values[0])[0]
    batch_checks = []
    for (spec, _), value in zip(named[1:], values[1:]):
        rows = tf.shape(value)[0]
        if spec.name == SEED_KEY:
            parts = [f"Signature {signature}: input `{SEED_KEY}` must hold one int64 seed per "
                     "example; got ", rows, " seeds for ", batch, f" rows of input `{first}`."]
        else:
            parts = [f"Signature {signature}: input `{spec.name}` has ", rows,
                     f" rows but input `{first}` has ", batch,
                     "; every input must hold one row per example."]
        batch_checks.append(_check(tf.equal(rows, batch), parts, name=f"check_{spec.name}_rows"))
    with tf.control_dependencies(batch_checks):
        values = [tf.identity(v) for v in values]
    if seeds is None:
        return values, None
    return values[:-1], values[-1]


def _fmt(spec):
    dims = ", ".join("None" if d is None else str(d) for d in spec.shape)
    return f"{spec.dtype.name}[{dims}]"


def _tf_variable(variable):
    """The `tf.Variable` behind a Keras variable (or the variable itself)."""
    value = getattr(variable, "value", None)
    return value if isinstance(value, tf.Variable) else variable


def _batchless(value):
    if isinstance(value, tf.TensorSpec):
        shape, dtype = value.shape, value.dtype
    else:
        shape, dtype = tf.TensorShape(value.shape), tf.as_dtype(value.dtype)
    if shape.rank is None or shape.rank == 0:
        raise ValueError(f"An exported input needs a batch dimension; got shape {shape}.")
    return tf.TensorSpec([None] + shape[1:].as_list(), dtype)


def _plain(structure):
    """Plain lists, tuples and dicts (Keras wraps the ones a layer holds)."""
    if isinstance(structure, dict):
        return {k: _plain(v) for k, v in structure.items()}
    if isinstance(structure, tuple):
        return tuple(_plain(v) for v in structure)
    if isinstance(structure, list):
        return [_plain(v) for v in structure]
    return _batchless(structure)


def _input_spec(model, input_signature):
    spec = input_signature if input_signature is not None else model.input_signature()
    if spec is None:
        raise ValueError(
            f"Model {model.name!r} does not know its inputs yet: call it on a batch, "
            "train it, or pass export(..., input_signature=...)."
        )
    return _plain(spec)


def _clean(name):
    name = re.sub(r"[^A-Za-z0-9_]", "_", str(name)).strip("_")
    return name or "input"


def _input_layer_name(tensor):
    """The name of the `keras.Input` layer that made a functional input."""
    operation = _keras_compat.producing_operation(tensor)
    return getattr(operation, "name", None) or tensor.name


def _path(path):
    return "_".join(str(p) for p in path)


def _input_names(model, spec):
    flat = tf.nest.flatten(spec)
    paths = [_path(p) for p, _ in keras.tree.flatten_with_path(spec)]
    network = getattr(model, "network", None)
    if isinstance(spec, dict):
        names = [_clean(p) for p in paths]
    else:
        names = ["inputs"] if len(flat) == 1 else [f"inputs_{_clean(p)}" for p in paths]
        if network is not None and len(network.inputs) == len(flat):
            given = [_clean(_input_layer_name(t)) for t in network.inputs]
            # Unnamed keras.Input layers get "input_layer_<n>": keep the default.
            names = [d if _AUTO_INPUT_NAME.fullmatch(g) else g for g, d in zip(given, names)]
    if len(set(names)) != len(names):
        names = [f"inputs_{i}" for i in range(len(flat))]
    return names


def _output_dict(model, outputs, records, with_log_prob):
    """The signature's outputs; `with_log_prob` adds `<node>_log_prob` per node.

    Every key must be unique: a node name that maps onto another output's key
    (`output`, another node's, or another node's `<node>_log_prob`) is refused,
    naming both.
    """
    entries = []  # (key, what it is, tensor)
    flat = [(_path(p), v) for p, v in keras.tree.flatten_with_path(outputs)]
    if len(flat) == 1 and not flat[0][0]:
        entries.append(("output", "the model's output", flat[0][1]))
    else:
        for path, value in flat:
            entries.append((f"output_{_clean(path)}", f"the model's output {path!r}", value))
    for record in records:
        key = _clean(record.name)
        entries.append((key, f"the sample of node {record.name!r}", record.sample))
        if with_log_prob:
            entries.append(
                (f"{key}{LOG_PROB_SUFFIX}", f"the log-probability of node {record.name!r}", record.log_prob())
            )
    result, owners = {}, {}
    for key, what, value in entries:
        if key in result:
            raise ValueError(
                f"Export of {model.name!r}: {what} and {owners[key]} both map to the "
                f"output key {key!r}. Rename the node."
            )
        result[key], owners[key] = tf.identity(value), what
    return result
