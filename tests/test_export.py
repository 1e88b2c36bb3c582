"""SavedModel export: the serving contract, checked without keras_bpq.

The export is loaded in a fresh Python process that never imports keras_bpq,
and with `saved_model_cli`, the tool that ships with TensorFlow (TF Serving
itself cannot be installed here; it reads the same SavedModel signatures).
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import graphs
import keras_bpq

ROWS = 3000  # draws per input row in the frequency checks


def served_model():
    """x -> z (2 bits) -> c (3-way) -> n (Normal) -> output; a cost on the output."""
    x = keras.Input((3,), name="features")
    z = keras_bpq.Bernoulli(name="z", seed=1)(keras.layers.Dense(2, name="dz")(x))
    c = keras_bpq.Categorical(name="c", seed=2)(
        keras.layers.Dense(3, name="dc")(keras.layers.Concatenate()([z, x]))
    )
    n = keras_bpq.Normal(name="n", seed=3)(
        keras.layers.Dense(2, name="dn")(keras.layers.Concatenate()([c, x]))
    )
    out = keras.layers.Dense(2, name="out")(keras.layers.Concatenate()([c, n]))
    cost = keras.ops.sum(keras.ops.square(out - x[:, :2]), axis=-1)
    return keras_bpq.BackpropQModel(inputs=x, outputs=out, costs={"cost": cost}, name="served")


def reference(model, x):
    """The trained model's own probabilities and most likely values, from its layers."""
    layer = model.get_layer
    p_z = keras.ops.convert_to_numpy(keras.ops.sigmoid(layer("dz")(x)))
    p_c = np.zeros((len(x), 3))
    for bits in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        z = np.tile(np.array(bits, "float32"), (len(x), 1))
        weight = np.prod(np.where(z > 0, p_z, 1.0 - p_z), axis=1, keepdims=True)
        logits = layer("dc")(np.concatenate([z, x], axis=1))
        p_c += weight * keras.ops.convert_to_numpy(keras.ops.softmax(logits))

    def normal(c):
        params = keras.ops.convert_to_numpy(layer("dn")(np.concatenate([c, x], axis=1)))
        return params[:, 0], np.log1p(np.exp(params[:, 1])) + 1e-5

    z_mode = (keras.ops.convert_to_numpy(layer("dz")(x)) > 0).astype("float32")
    c_logits = keras.ops.convert_to_numpy(layer("dc")(np.concatenate([z_mode, x], axis=1)))
    c_mode = np.eye(3, dtype="float32")[np.argmax(c_logits, axis=1)]
    n_mode = normal(c_mode)[0][:, None]
    return {"p_z": p_z, "p_c": p_c, "normal": normal, "z": z_mode, "c": c_mode, "n": n_mode}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = served_model()
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    data = np.random.RandomState(0).normal(size=(32, 3)).astype("float32")
    model.fit(data, batch_size=8, epochs=2, verbose=0)
    base = tmp_path_factory.mktemp("export")
    path = base / "served" / "1"  # TF Serving's <model_base_path>/<version>
    summary = model.export(str(path), verbose=False)
    return model, data[:2], path, summary


def test_export_holds_only_the_forward_pass(served):
    model, _, path, summary = served
    assert set(summary) == {"serving_default", "mode", "seeded"}
    machinery = {id(v) for v in model.training_state.variables}
    forward = [v for v in model.variables if id(v) not in machinery]
    assert len(forward) < len(model.variables)  # critics exist and are left out
    keys = [k for k, _ in tf.train.list_variables(str(path / "variables" / "variables"))]
    values = [k for k in keys if k.endswith("VARIABLE_VALUE")]
    assert len(values) == len(forward), values
    assert not any("optimizer" in k or "critic" in k for k in keys), keys
    shapes = sorted(tuple(s) for k, s in tf.train.list_variables(str(path / "variables" / "variables"))
                    if k.endswith("VARIABLE_VALUE"))
    assert shapes == sorted(tuple(v.shape) for v in forward)
    for name in ("serving_default", "mode"):
        assert set(summary[name]["inputs"]) == {"features"}
    assert set(summary["seeded"]["inputs"]) == {"features", "seed"}
    assert summary["seeded"]["inputs"]["seed"] == tf.TensorSpec([None], tf.int64)
    outputs = summary["serving_default"]["outputs"]
    assert set(outputs) == {"output", "z", "c", "n", "z_log_prob", "c_log_prob", "n_log_prob"}
    assert outputs["c_log_prob"] == tf.TensorSpec([None], tf.float32)
    assert set(summary["seeded"]["outputs"]) == set(outputs)
    assert set(summary["mode"]["outputs"]) == {"output", "z", "c", "n"}
    assert outputs["c"] == tf.TensorSpec([None, 3], tf.float32)
    assert outputs["output"] == tf.TensorSpec([None, 2], tf.float32)


