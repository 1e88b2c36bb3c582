"""Saving, loading and resuming a `BackpropQModel`'s training state.

* `.keras` files: the compile options of `BackpropQModel.compile` (estimators,
  critic settings, the critic optimizer, ...) are serialised with Keras' own
  machinery (no lambdas, no pickles), and the model's input signature goes in
  its build config, so loading rediscovers the SCG and recreates the critics,
  their target copies, estimator state and both optimizers' slots before the
  weights are read.
* Checkpoints are written atomically: to a temporary file beside the target,
  then renamed over it, so a process killed while saving never leaves a
  half-written file; the next save removes what a killed one left. Otherwise
  a save behaves as `keras.Model.save`, which writes in place: symlinks are
  written through, read-only files are refused. A checkpoint holding a NaN or
  inf is refused, naming the variables.
* SavedModel folders (`export`) are written beside their place and renamed
  into it (`atomic_directory`); the next export removes what a killed one left.
* Loading says what is wrong: a `.keras` file cut short or corrupt, a class
  the process does not know, a `BackupAndRestore` backup written by another
  model.
* Exact resume: the callbacks of `keras_bpq.callbacks` record in the model
  (and so in every checkpoint) where `fit` stands, and resume there.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import uuid
import warnings
import weakref
import zipfile
import zlib
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from keras_bpq import estimators as estimators_lib

# A file or folder path, as `keras.Model.save` takes it.
PathLike = Union[str, os.PathLike]

_ESTIMATOR_KEY = "keras_bpq_estimator"


# -- compile config -----------------------------------------------------------
class CompileArguments:
    """The arguments of one `compile()` call (a plain object: Keras does not
    track it, so Keras models passed as `critics=` are not tracked twice)."""

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        arguments = dict(arguments)
        kwargs = arguments.pop("kwargs", {}) or {}
        self.values = {
            k: v for k, v in arguments.items() if k != "self" and not k.startswith("__")
        }
        self.values.update(kwargs)


def encode_estimator(value: Any, where: str) -> Any:
    """A `compile(estimator=...)` value (`where` names it in errors) as a
    config: a built-in `Estimator` as its name and options, a name as itself."""
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


def decode_estimator(value: Any) -> Any:
    """The `compile(estimator=...)` value of an `encode_estimator` config."""
    if isinstance(value, dict) and _ESTIMATOR_KEY in value:
        return estimators_lib.ESTIMATORS[value[_ESTIMATOR_KEY]](**value.get("config", {}))
    return value


def serialize_compile_config(
    arguments: CompileArguments,
    optimizer: Optional[keras.optimizers.Optimizer],
    critic_optimizer: Optional[keras.optimizers.Optimizer],
) -> Dict[str, Any]:
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
        values["estimator"] = {k: encode_estimator(v, f"estimator[{k!r}]") for k, v in estimator.items()}
    else:
        values["estimator"] = encode_estimator(estimator, "estimator")
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


def deserialize_compile_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The `compile()` keyword arguments saved by `serialize_compile_config`."""
    values = dict(keras.saving.deserialize_keras_object(config))
    estimator = values.get("estimator", "auto")
    if isinstance(estimator, dict) and _ESTIMATOR_KEY not in estimator:
        values["estimator"] = {k: decode_estimator(v) for k, v in estimator.items()}
    else:
        values["estimator"] = decode_estimator(estimator)
    return values


# -- input signature ----------------------------------------------------------
def serialize_spec(spec: Any) -> Dict[str, Any]:
    """A structure of `tf.TensorSpec` as JSON-compatible nested dicts."""
    if isinstance(spec, tf.TensorSpec):
        return {"tensor_spec": {"shape": spec.shape.as_list(), "dtype": spec.dtype.name}}
    if isinstance(spec, dict):
        return {"dict": {str(k): serialize_spec(v) for k, v in spec.items()}}
    if isinstance(spec, (list, tuple)):
        return {type(spec).__name__: [serialize_spec(v) for v in spec]}
    raise ValueError(f"Cannot save input signature entry {spec!r}.")


