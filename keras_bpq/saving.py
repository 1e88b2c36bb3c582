"""Saving, loading and resuming a `BackpropQModel`'s training state.

* `.keras` files: the compile options of `BackpropQModel.compile` (estimators,
  critic settings, the critic optimizer, ...) are serialised with Keras' own
  machinery (no lambdas, no pickles), and the model's input signature goes in
  its build config, so loading rediscovers the SCG and recreates the critics,
  their target copies, estimator state and both optimizers' slots before the
  weights are read.
* Checkpoints are written atomically: to a temporary file beside the target,
  then renamed over it, so a process killed while saving never leaves a
  half-written file. A checkpoint holding a NaN or inf is refused, naming the
  variables.
* Exact resume: `FitPosition` records in the model (and so in every
  checkpoint) which epoch `fit` is in and how many of its batches are done.
  After `keras.callbacks.BackupAndRestore` restores a checkpoint,
  `ResumeAtPosition` restarts at that epoch and passes over the batches already
  trained without training on them, so a run killed mid-epoch and restarted
  ends with the weights of a run that never stopped (given the same batches in
  the same order).
"""

import contextlib
import json
import os
import uuid

import keras
import numpy as np
import tensorflow as tf

from keras_bpq import _keras_compat
from keras_bpq import estimators as estimators_lib

_ESTIMATOR_KEY = "keras_bpq_estimator"


# -- compile config -----------------------------------------------------------
class CompileArguments:
    """The arguments of one `compile()` call (a plain object: Keras does not
    track it, so Keras models passed as `critics=` are not tracked twice)."""

    def __init__(self, arguments):
        arguments = dict(arguments)
        kwargs = arguments.pop("kwargs", {}) or {}
        self.values = {
            k: v for k, v in arguments.items() if k != "self" and not k.startswith("__")
        }
        self.values.update(kwargs)


def _encode_estimator(value, where):
    if isinstance(value, estimators_lib.Estimator):
        cls = estimators_lib.ESTIMATORS.get(value.name)
        if cls is None or type(value) is not cls:
            raise ValueError(
                f"Cannot save compile({where}={value!r}): only the built-in estimators "
                f"({sorted(estimators_lib.ESTIMATORS)}) can be saved. Pass a name, or "
                "recompile after loading."
            )
        return {_ESTIMATOR_KEY: value.name, "config": value.get_config()}
    return value


def _decode_estimator(value):
    if isinstance(value, dict) and _ESTIMATOR_KEY in value:
        return estimators_lib.ESTIMATORS[value[_ESTIMATOR_KEY]](**value.get("config", {}))
    return value


def serialize_compile_config(arguments, optimizer, critic_optimizer):
    """The `compile()` arguments as a Keras-serialisable config.

    The optimizers are saved as the instances in use (their full config);
    estimator instances as their name and config. `critics=` entries must be
    Keras models; an oracle `critics.Critic` cannot be saved.
    """
    values = dict(arguments.values)
    values["optimizer"] = optimizer
    values["critic_optimizer"] = critic_optimizer
    estimator = values.get("estimator", "auto")
    if isinstance(estimator, dict):
        values["estimator"] = {k: _encode_estimator(v, f"estimator[{k!r}]") for k, v in estimator.items()}
    else:
        values["estimator"] = _encode_estimator(estimator, "estimator")
    for name, critic in (values.get("critics") or {}).items():
        if not isinstance(critic, keras.layers.Layer):
            raise ValueError(
                f"Cannot save compile(critics={{{name!r}: {type(critic).__name__}}}): only "
                "Keras models can be saved as critics. Save the weights with "
                "model.save_weights(), or recompile after loading."
            )
    try:
        config = keras.saving.serialize_keras_object(values)
        json.dumps(config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"Cannot save the compile() arguments of the model: {error}") from error
    return config


def deserialize_compile_config(config):
    """The `compile()` keyword arguments saved by `serialize_compile_config`."""
    values = dict(keras.saving.deserialize_keras_object(config))
    estimator = values.get("estimator", "auto")
    if isinstance(estimator, dict) and _ESTIMATOR_KEY not in estimator:
        values["estimator"] = {k: _decode_estimator(v) for k, v in estimator.items()}
    else:
        values["estimator"] = _decode_estimator(estimator)
    return values


# -- input signature ----------------------------------------------------------
def serialize_spec(spec):
    """A structure of `tf.TensorSpec` as JSON-compatible nested dicts."""
    if isinstance(spec, tf.TensorSpec):
        return {"tensor_spec": {"shape": spec.shape.as_list(), "dtype": spec.dtype.name}}
    if isinstance(spec, dict):
        return {"dict": {str(k): serialize_spec(v) for k, v in spec.items()}}
    if isinstance(spec, (list, tuple)):
        return {type(spec).__name__: [serialize_spec(v) for v in spec]}
    raise ValueError(f"Cannot save input signature entry {spec!r}.")