CHILD = r'''
import json, sys
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

path, inputs, out = sys.argv[1:4]
loaded = tf.saved_model.load(path)
data = np.load(inputs)
x, seeds = tf.constant(data["x"]), tf.constant(data["seeds"])
signatures = loaded.signatures
report = {"signatures": sorted(signatures)}
specs = {}
for name, fn in signatures.items():
    inputs_spec = fn.structured_input_signature[1]
    specs[name] = {
        "inputs": {k: [s.shape.as_list(), s.dtype.name] for k, s in inputs_spec.items()},
        "outputs": {k: [s.shape.as_list(), s.dtype.name] for k, s in fn.structured_outputs.items()},
    }
report["specs"] = specs
arrays = {}
def keep(prefix, result):
    for key, value in result.items():
        arrays[f"{prefix}/{key}"] = value.numpy()
keep("sample", signatures["serving_default"](features=x))
keep("sample_again", signatures["serving_default"](features=x))
keep("mode", signatures["mode"](features=x))
keep("seeded", signatures["seeded"](features=x, seed=seeds))
keep("seeded_again", signatures["seeded"](features=x, seed=seeds))
order = np.random.RandomState(0).permutation(len(data["x"]))[:50]
keep("seeded_subset", signatures["seeded"](features=tf.gather(x, order), seed=tf.gather(seeds, order)))
arrays["subset_order"] = order

proto = saved_model_pb2.SavedModel()
proto.ParseFromString(open(path + "/saved_model.pb", "rb").read())
ops = set()
for graph in proto.meta_graphs:
    ops.update(node.op for node in graph.graph_def.node)
    for function in graph.graph_def.library.function:
        ops.update(node.op for node in function.node_def)
report["ops"] = sorted(ops)
report["unregistered_ops"] = sorted(op for op in ops if not hasattr(tf.raw_ops, op))
report["modules"] = sorted(m for m in ("keras_bpq", "tensorflow_probability") if m in sys.modules)
np.savez(out + ".npz", **arrays)
with open(out + ".json", "w") as f:
    json.dump(report, f)
'''


def _child_env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PYTHONPATH", None)
    return env