def build_config(
    config: Optional[Mapping[str, Any]], input_spec: Any, target_spec: Any
) -> Optional[Dict[str, Any]]:
    """A `BackpropQModel`'s build config: Keras' `config` with the model's
    input signature and the targets' (`serialize_spec`; each where known)."""
    config = dict(config or {})
    for key, spec in (("input_spec", input_spec), ("target_spec", target_spec)):
        if spec is not None:
            config[key] = serialize_spec(spec)
    return config or None


def build_config_specs(config: Optional[Mapping[str, Any]]) -> Tuple[Any, Any]:
    """`(input_spec, target_spec)` of a `build_config` (each None where absent)."""
    config = config or {}
    return deserialize_spec(config.get("input_spec")), deserialize_spec(config.get("target_spec"))


def deserialize_spec(config: Optional[Mapping[str, Any]]) -> Any:
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
def check_finite(variables: Iterable[tf.Variable], what: str) -> None:
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


def atomic_target(filepath: Any, suffix: str, overwrite: bool) -> bool:
    """Whether `filepath` is written through `atomic_write`: a local path with
    the suffix Keras expects, that may be overwritten (otherwise Keras asks),
    and that names (through any symlinks) a regular file or nothing yet.
    Anything else (a directory, a device, a remote path) is left to Keras."""
    if not isinstance(filepath, (str, os.PathLike)):
        return False
    path = os.fspath(filepath)
    if not isinstance(path, str) or not path.endswith(suffix) or "://" in path:
        return False
    target = os.path.realpath(path)
    if not os.path.lexists(target):
        return True
    return overwrite and stat.S_ISREG(os.stat(target).st_mode)


# A save writes into a folder of its own beside the file, named
# `.tmp-keras_bpq-<pid>-<8 hex digits>-<file name>`, holding the file being
# written and `lock`, which the saving process holds (flock) until it is done.
# Where the file's folder is read-only, the folder is in the system's
# temporary folder (`tempfile.gettempdir()`), its name ending in
# `<16 hex digits>-<file name>`, the digits naming the file's full path
# (`_elsewhere`). A folder of either name whose lock nobody holds is left by a
# killed save.
_TEMPORARY = re.compile(r"\.tmp-keras_bpq-[0-9]+-[0-9a-f]{8}-(?P<base>.+)", re.DOTALL)
_LOCK = "lock"


def _temporary_folder(directory, base):
    return os.path.join(directory, f".tmp-keras_bpq-{os.getpid()}-{uuid.uuid4().hex[:8]}-{base}")


def _elsewhere(target):
    """The end of the name of a temporary folder for `target` (a real path) in
    the system's temporary folder: its file name after a digest of its path."""
    return f"{hashlib.sha256(os.fsencode(target)).hexdigest()[:16]}-{os.path.basename(target)}"


def _remove_folder(folder, base):
    """Removes a temporary folder of ours: only the two names we write in it,
    then the folder if that left it empty. Returns whether it is gone."""
    for name in (base, _LOCK):
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, name))
    try:
        os.rmdir(folder)
    except OSError:
        return False
    return True


def _abandoned_lock(path):
    """An open descriptor of the lock file `path`, locked (flock), where no
    live process holds it (what a killed save or export left); None where it
    cannot be opened (not ours, or one that has not locked it yet) or a save
    or export in progress holds it."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_unlocked(directory, ending, base):
    """Removes our temporary folders in `directory` whose names end in
    `ending` and whose lock no live process holds; returns their paths."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = _TEMPORARY.fullmatch(name)
        if match is None or match.group("base") != ending:
            continue
        folder = os.path.join(directory, name)
        fd = _abandoned_lock(os.path.join(folder, _LOCK))
        if fd is None:
            continue
        try:
            if _remove_folder(folder, base):
                removed.append(folder)
        finally:
            os.close(fd)
    return removed


def remove_leftovers(filepath: PathLike) -> List[str]:
    """Removes what killed saves to `filepath` (through symlinks) left: our
    temporary folders for that file, beside it or (where its folder is
    read-only) in the system's temporary folder, whose lock no live process
    holds. A save in progress, in this process or another, holds its lock and
    is left alone; nothing not named and locked as ours is touched. Returns
    the paths removed."""
    target = os.path.realpath(os.fspath(filepath))
    directory, base = os.path.split(target)
    return _remove_unlocked(directory, base, base) + _remove_unlocked(
        tempfile.gettempdir(), _elsewhere(target), base
    )


