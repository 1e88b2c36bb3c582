"""Batches with sample weights but no targets, and the targets' signature.

Keras packs arrays as `(x, y, sample_weight)` only when `y` is given and drops
the weights otherwise (`pack_x_y_sample_weight`); a `BackpropQModel` usually has
no targets. `weights_without_targets` carries such weights next to a `[n, 0]`
boolean array that stands for "no targets", and `unpack` reads it back.
`target_spec` reads the targets' shapes and dtypes off the data given to
`fit` (the replay buffer stores targets, so it needs them before the first step).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from keras_bpq import graph


def _no_targets(x):
    """A `[n, 0]` boolean array standing for "no targets" next to the `n`
    examples of `x`."""
    rows = len(tf.nest.flatten(x)[0])
    return np.zeros((rows, 0), dtype=bool)


def _is_no_targets(y):
    return (
        isinstance(y, (tf.Tensor, np.ndarray))
        and y.dtype == bool
        and len(y.shape) == 2
        and y.shape[1] == 0
    )


def unpack(data: Any) -> Tuple[Any, Optional[Any], Optional[Any]]:
    """`(x, y, sample_weight)` of a batch, with y None where it stands for no targets."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    return x, (None if _is_no_targets(y) else y), sample_weight


def weights_without_targets(
    method: Callable, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """`method`'s (`keras.Model.fit` or `.evaluate`) arguments as keywords,
    with sample weights given without targets carried by a "no targets" array.
    Validation data `(x, None, w)` is rewritten alike."""
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


def target_spec(x: Any, y: Any = None) -> Optional[Any]:
    """The targets of `fit(x, y)`-style data as a structure of `tf.TensorSpec`
    with a dynamic batch dimension: of `y` (arrays or tensors; floating ones
    as Keras feeds them, in `floatx`), or of the
    targets in a `tf.data.Dataset` `x`'s elements; None where the data has no
    targets (a dataset of `(x, None, w)`), targets that are not dense tensors,
    or does not say (a generator, a `keras.utils.PyDataset`)."""
    if isinstance(x, tf.data.Dataset):
        _, y, _ = keras.utils.unpack_x_y_sample_weight(x.element_spec)
        if y is None or (isinstance(y, tf.TensorSpec) and y.dtype == tf.bool and y.shape[1:] == [0]):
            return None
        if not all(isinstance(s, tf.TensorSpec) for s in tf.nest.flatten(y)):
            return None  # elements (x, None, w), or targets that are not dense tensors
        return tf.nest.map_structure(graph.batchless_spec, y)
    if y is None or _is_no_targets(y) or not _array_like(y):
        return None

    def spec(t):
        # Keras feeds floating arrays as floatx.
        dtype = tf.as_dtype(t.dtype)
        return tf.TensorSpec((None,) + tuple(t.shape[1:]), keras.backend.floatx() if dtype.is_floating else dtype)

    return tf.nest.map_structure(spec, y)