def _run_child(tmp_path, source, *args):
    """Runs `source` as a script in a fresh Python process (without this
    checkout on its path) with `args`; fails the test if the process does."""
    script = tmp_path / "child.py"
    script.write_text(source)
    result = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=tmp_path, env=_child_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_fresh_process_serving_contract(served, tmp_path):
    model, x, path, _ = served
    inputs = np.repeat(x, ROWS, axis=0)
    seeds = np.arange(len(inputs), dtype=np.int64) * 7919 + 11
    np.savez(tmp_path / "inputs.npz", x=inputs, seeds=seeds)
    _run_child(tmp_path, CHILD, path, tmp_path / "inputs.npz", tmp_path / "out")
    report = json.loads((tmp_path / "out.json").read_text())
    arrays = np.load(tmp_path / "out.npz")

    # Never needed keras_bpq or TFP; only core TF ops.
    assert report["modules"] == []
    assert report["unregistered_ops"] == [], report["unregistered_ops"]
    assert not {"PyFunc", "EagerPyFunc", "PyFuncStateless"} & set(report["ops"])

    # Signatures, shapes and dtypes.
    assert report["signatures"] == ["mode", "seeded", "serving_default"]
    specs = report["specs"]
    assert specs["serving_default"]["inputs"] == {"features": [[None, 3], "float32"]}
    assert specs["seeded"]["inputs"] == {"features": [[None, 3], "float32"], "seed": [[None], "int64"]}
    expected = {"output": [None, 2], "z": [None, 2], "c": [None, 3], "n": [None, 1]}
    log_probs = {f"{k}_log_prob": [None] for k in ("z", "c", "n")}
    for name in report["signatures"]:
        wanted = expected if name == "mode" else {**expected, **log_probs}
        assert specs[name]["outputs"] == {k: [v, "float32"] for k, v in wanted.items()}, name
    for prefix in ("sample", "mode", "seeded"):
        for key, shape in expected.items():
            value = arrays[f"{prefix}/{key}"]
            assert value.shape == (len(inputs), shape[1]) and value.dtype == np.float32

    ref = reference(model, x)
    row = np.repeat([0, 1], ROWS)

    # mode: the most likely value of every node, and the model's prediction.
    for key in ("z", "c", "n"):
        np.testing.assert_allclose(arrays[f"mode/{key}"], ref[key][row], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        arrays["mode/output"], np.repeat(model.predict(x, verbose=0), ROWS, axis=0), rtol=1e-5, atol=1e-5
    )

    # seeded: the same seed gives the same sample, whatever else is in the batch.
    order = arrays["subset_order"]
    for key in expected:
        np.testing.assert_array_equal(arrays[f"seeded/{key}"], arrays[f"seeded_again/{key}"])
        np.testing.assert_array_equal(arrays[f"seeded_subset/{key}"], arrays[f"seeded/{key}"][order])
    # serving_default draws afresh on every call.
    assert not np.array_equal(arrays["sample/z"], arrays["sample_again/z"])

    # Sample frequencies match the trained model's probabilities.
    for prefix in ("sample", "seeded"):
        z, c, n = (arrays[f"{prefix}/{k}"] for k in ("z", "c", "n"))
        assert set(np.unique(z)) <= {0.0, 1.0} and np.all(c.sum(axis=1) == 1.0)
        for r in (0, 1):
            rows = row == r
            for freq, p in ((z[rows].mean(0), ref["p_z"][r]), (c[rows].mean(0), ref["p_c"][r])):
                tol = 5 * np.sqrt(p * (1 - p) / ROWS) + 2e-3
                assert np.all(np.abs(freq - p) <= tol), (prefix, r, freq, p)
            for k in range(3):
                group = rows & (c[:, k] == 1)
                if group.sum() < 30:
                    continue
                onehot = np.tile(np.eye(3, dtype="float32")[k], (2, 1))
                loc, scale = (v[r] for v in ref["normal"](onehot))
                mean = n[group, 0].mean()
                assert abs(mean - loc) <= 5 * scale / np.sqrt(group.sum()), (prefix, r, k, mean, loc)
                if group.sum() >= 200:  # the std's relative error is then about 5%
                    assert abs(n[group, 0].std() / scale - 1) < 0.25, (prefix, r, k)


SERVE_LOG_PROB = r'''
import sys
import numpy as np
import tensorflow as tf

path, inputs, out = sys.argv[1:4]
signatures = tf.saved_model.load(path).signatures
data = np.load(inputs)
arrays = {}
for prefix, result in [
    ("sample", signatures["serving_default"](features=data["x"])),
    ("seeded", signatures["seeded"](features=data["x"], seed=data["seeds"])),
    ("seeded_again", signatures["seeded"](features=data["x"], seed=data["seeds"])),
]:
    arrays.update({f"{prefix}/{k}": v.numpy() for k, v in result.items()})
arrays["modules"] = np.array(sorted(m for m in ("keras_bpq", "tensorflow_probability") if m in sys.modules))
np.savez(out, **arrays)
'''


def _log_probs(model, x, z, c, n):
    """`log p` of served samples `z`, `c`, `n` under the trained model, from its
    Dense layers and the distributions' textbook formulas (not the nodes' code)."""
    layer = model.get_layer
    logits_z = keras.ops.convert_to_numpy(layer("dz")(x)).astype(np.float64)
    log_z = np.sum(z * logits_z - np.logaddexp(0.0, logits_z), axis=1)
    logits_c = keras.ops.convert_to_numpy(layer("dc")(np.concatenate([z, x], axis=1))).astype(np.float64)
    log_c = np.sum(c * logits_c, axis=1) - np.log(np.sum(np.exp(logits_c), axis=1))
    params = keras.ops.convert_to_numpy(layer("dn")(np.concatenate([c, x], axis=1))).astype(np.float64)
    loc, scale = params[:, 0], np.logaddexp(0.0, params[:, 1]) + 1e-5
    log_n = -0.5 * ((n[:, 0] - loc) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi)
    return {"z": log_z, "c": log_c, "n": log_n}