def _fsync(path, flags=os.O_RDONLY):
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # directories on some file systems
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(filepath: PathLike) -> Iterator[str]:
    """Yields a temporary path with the file name of `filepath`; once the block
    has written it completely, puts it in place of `filepath`. On error or
    interruption `filepath` keeps its previous content, and the temporary file
    is removed (a killed save's is removed by the next save to `filepath`,
    `remove_leftovers`).

    Keeps the semantics of `keras.Model.save`, which writes `filepath` in
    place:

    * A symlink is written through: its target is updated, the link stays.
    * An existing file the process may not write raises `PermissionError`,
      and a new file in a folder it may not write too.
    * The file keeps its permission bits (and its owner where the process may
      set it).
    * Where the file cannot be replaced in one step (it has other hard links,
      or its folder is read-only) the whole file is first written beside it
      (in the system's temporary folder, `tempfile.gettempdir()`, where its
      folder is read-only), then copied over `filepath` in place; only a kill
      during that copy can leave it partial.
    """
    target = os.path.realpath(os.fspath(filepath))
    directory, base = os.path.split(target)
    existing = os.stat(target) if os.path.lexists(target) else None
    if existing is not None:
        os.close(os.open(target, os.O_WRONLY))  # a read-only file raises, as in Keras
    remove_leftovers(target)
    in_place = existing is not None and existing.st_nlink > 1
    folder = _temporary_folder(directory, base)
    try:
        os.mkdir(folder, 0o700)
    except OSError as error:
        # Keras writes an existing file in place even in a read-only folder.
        if existing is None or not isinstance(error, PermissionError):
            raise type(error)(error.errno, error.strerror, target) from None
        folder = _temporary_folder(tempfile.gettempdir(), _elsewhere(target))
        os.mkdir(folder, 0o700)
        in_place = True
    lock = None
    try:
        lock = os.open(os.path.join(folder, _LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
    except BaseException:
        if lock is not None:
            os.close(lock)
        _remove_folder(folder, base)
        raise
    temporary = os.path.join(folder, base)
    try:
        yield temporary
        if in_place:
            with open(temporary, "rb") as source, open(target, "wb") as destination:
                shutil.copyfileobj(source, destination)
                destination.flush()
                os.fsync(destination.fileno())
        else:
            _fsync(temporary, os.O_RDWR)
            if existing is not None:
                os.chmod(temporary, stat.S_IMODE(existing.st_mode))
                with contextlib.suppress(OSError):
                    os.chown(temporary, existing.st_uid, existing.st_gid)
            os.replace(temporary, target)
            _fsync(directory)
    finally:
        _remove_folder(folder, base)
        os.close(lock)


# An export (`atomic_directory`) writes the folder
# `.tmp-keras_bpq-folder-<pid>-<8 hex digits>-<name>` beside its place and
# moves a folder already there aside to `.tmp-keras_bpq-old-<same>-<name>`;
# it holds (flock) the file `.tmp-keras_bpq-lock-<same>-<name>` from before
# the first is made until both are gone. The lock is a file of its own so that
# the SavedModel renamed into place holds nothing of ours. A group whose lock
# nobody holds was left by a killed export.
_FOLDER_TEMPORARY = re.compile(
    r"\.tmp-keras_bpq-(?P<role>folder|old|lock)-(?P<id>[0-9]+-[0-9a-f]{8})-(?P<base>.+)", re.DOTALL
)


def _folder_names(directory, base):
    """The three names of a new `atomic_directory` of `base` in `directory`."""
    ident = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return {
        role: os.path.join(directory, f".tmp-keras_bpq-{role}-{ident}-{base}") for role in ("folder", "old", "lock")
    }


def _remove_export_lock(names):
    """Removes the lock file of an export (`names`: `_folder_names`' roles
    and paths) once neither of its folders is left; else the lock stays, so
    that the next export clears them (`remove_directory_leftovers`). Returns
    whether it was removed."""
    if any(names.get(role) is not None and os.path.lexists(names[role]) for role in ("folder", "old")):
        return False
    try:
        os.remove(names["lock"])
    except OSError:
        return False
    return True


def remove_directory_leftovers(path: PathLike) -> List[str]:
    """Clears what killed or failed exports to the folder `path` (through
    symlinks) left beside it: each group of our temporary folders whose lock
    no live process holds. Where `path` is missing and the group holds the
    old folder that export moved aside, the newest whole folder is put in
    place first: its new folder (whole once the old one is moved aside), else
    the old one. An export in progress, in this process or another, holds its
    lock and is left alone; nothing not named and locked as ours is touched.
    Returns the paths removed."""
    target = os.path.realpath(os.fspath(path))
    directory, base = os.path.split(target)
    groups: Dict[str, Dict[str, str]] = {}
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for name in names:
        match = _FOLDER_TEMPORARY.fullmatch(name)
        if match is not None and match.group("base") == base:
            groups.setdefault(match.group("id"), {})[match.group("role")] = os.path.join(directory, name)
    removed = []
    for parts in groups.values():
        fd = _abandoned_lock(parts["lock"]) if "lock" in parts else None
        if fd is None:
            continue
        try:
            if "old" in parts and not os.path.lexists(target):
                try:
                    os.rename(parts.get("folder", parts["old"]), target)
                except OSError:  # every folder stays, whole, for the next export to try again
                    continue
                _fsync(directory)
            for role in ("folder", "old"):
                folder = parts.get(role)
                if folder is not None and os.path.isdir(folder) and not os.path.islink(folder):
                    shutil.rmtree(folder, ignore_errors=True)
                    if not os.path.lexists(folder):
                        removed.append(folder)
            if _remove_export_lock(parts):
                removed.append(parts["lock"])
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[str]:
    """Yields an empty temporary folder beside `path` (through symlinks); once
    the block has written it completely (a SavedModel, say), it takes the
    place of `path`, so a reader polling the parent folder (TF Serving, which
    loads each numbered version folder it finds) never sees `path` half
    written. An existing folder at `path` is moved aside, then removed once
    the new one is in place: `path` holds the old folder or the new one
    whole, never a mix. On error or interruption the temporary folder is
    removed and `path` keeps what it held. What a killed export left (its
    folders, hidden beside `path`, under a lock no process holds), or a
    failed one could not remove or put back, is cleared by the next export
    to `path` (`remove_directory_leftovers`), which first puts the newest
    whole folder in place where `path` is missing (an export killed between
    its two renames).

    Raises:
      FileExistsError: `path` exists and is not a folder.
    """
    target = os.path.realpath(os.fspath(path))
    directory, base = os.path.split(target)
    if os.path.exists(target) and not os.path.isdir(target):
        raise FileExistsError(f"{os.fspath(path)!r} exists and is not a folder; a SavedModel is a folder.")
    os.makedirs(directory, exist_ok=True)
    remove_directory_leftovers(target)
    # Hidden and not numbers: TF Serving takes none of them for a version.
    # The folder is made with the process's umask, as one written in place.
    names = _folder_names(directory, base)
    lock = os.open(names["lock"], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.mkdir(names["folder"])
        try:
            yield names["folder"]
            old = names["old"] if os.path.isdir(target) else None
            if old is not None:
                os.rename(target, old)
            try:
                os.rename(names["folder"], target)
            except BaseException:
                if old is not None:
                    os.rename(old, target)
                raise
        except BaseException:
            # Where the old folder could not be put back either, the new one
            # (whole) stays beside it for the next export to put in place.
            if os.path.lexists(target) or not os.path.lexists(names["old"]):
                shutil.rmtree(names["folder"], ignore_errors=True)
            raise
        _fsync(directory)
        if old is not None:
            shutil.rmtree(old)
    finally:
        _remove_export_lock(names)
        os.close(lock)


# -- loading -------------------------------------------------------------------
def check_archive(filepath: PathLike) -> None:
    """Raises a ValueError naming `filepath` unless it is a complete `.keras`
    archive: a zip file that holds `config.json` and whose members all match
    their checksums (a file cut short, overwritten or not a model fails)."""
    path = os.fspath(filepath)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            corrupt = archive.testzip()
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise ValueError(
            f"{path!r} is not a valid or complete .keras archive: it is not a whole zip "
            f"file ({error}). It was cut short (an interrupted copy, download or save by "
            "another tool) or is not a Keras model. Save the model again."
        ) from error
    if corrupt is not None:
        raise ValueError(
            f"{path!r} is not a valid .keras archive: its member {corrupt!r} is corrupt "
            "(its checksum does not match). Save the model again."
        )
    if "config.json" not in names:
        raise ValueError(
            f"{path!r} is not a complete .keras archive: it holds no config.json "
            f"(it holds {sorted(names)}). Save the model again."
        )


def _is_keras_file(filepath):
    return (
        isinstance(filepath, (str, os.PathLike))
        and os.fspath(filepath).endswith(".keras")
        and os.path.isfile(filepath)
    )


# The public modules where Keras looks up a function saved by name only
# ({"module": "builtins", "class_name": "function", "config": "relu"}).
_KERAS_FUNCTION_MODULES = (
    "activations", "constraints", "initializers", "losses", "metrics", "optimizers", "regularizers",
)
_KERAS_PACKAGES = ("keras", "keras_hub", "keras_cv", "keras_nlp")


def _unresolvable(entry, custom_objects):
    """The name under which Keras looks up the object an `entry` of a saved
    config describes, when it cannot find it: not Keras' own, not registered
    with `keras.saving.register_keras_serializable`, not in `custom_objects`
    or a `keras.saving.custom_object_scope`. None when it can."""
    module = entry.get("module") or ""
    if entry["class_name"] == "function":
        key = entry.get("config")
        if not isinstance(key, str):
            return None
        if module == "builtins" and any(
            getattr(getattr(keras, m), key, None) is not None for m in _KERAS_FUNCTION_MODULES
        ):
            return None
    else:
        key = entry.get("registered_name") or entry["class_name"]
        if module.split(".", 1)[0] in _KERAS_PACKAGES:
            return None
    if keras.saving.get_registered_object(key, custom_objects=custom_objects) is not None:
        return None
    return key


def unknown_objects(config: Any, custom_objects: Optional[Mapping[str, Any]] = None) -> List[str]:
    """The names of the classes and functions a serialised Keras config uses
    that this process cannot deserialise, in the order they appear."""
    found = []

    def visit(value):
        if isinstance(value, dict):
            if isinstance(value.get("class_name"), str) and "module" in value:
                key = _unresolvable(value, custom_objects)
                if key is not None and key not in found:
                    found.append(key)
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(config)
    return found


def unknown_objects_error(what: str, names: Sequence[str]) -> ValueError:
    """The error for `what` (e.g. "the model in 'm.keras'") using the classes
    or functions `names` that this process does not know."""
    example = ", ".join(f"{name!r}: {name.rsplit('>', 1)[-1]}" for name in names)
    return ValueError(
        f"Cannot load {what}: it uses {names}, which this process does not know (custom "
        "classes or functions that are not registered). Pass them to load_model(..., "
        f"custom_objects={{{example}}}), or decorate them with "
        "@keras.saving.register_keras_serializable() and import the module that defines "
        "them before loading."
    )


def deserialize_network(
    config: Dict[str, Any], custom_objects: Optional[Mapping[str, Any]] = None
) -> keras.Model:
    """`keras.saving.deserialize_keras_object(config)` for the network inside a
    `BackpropQModel`'s config; a class or function the process does not know
    is a ValueError naming it (Keras would bury it in a TypeError of the
    whole config)."""
    saved = copy.deepcopy(config)  # Keras consumes parts of the config it reads
    try:
        return keras.saving.deserialize_keras_object(config, custom_objects=custom_objects)
    except TypeError as error:
        names = unknown_objects(saved, custom_objects)
        if not names:
            raise
        raise unknown_objects_error("the network of a BackpropQModel", names) from error


def network_config(name: str, trainable: bool, network: keras.Model) -> Dict[str, Any]:
    """The config of a `BackpropQModel` named `name` made from a functional
    `network` (`network_from_config` reads it back)."""
    return {"name": name, "trainable": trainable, "network": keras.saving.serialize_keras_object(network)}


def network_from_config(
    config: Mapping[str, Any], custom_objects: Optional[Mapping[str, Any]] = None
) -> Dict[str, Any]:
    """The constructor arguments of a `BackpropQModel` saved by `network_config`,
    its network deserialised with `custom_objects` (`deserialize_network`)."""
    return dict(config, network=deserialize_network(config["network"], custom_objects))


def load_model(
    filepath: PathLike,
    custom_objects: Optional[Mapping[str, Any]] = None,
    compile: bool = True,
    safe_mode: bool = True,
) -> keras.Model:
    """`keras.saving.load_model`, with errors that say what is wrong: a `.keras`
    file that is cut short or corrupt is a ValueError naming it (Keras says
    "File not found"), and a class or function the process does not know is
    a ValueError naming it and saying how to provide it."""
    config = None
    if _is_keras_file(filepath):
        check_archive(filepath)
        with zipfile.ZipFile(filepath) as archive:
            config = json.loads(archive.read("config.json"))
    try:
        return keras.saving.load_model(
            filepath, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode
        )
    except TypeError as error:
        names = unknown_objects(config, custom_objects) if config is not None else []
        if not names:
            raise
        raise unknown_objects_error(f"the model in {os.fspath(filepath)!r}", names) from error


# Backup folders of `keras.callbacks.BackupAndRestore` callbacks that `fit`
# may restore each model from (set by `callbacks.FitPosition` while `fit` runs).
_BACKUP_DIRS = weakref.WeakKeyDictionary()


def set_backup_dirs(model: keras.Model, backup_dirs: Optional[Iterable[PathLike]]) -> None:
    """Notes the `BackupAndRestore` folders `fit` may restore `model` from
    (None: `fit` is over), so that a backup written by another model is
    reported as such (`explained_load_errors`)."""
    if backup_dirs is None:
        _BACKUP_DIRS.pop(model, None)
    else:
        _BACKUP_DIRS[model] = list(backup_dirs)


def _backup_dir(model, filepath):
    folder = os.path.dirname(os.path.abspath(filepath))
    for backup_dir in _BACKUP_DIRS.get(model, ()):
        if os.path.abspath(backup_dir) == folder:
            return backup_dir
    return None


def _mismatch_error(model, path, detail, compiled):
    """The error for weights in `path` that do not fit `model`."""
    backup = _backup_dir(model, path)
    if backup is not None:
        backup = os.fspath(backup)
        return ValueError(
            f"The backup in {backup!r} (keras.callbacks.BackupAndRestore) was written by a "
            f"different model than {model.name!r}: other layers, or other compile options "
            "(optimizers, estimators and critics decide which training state exists). "
            f"Training cannot resume from it. Delete {backup!r} to start afresh, or give "
            "BackupAndRestore another backup_dir; to resume that run, build and compile the "
            f"model as it was. Keras says: {detail}"
        )
    hint = (
        "build and compile it as the model that saved it (optimizers, estimators and "
        "critics decide which training state exists)"
        if compiled
        else "compile it with the options it was saved with, and build it (call it on a "
        "batch), before loading"
    )
    return ValueError(f"The weights in {path!r} do not fit model {model.name!r}: {hint}. Keras says: {detail}")


# Keras only warns when it leaves an optimizer's state unloaded.
_OPTIMIZER_SKIPPED = "Skipping variable loading for optimizer"


@contextlib.contextmanager
def explained_load_errors(
    model: keras.Model, filepath: Any, compiled: bool, strict: bool = True
) -> Iterator[None]:
    """Around `keras.Model.load_weights(filepath)` of `model`: a file that does
    not fit the model is a ValueError that says so, and, for a
    `BackupAndRestore` backup, which folder holds it and what to do; a `.keras`
    file cut short is a ValueError naming it; a damaged weights file an
    OSError naming it (so `BackupAndRestore` still falls back to its previous
    copy). `compiled`: whether the model's training state was created.

    With `strict` (`load_weights(skip_mismatch=False)`), an optimizer whose
    state Keras leaves unloaded (it only warns: another optimizer, or another
    set of variables) is such an error too, not a silent fresh start."""
    path = os.fspath(filepath) if isinstance(filepath, (str, os.PathLike)) else str(filepath)
    if _is_keras_file(filepath):
        check_archive(filepath)
    caught, skipped = [], []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    except ValueError as error:
        message = str(error)
        if "could not be loaded" not in message and "training_state" not in message:
            raise
        # Keras' first example, without its list of objects or variable values.
        detail = message.split("List of objects that could not be loaded")[0]
        detail = " ".join(detail.split("Target variable:")[0].split())
        raise _mismatch_error(model, path, detail, compiled) from error
    except OSError as error:
        if type(error) is not OSError:  # FileNotFoundError, PermissionError, ...
            raise
        raise OSError(f"{path!r} is not a valid or complete weights file: {error}") from error
    finally:
        for warning in caught:
            if strict and _OPTIMIZER_SKIPPED in str(warning.message):
                skipped.append(" ".join(str(warning.message).split()))
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if skipped:
        raise _mismatch_error(model, path, " ".join(skipped), compiled)


# -- the model's save methods -------------------------------------------------
def optimizers(
    model: keras.Model, main: str = "actor"
) -> List[Tuple[Optional[keras.optimizers.Optimizer], str]]:
    """`[(optimizer or None, role)]`: the two optimizers of a model (a
    `BackpropQModel`, a `logged.LoggedModel`), whose variables a training step
    writes and a checkpoint holds: `model.optimizer` (role `"<main> optimizer
    variable"`) and `model.critic_optimizer` (`"critic optimizer variable"`);
    None where the model is not compiled. The roles name the variables in
    errors (`callbacks.step_variables`)."""
    return [
        (getattr(model, "optimizer", None), f"{main} optimizer variable"),
        (model.critic_optimizer, "critic optimizer variable"),
    ]


class AtomicCheckpoints:
    """`save`, `save_weights` and `load_weights` of a `BackpropQModel` or a
    `logged.LoggedModel` (mixed in before `keras.Model`): Keras' own, written
    atomically (`atomic_write`), with the training state, refusing
    non-finite values (`check_finite`) in the model's variables and its
    `optimizers`.

    The model provides `build_training_state()`, which creates every variable
    that training creates on first use (so that each checkpoint has the
    layout of a model that has trained) and returns whether the model is
    compiled, and its `optimizer` and `critic_optimizer`."""

    def _check_savable(self, what):
        self.build_training_state()
        variables = list(self.variables)
        for optimizer, _ in optimizers(self):
            if optimizer is not None:
                variables += list(optimizer.variables)
        check_finite(variables, f"{what} of {self.name!r}")

    def save(
        self, filepath: Union[str, os.PathLike], overwrite: bool = True, zipped: Optional[bool] = None, **kwargs: Any
    ) -> None:
        """`keras.Model.save`, written atomically (a temporary file renamed over
        `filepath`), with the training state; refuses non-finite values."""
        self._check_savable("the model")
        if zipped is False or not atomic_target(filepath, ".keras", overwrite):
            return super().save(filepath, overwrite=overwrite, zipped=zipped, **kwargs)
        with atomic_write(filepath) as temporary:
            super().save(temporary, overwrite=True, zipped=zipped, **kwargs)

    def save_weights(
        self, filepath: Union[str, os.PathLike], overwrite: bool = True, max_shard_size: Optional[float] = None
    ) -> None:
        """`keras.Model.save_weights`, written atomically, with the training
        state (critics, target copies, estimator state, seed generators, both
        optimizers, the fit position); refuses non-finite values."""
        self._check_savable("the weights")
        if max_shard_size is not None or not atomic_target(filepath, ".weights.h5", overwrite):
            return super().save_weights(filepath, overwrite=overwrite, max_shard_size=max_shard_size)
        with atomic_write(filepath) as temporary:
            super().save_weights(temporary, overwrite=True)

    def load_weights(
        self, filepath: Union[str, os.PathLike], skip_mismatch: bool = False, **kwargs: Any
    ) -> None:
        """`keras.Model.load_weights`, after creating the training state the
        file holds (compile the model first, with the options it was saved with)."""
        ready = self.build_training_state()
        with explained_load_errors(self, filepath, ready, strict=not skip_mismatch):
            return super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)