def deserialize_spec(config):
    """Inverse of `serialize_spec` (None for None)."""
    if config is None:
        return None
    if "tensor_spec" in config:
        leaf = config["tensor_spec"]
        return tf.TensorSpec(leaf["shape"], tf.as_dtype(leaf["dtype"]))
    if "dict" in config:
        return {k: deserialize_spec(v) for k, v in config["dict"].items()}
    if "tuple" in config:
        return tuple(deserialize_spec(v) for v in config["tuple"])
    return [deserialize_spec(v) for v in config["list"]]


# -- checkpoint files ---------------------------------------------------------
def check_finite(variables, what):
    """Raises a ValueError naming the variables that hold a NaN or inf."""
    bad = []
    for variable in variables:
        if not np.dtype(keras.backend.standardize_dtype(variable.dtype)).kind == "f":
            continue
        value = np.asarray(variable.numpy())
        if not np.all(np.isfinite(value)):
            bad.append(getattr(variable, "path", None) or variable.name)
    if bad:
        raise ValueError(
            f"Refusing to save {what}: variables {bad} hold NaN or inf values. A "
            "training step that meets a non-finite cost or gradient never updates "
            "the weights, so these were set some other way. The existing file is "
            "left as it was."
        )


def atomic_target(filepath, suffix, overwrite):
    """Whether `filepath` is written through `atomic_write`: a local file with
    the suffix Keras expects, that may be overwritten (otherwise Keras asks)."""
    path = str(filepath)
    return path.endswith(suffix) and "://" not in path and (overwrite or not os.path.exists(path))


@contextlib.contextmanager
def atomic_write(filepath):
    """Yields a temporary path beside `filepath` (same suffix); once the block
    has written it, renames it over `filepath` in one step. On error or
    interruption `filepath` keeps its previous content."""
    directory, base = os.path.split(os.path.abspath(str(filepath)))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{base}")
    try:
        yield temporary
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, os.path.join(directory, base))
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


# -- exact resume ---------------------------------------------------------------
class FitPosition(keras.callbacks.Callback):
    """Keeps `model.machinery.fit_epoch` / `fit_batch` at the epoch `fit` is in
    and the number of its batches already trained, before any checkpointing
    callback saves them (`fit` puts this callback ahead of the user's).

    It also drops a `BackupAndRestore` metadata file left unreadable by a
    crash: the position inside the weights file is what resuming uses.
    """

    def __init__(self, callbacks=()):
        super().__init__()
        self._callbacks = list(callbacks)

    @staticmethod
    def clear(model):
        """Marks the model as outside `fit` (position -1, -1)."""
        model.machinery.fit_epoch.assign(-1)
        model.machinery.fit_batch.assign(-1)

    def _set(self, epoch, batch):
        self.model.machinery.fit_epoch.assign(epoch)
        self.model.machinery.fit_batch.assign(batch)

    def on_train_begin(self, logs=None):
        # Anything else found after the callbacks' on_train_begin was restored.
        self.clear(self.model)
        for callback in self._callbacks:
            if not isinstance(callback, keras.callbacks.BackupAndRestore):
                continue
            path = _keras_compat.backup_metadata_path(callback)
            if path and os.path.exists(path):
                try:
                    with open(path) as f:
                        json.load(f)
                except ValueError:
                    os.remove(path)

    def on_epoch_begin(self, epoch, logs=None):
        self._set(epoch, 0)

    def on_train_batch_end(self, batch, logs=None):
        self.model.machinery.fit_batch.assign(batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        self._set(epoch + 1, 0)


class ResumeAtPosition(keras.callbacks.Callback):
    """After the other callbacks' `on_train_begin` (so after a
    `BackupAndRestore` restore), resumes at the restored position: sets the
    initial epoch and passes over the batches of that epoch already trained
    (they are drawn from the data but not trained on; their logs are the
    metrics so far).
    `fit` puts this callback after the user's."""

    def __init__(self):
        super().__init__()
        self._restored = False

    def on_train_begin(self, logs=None):
        model = self.model
        machinery = model.machinery
        epoch, batch = int(machinery.fit_epoch.numpy()), int(machinery.fit_batch.numpy())
        machinery.status.assign(0)
        if epoch < 0:
            return
        self._restored = True
        _keras_compat.set_initial_epoch(model, epoch)
        if batch > 0:
            model.train_function = _skipping(model, model.train_function, batch)

    def on_train_end(self, logs=None):
        if self._restored:
            _keras_compat.set_initial_epoch(self.model, None)


def _skipping(model, train_function, batches):
    """A train function that draws `batches` batches (whole executions of
    `steps_per_execution`) without training, then puts `train_function` back."""
    remaining = [int(batches)]

    def skip(iterator):
        if remaining[0] <= 0:
            model.train_function = train_function
            return train_function(iterator)
        steps = max(1, int(model.steps_per_execution or 1))
        drawn = 0
        for _ in range(min(steps, remaining[0])):
            if isinstance(iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)):
                if not iterator.get_next_as_optional().has_value():
                    break
            else:
                try:
                    next(iterator)
                except StopIteration:
                    break
            drawn += 1
        if drawn == 0:
            raise StopIteration
        remaining[0] -= drawn
        if remaining[0] <= 0:
            model.train_function = train_function
        try:
            return model.get_metrics_result()
        except Exception:  # metrics not built yet in a fresh process
            return {}

    return skip