def test_fresh_process_serves_the_log_prob_of_its_samples(served, tmp_path):
    """`<node>_log_prob`, served by a process that never imports keras_bpq, is
    the trained model's log-probability of the sample it served."""
    model, _, path, _ = served
    x = np.random.RandomState(1).normal(size=(200, 3)).astype("float32")
    seeds = np.arange(len(x), dtype=np.int64) * 31 + 5
    np.savez(tmp_path / "inputs.npz", x=x, seeds=seeds)
    _run_child(tmp_path, SERVE_LOG_PROB, path, tmp_path / "inputs.npz", tmp_path / "out.npz")
    arrays = np.load(tmp_path / "out.npz")
    assert arrays["modules"].size == 0
    for prefix in ("sample", "seeded"):
        z, c, n = (arrays[f"{prefix}/{k}"] for k in ("z", "c", "n"))
        expected = _log_probs(model, x, z, c, n)
        for key in ("z", "c", "n"):
            served_log_prob = arrays[f"{prefix}/{key}_log_prob"]
            assert served_log_prob.shape == (len(x),) and served_log_prob.dtype == np.float32
            np.testing.assert_allclose(served_log_prob, expected[key], rtol=1e-4, atol=1e-4,
                                       err_msg=f"{prefix}/{key}_log_prob")
        # Not a constant: the samples' log-probabilities differ across rows.
        assert np.std(arrays[f"{prefix}/c_log_prob"]) > 0.01
        assert np.all(arrays[f"{prefix}/c_log_prob"] <= 0.0)
    for key in ("z", "c", "n"):
        np.testing.assert_array_equal(arrays[f"seeded/{key}_log_prob"], arrays[f"seeded_again/{key}_log_prob"])


@pytest.mark.parametrize("names", [("x", "x_log_prob"), ("x_log_prob", "x")])
def test_log_prob_keys_that_collide_are_refused(names, tmp_path):
    inputs = keras.Input((3,), name="features")
    first = keras_bpq.Bernoulli(name=names[0])(keras.layers.Dense(2)(inputs))
    second = keras_bpq.Bernoulli(name=names[1])(keras.layers.Dense(2)(first))
    model = keras_bpq.BackpropQModel(
        inputs=inputs, outputs=second, costs={"cost": keras.ops.sum(second, axis=-1)}
    )
    with pytest.raises(ValueError) as error:
        model.export(str(tmp_path / "clash"), verbose=False)
    message = str(error.value)
    assert "the log-probability of node 'x'" in message and "the sample of node 'x_log_prob'" in message
    assert "output key 'x_log_prob'" in message and "Rename the node" in message


def _cli(*args):
    exe = shutil.which("saved_model_cli", path=os.path.dirname(sys.executable)) or shutil.which(
        "saved_model_cli"
    )
    assert exe, "saved_model_cli is installed with tensorflow"
    return subprocess.Popen(
        [exe, *args], env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_saved_model_cli_show_and_run(served, tmp_path):
    model, x, path, _ = served
    seed = np.array([3, 4], np.int64)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "seed.npy", seed)
    runs = {"show": _cli("show", "--dir", str(path), "--all")}
    for signature, inputs in [
        ("seeded", f"features={tmp_path / 'x.npy'};seed={tmp_path / 'seed.npy'}"),
        ("mode", f"features={tmp_path / 'x.npy'}"),
    ]:
        runs[signature] = _cli("run", "--dir", str(path), "--tag_set", "serve", "--signature_def",
                               signature, "--inputs", inputs, "--outdir", str(tmp_path / signature))
    # A TF1 session (as TF Serving runs a SavedModel) checks the inputs too.
    np.save(tmp_path / "three_seeds.npy", np.arange(3, dtype=np.int64))
    bad = _cli("run", "--dir", str(path), "--tag_set", "serve", "--signature_def", "seeded", "--inputs",
               f"features={tmp_path / 'x.npy'};seed={tmp_path / 'three_seeds.npy'}",
               "--outdir", str(tmp_path / "bad"))
    outputs = {name: proc.communicate(timeout=300) for name, proc in runs.items()}
    for name, proc in runs.items():
        assert proc.returncode == 0, (name, outputs[name][1][-3000:])
    bad_stderr = bad.communicate(timeout=300)[1]
    assert bad.returncode != 0
    assert ("Signature seeded: input `seed` must hold one int64 seed per example; got 3 seeds for 2 "
            "rows of input `features`.") in bad_stderr, bad_stderr[-3000:]

    shown = outputs["show"][0]
    for signature in ("serving_default", "mode", "seeded"):
        assert f"signature_def['{signature}']" in shown
    assert "inputs['seed'] tensor_info:\n        dtype: DT_INT64\n        shape: (-1)" in shown
    assert "inputs['features'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, 3)" in shown
    for key in ("output", "z", "c", "n"):
        assert f"outputs['{key}'] tensor_info" in shown

    # The CLI (a TF1 session) and TF2's loader give the same seeded sample.
    loaded = tf.saved_model.load(str(path))
    seeded = loaded.signatures["seeded"](features=x, seed=seed)
    for key, width in (("output", 2), ("z", 2), ("c", 3), ("n", 1)):
        for name in ("seeded", "mode"):
            value = np.load(tmp_path / name / f"{key}.npy")
            assert value.shape == (2, width) and value.dtype == np.float32, (name, key)
        np.testing.assert_allclose(np.load(tmp_path / "seeded" / f"{key}.npy"), seeded[key].numpy(),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "mode" / "output.npy"), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_seeded_samples_respect_masks(tmp_path):
    """A masked Categorical: seeded draws never pick a forbidden outcome."""
    model, queries = graphs.walk_task()
    model.compile()
    model.export(str(tmp_path / "walk"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "walk"))
    x = np.repeat(queries[:4], 50, axis=0)
    seeds = np.arange(len(x), dtype=np.int64)
    result = loaded.signatures["seeded"](inputs=x, seed=seeds)
    adjacency = graphs.walk_adjacency(0)
    start = np.argmax(x[:, :10], axis=1)
    hop1 = np.argmax(result["hop1"].numpy(), axis=1)
    assert np.all(adjacency[start, hop1] > 0)
    assert np.all(adjacency[hop1, np.argmax(result["hop2"].numpy(), axis=1)] > 0)
    assert len(np.unique(hop1)) > 1
    mode = loaded.signatures["mode"](inputs=x)
    np.testing.assert_array_equal(mode["output"].numpy(), model.predict(x, verbose=0))


class Looping(keras_bpq.BackpropQModel):
    """A subclassed model calling one node layer twice."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hop = keras_bpq.Categorical(name="hop", seed=3)
        self.d1 = keras.layers.Dense(3)
        self.d2 = keras.layers.Dense(3)

    def call(self, x, training=None):
        h2 = self.hop(self.d2(self.hop(self.d1(x))))
        keras_bpq.add_cost("cost", keras.ops.sum(h2 * x, axis=-1))
        return h2


def test_subclassed_export_and_errors(tmp_path):
    model = Looping()
    with pytest.raises(ValueError, match="does not know its inputs"):
        model.export(str(tmp_path / "none"), verbose=False)
    x = np.ones((2, 3), "float32")
    model(x)
    summary = model.export(str(tmp_path / "looping"), verbose=False)
    assert set(summary["mode"]["outputs"]) == {"output", "hop", "hop_2"}
    assert set(summary["seeded"]["inputs"]) == {"inputs", "seed"}
    with pytest.raises(ValueError, match="tf_saved_model"):
        model.export(str(tmp_path / "onnx"), format="onnx")
    assert pathlib.Path(tmp_path / "looping" / "saved_model.pb").exists()


def test_several_named_inputs_and_outputs(tmp_path):
    a, b = keras.Input((2,), name="query"), keras.Input((3,), name="context")
    h = keras.layers.Concatenate()([a, b])
    z = keras_bpq.Bernoulli(name="z", seed=1)(keras.layers.Dense(2)(h))
    out = {"score": keras.layers.Dense(1)(z), "bits": z}
    cost = keras.ops.sum(keras.ops.square(z - b[:, :2]), axis=-1)
    model = keras_bpq.BackpropQModel(inputs=[a, b], outputs=out, costs={"cost": cost})
    summary = model.export(str(tmp_path / "two"), verbose=False)
    assert set(summary["seeded"]["inputs"]) == {"query", "context", "seed"}
    assert set(summary["mode"]["outputs"]) == {"output_score", "output_bits", "z"}
    loaded = tf.saved_model.load(str(tmp_path / "two"))
    x = {"query": np.ones((4, 2), "float32"), "context": np.zeros((4, 3), "float32")}
    result = loaded.signatures["seeded"](**x, seed=np.arange(4, dtype=np.int64))
    np.testing.assert_array_equal(result["z"].numpy(), result["output_bits"].numpy())
    assert result["output_score"].shape == (4, 1)


BAD_CALLS = r'''
import json, sys
import numpy as np
import tensorflow as tf

served, two, walk, out = sys.argv[1:5]
f32 = lambda *shape: tf.ones(shape, tf.float32)
seeds = lambda n: tf.range(n, dtype=tf.int64)
walk_x = np.zeros((3, 20), np.float32)
walk_x[[0, 2], [1, 4]] = 1.0  # rows 0 and 2 start somewhere; row 1 starts nowhere
walk_x[:, 13] = 1.0  # a goal
calls = {
    "rank3": (served, "serving_default", dict(features=f32(2, 3, 1))),
    "rank1": (served, "mode", dict(features=f32(3))),
    "scalar": (served, "seeded", dict(features=tf.constant(1.0), seed=seeds(1))),
    "width": (served, "mode", dict(features=f32(2, 5))),
    "seed_scalar": (served, "seeded", dict(features=f32(2, 3), seed=tf.constant(7, tf.int64))),
    "seed_matrix": (served, "seeded", dict(features=f32(2, 3), seed=tf.zeros([2, 1], tf.int64))),
    "one_seed_four_rows": (served, "seeded", dict(features=f32(4, 3), seed=seeds(1))),
    "three_seeds_two_rows": (served, "seeded", dict(features=f32(2, 3), seed=seeds(3))),
    "float64_features": (served, "serving_default", dict(features=tf.ones([2, 3], tf.float64))),
    "int32_seed": (served, "seeded", dict(features=f32(2, 3), seed=tf.range(2))),
    "batch_mismatch": (two, "serving_default", dict(query=f32(4, 2), context=f32(3, 3))),
    "batch_mismatch_seeded": (two, "seeded", dict(query=f32(4, 2), context=f32(4, 3), seed=seeds(2))),
    "empty_mask_sample": (walk, "serving_default", dict(inputs=walk_x)),
    "empty_mask_mode": (walk, "mode", dict(inputs=walk_x)),
    "empty_mask_seeded": (walk, "seeded", dict(inputs=walk_x, seed=seeds(3))),
    "good": (served, "seeded", dict(features=f32(2, 3), seed=seeds(2))),
}
loaded = {path: tf.saved_model.load(path) for path in {served, two, walk}}
report = {}
for case, (path, signature, kwargs) in calls.items():
    try:
        loaded[path].signatures[signature](**kwargs)
        report[case] = None
    except tf.errors.InvalidArgumentError as error:
        lines = error.message.splitlines()
        found = [l for l in lines if "assertion failed" in l] or lines[:1]
        report[case] = found[0]
report["modules"] = sorted(m for m in ("keras_bpq", "tensorflow_probability") if m in sys.modules)
with open(out, "w") as f:
    json.dump(report, f)
'''


def test_fresh_process_rejects_bad_inputs_naming_them(served, tmp_path):
    """Every signature checks its inputs' shapes, batch sizes and seeds, and a
    mask row with no allowed outcome, with messages readable without keras_bpq."""
    _, _, path, _ = served
    walk, _ = graphs.walk_task()
    walk.compile()
    walk.export(str(tmp_path / "walk"), verbose=False)
    a, b = keras.Input((2,), name="query"), keras.Input((3,), name="context")
    z = keras_bpq.Bernoulli(name="z", seed=1)(keras.layers.Dense(2)(keras.layers.Concatenate()([a, b])))
    two = keras_bpq.BackpropQModel(inputs=[a, b], outputs=z, costs={"cost": keras.ops.sum(z, axis=-1)})
    two.export(str(tmp_path / "two"), verbose=False)
    _run_child(tmp_path, BAD_CALLS, path, tmp_path / "two", tmp_path / "walk", tmp_path / "out.json")
    report = json.loads((tmp_path / "out.json").read_text())
    assert report.pop("modules") == []
    assert report.pop("good") is None
    shape = r"Signature {}: input `{}` must have shape \[{}\] \({}\); got shape \[{}\]\."
    seeds = r"Signature {}: input `seed` must hold one int64 seed per example; got {} seeds for {} rows of input `{}`\."
    expected = {
        "rank3": shape.format("serving_default", "features", "batch, 3", "float32", "2,3,1"),
        "rank1": shape.format("mode", "features", "batch, 3", "float32", "3"),
        "scalar": shape.format("seeded", "features", "batch, 3", "float32", ""),
        "width": shape.format("mode", "features", "batch, 3", "float32", "2,5"),
        "seed_scalar": shape.format("seeded", "seed", "batch", "int64", ""),
        "seed_matrix": shape.format("seeded", "seed", "batch", "int64", "2,1"),
        "one_seed_four_rows": seeds.format("seeded", 1, 4, "features"),
        "three_seeds_two_rows": seeds.format("seeded", 3, 2, "features"),
        "batch_mismatch": r"Signature serving_default: input `context` has 3 rows but input `query` has 4; "
                          r"every input must hold one row per example\.",
        "batch_mismatch_seeded": seeds.format("seeded", 2, 4, "query"),
        # Dtypes: TF's own check, before the graph runs.
        "float64_features": r"input #0\(zero-based\) was expected to be a float tensor but is a double tensor",
        "int32_seed": r"input #1\(zero-based\) was expected to be a int64 tensor but is a int32 tensor",
    }
    for case in ("empty_mask_sample", "empty_mask_mode", "empty_mask_seeded"):
        expected[case] = r"Categorical node `hop1`: row\] \[1\] \[of its mask allows no outcome"
    assert set(report) == set(expected)
    for case, pattern in expected.items():
        assert report[case] is not None and re.search(pattern, report[case]), (case, report[case])


def _hidden_leftovers(folder):
    return sorted(p.name for p in pathlib.Path(folder).iterdir() if p.name.startswith(".tmp-keras_bpq"))


def test_export_replaces_a_version_folder_whole(served, tmp_path):
    model, _, _, _ = served
    path = tmp_path / "base" / "1"
    path.mkdir(parents=True)
    (path / "stale.txt").write_text("an older export's file")
    model.export(str(path), verbose=False)
    assert sorted(p.name for p in path.iterdir()) == ["assets", "fingerprint.pb", "saved_model.pb", "variables"]
    assert _hidden_leftovers(path.parent) == []
    loaded = tf.saved_model.load(str(path))
    assert set(loaded.signatures) == {"serving_default", "mode", "seeded"}


def test_a_failed_export_leaves_what_was_there(served, tmp_path, monkeypatch):
    model, _, _, _ = served
    base = tmp_path / "base"
    kept = base / "1"
    model.export(str(kept), verbose=False)
    before = {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()}
    save = tf.saved_model.save

    def killed_halfway(module, folder, signatures=None):
        (pathlib.Path(folder) / "saved_model.pb").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(tf.saved_model, "save", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        model.export(str(kept), verbose=False)
    with pytest.raises(KeyboardInterrupt):
        model.export(str(base / "2"), verbose=False)
    monkeypatch.setattr(tf.saved_model, "save", save)
    assert {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in base.iterdir()) == ["1"]  # no version 2, nothing hidden left


def test_export_onto_a_file_is_refused_naming_it(served, tmp_path):
    model, _, _, _ = served
    path = tmp_path / "1"
    path.write_text("not a folder")
    with pytest.raises(FileExistsError, match="is not a folder"):
        model.export(str(path), verbose=False)
    assert path.read_text() == "not a folder"
    assert _hidden_leftovers(tmp_path) == []
