"""Sigmoid belief nets: keras_bpq estimators side by side with Pyro and Storchastic.

Models (as in the discrete gradient-estimator literature, 200 units per layer):

* `linear`:    x -> z1[200] Bernoulli (one linear map), learned prior p(z1).
* `two_layer`: x -> z1[200] -> z2[200], linear maps both ways, learned prior p(z2).
* `nonlinear`: x -> 200 tanh -> 200 tanh -> z1[200], decoder mirrored, learned prior.

Costs follow `examples/sbn.py`: `recon = -log p(x | z1)` and per layer
`kl<i> = log q(z<i> | .) - log p(z<i> | .)`, so the total is the negative ELBO.

Data: scikit-learn digits (64 pixels, 1500 train / 297 test) or Fashion-MNIST
(784 pixels, the Debian package `dataset-fashion-mnist`), dynamically
binarised (a fresh Bernoulli draw of every training image at every use). The
test NELBO is measured every --eval_every steps on one FIXED binarisation of a
--test_size subset (one latent draw per image), the same array for every
library; the train NELBO on a fixed binarised subset of training images.

Per keras_bpq estimator and seed:
  * learning curve (test/train NELBO against steps and training wall-clock),
    trained with `fit` in chunks of --eval_every steps (steps_per_execution 50,
    jit_compile off unless --curve_jit; the timing table says which mode is
    faster) on the
    dynamically binarising tf.data pipeline, autotuning off (see
    `without_autotuning`); the wall-clock includes the pipeline;
  * encoder gradient variance at --variance_checkpoints (sum over encoder
    entries of the per-entry variance of --num_draws draws of
    `keras_bpq.diagnostics.estimate_gradients` on one fixed binarised batch of
    --batch_size training images), at the estimator's own weights, and for the
    default estimator also of `reinforce` at the SAME weights (a reinforce copy
    whose EMA baselines are warmed up by `fit` with SGD(0.0) on 50 batches);
  * steps/s of the training step with jit_compile on and off: fresh models, a
    warm-up fit, then --timing_repeats timed fits of --timing_steps steps (best
    reported) on batches binarised once and held in memory (`timing_data`: no
    input pipeline in the figure), next to a plain deterministic Keras
    autoencoder of the same layer sizes (sigmoid units instead of Bernoulli
    samples, BCE loss) timed the same way.

With --peers, the peer scripts in benchmarks/peers/ run as subprocesses on the
same data file, architecture, batch, Adam learning rate, step budget and
evaluation schedule.

    python benchmarks/sbn.py --dataset=fashion_mnist --arch=two_layer --steps=2000 \
        --estimators=reinforce,auto --peers=pyro_decaying,pyro_neural,storch_sf

Results are merged into --out_dir/sbn.json (one entry per dataset/arch: a rerun
replaces its section whole, reading notes kept) and --out_dir/sbn.md is
rendered from it (`render.sbn`), with PNG curves sbn_<dataset>_<arch>.png (all redrawn from the JSON
on every write by `render.sbn_plot`: -ELBO against steps and time, one colour per method, seeds thin,
their median bold; encoder gradient variance per checkpoint). An entry's
"title" overrides its heading (an older section kept under another tag); the
"_appendix" string of sbn.json (hand-written text) ends the page.
`--merge_from=other/sbn.json` merges runs written with another --out_dir.
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import common  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import render  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_bpq  # noqa: E402
from keras_bpq import diagnostics  # noqa: E402
from keras_bpq import estimators  # noqa: E402

_ROOT = common.ROOT
# examples/sbn.py's pieces (this script runs as __main__, so the name `sbn` is the example's).
PriorLogits = common.example("sbn").PriorLogits
bernoulli_log_prob = common.example("sbn").bernoulli_log_prob
H = 200

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "digits", ["digits", "fashion_mnist"], "Data set.")
flags.DEFINE_enum("arch", "two_layer", ["linear", "two_layer", "nonlinear"], "SBN architecture.")
flags.DEFINE_list(
    "estimators", ["reinforce", "auto"],
    "keras_bpq estimators ('rloo' uses num_samples=--rloo_k; 'relax_tuned' is Relax(tune=True)).")
flags.DEFINE_integer("rloo_k", 2, "Draws per example for rloo.")
flags.DEFINE_integer("steps", 2000, "Training steps.")
flags.DEFINE_integer("batch_size", 50, "Batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate (every library).")
flags.DEFINE_list("seeds", ["0"], "Seeds.")
flags.DEFINE_list("first_seed_only", [], "Estimators and peers run on the first seed only (slow ones).")
flags.DEFINE_integer("eval_every", 250, "Steps between evaluations.")
flags.DEFINE_integer("test_size", 1000, "Test images in the fixed evaluation subset.")
flags.DEFINE_enum("jit_compile", "both", ["both", "on", "off"], "jit_compile settings timed.")
flags.DEFINE_integer("timing_steps", 500, "Steps per timed fit.")
flags.DEFINE_integer("timing_repeats", 2, "Timed fits per setting (best reported).")
flags.DEFINE_list("variance_checkpoints", ["0", "end"], "Steps at which gradient variance is measured.")
flags.DEFINE_integer("num_draws", 100, "Gradient draws per variance measurement.")
flags.DEFINE_integer("chunk", 25, "Draws per estimate_gradients pass.")
flags.DEFINE_list("peers", [], "Peers to run: pyro_decaying, pyro_neural, storch_sf, storch_relax, storch_disarm.")
flags.DEFINE_integer("peer_steps", 0, "Steps for the peers (0: --steps).")
flags.DEFINE_list("peer_steps_override", [], "name=steps pairs for very slow peers (e.g. storch_relax=200).")
flags.DEFINE_list(
    "estimator_steps_override", [],
    "estimator=steps pairs: train these keras_bpq estimators longer or shorter than --steps "
    "(e.g. rloo=4000, to compare at equal wall-clock).")
flags.DEFINE_string("tag", "", "Section tag in sbn.json (default <dataset>_<arch>): another tag adds a section.")
flags.DEFINE_string("title", "", "Heading of the section (default '<dataset>, <arch>').")
flags.DEFINE_bool("curve_jit", False, "Train the learning-curve runs with jit_compile=True.")
flags.DEFINE_bool("skip_timing", False, "Skip the steps/s table.")
flags.DEFINE_bool("skip_variance", False, "Skip the gradient variance.")
flags.DEFINE_string("out_dir", os.path.join(_ROOT, "benchmarks", "results"), "Output directory.")
flags.DEFINE_list(
    "merge_from", [],
    "Run nothing: merge the sections of these sbn.json files (runs written with another --out_dir) "
    "into --out_dir/sbn.json and rewrite sbn.md and the PNGs.")

PEERS = {
    "pyro_decaying": ("pyro_sbn.py", ["--baseline=decaying"]),
    "pyro_neural": ("pyro_sbn.py", ["--baseline=neural"]),
    "storch_sf": ("storchastic_sbn.py", ["--method=sf"]),
    "storch_relax": ("storchastic_sbn.py", ["--method=relax"]),
    "storch_disarm": ("storchastic_sbn.py", ["--method=disarm"]),
}


def log(message):
    print(message, flush=True)


# ----------------------------------------------------------------------------- models
def _encoder(x, arch):
    if arch == "nonlinear":
        h = keras.layers.Dense(H, activation="tanh", name="q_h1")(x)
        h = keras.layers.Dense(H, activation="tanh", name="q_h2")(h)
        return keras.layers.Dense(H, name="q_z1")(h)
    return keras.layers.Dense(H, name="q_z1")(x)


def _decoder(z1, arch, pixels):
    if arch == "nonlinear":
        h = keras.layers.Dense(H, activation="tanh", name="p_h1")(z1)
        h = keras.layers.Dense(H, activation="tanh", name="p_h2")(h)
        return keras.layers.Dense(pixels, name="p_x")(h)
    return keras.layers.Dense(pixels, name="p_x")(z1)


def build_sbn(pixels, arch):
    x = keras.Input((pixels,), name="x")
    q1 = _encoder(x, arch)
    z1 = keras_bpq.Bernoulli(name="z1")(q1)
    px = _decoder(z1, arch, pixels)
    costs = {"recon": -bernoulli_log_prob(x, px)}
    if arch == "two_layer":
        q2 = keras.layers.Dense(H, name="q_z2")(z1)
        z2 = keras_bpq.Bernoulli(name="z2")(q2)
        p2 = PriorLogits(H, name="p_z2")(x)
        p1 = keras.layers.Dense(H, name="p_z1")(z2)
        costs["kl1"] = bernoulli_log_prob(z1, q1) - bernoulli_log_prob(z1, p1)
        costs["kl2"] = bernoulli_log_prob(z2, q2) - bernoulli_log_prob(z2, p2)
    else:
        p1 = PriorLogits(H, name="p_z1")(x)
        costs["kl1"] = bernoulli_log_prob(z1, q1) - bernoulli_log_prob(z1, p1)
    return keras_bpq.BackpropQModel(inputs=x, outputs=px, costs=costs, name="sbn")


def build_autoencoder(pixels, arch):
    """The same layer sizes, deterministic: sigmoid units where the SBN samples."""
    x = keras.Input((pixels,), name="x")
    h = keras.layers.Activation("sigmoid")(_encoder(x, arch))
    if arch == "two_layer":
        h2 = keras.layers.Activation("sigmoid")(keras.layers.Dense(H, name="q_z2")(h))
        keras.layers.Dense(H, name="p_z1")(h2)  # same parameter count; unused output
    px = _decoder(h, arch, pixels)
    return keras.Model(x, px, name="autoencoder")


def estimator_option(name):
    """`compile(estimator=...)` for a benchmark estimator name: a registered
    name, `relax_tuned` (RELAX with its control variate trained to minimise
    the gradient variance), `critic_cv_units<S>` (critic_cv summing the
    flips of S random units per example, `estimators.CriticCV(units=S)`) or
    `critic_cv_linear<S>` (every unit's flip to first order, corrected by S
    exact ones, `estimators.CriticCV(units=S, linearize=True)`) or
    `critic_cv_islinear<S>` (the same with the S units drawn in proportion to
    p_u (1 - p_u) times the expanded flip's size, `unit_sampling="importance"`).
    A `critic_cv` name ending in `_nodev` leaves out the later nodes'
    deviations (`successor_deviations=False`); one ending in `_noise` serves
    the costs past later Bernoulli nodes with common-noise heads
    (`common_noise=True`)."""
    if name == "relax_tuned":
        return estimators.Relax(tune=True)
    options = {}
    for suffix, option in (("_noise", {"common_noise": True}), ("_nodev", {"successor_deviations": False})):
        if name.startswith("critic_cv") and name.endswith(suffix):
            name = name[: -len(suffix)]
            options.update(option)
    if name.startswith("critic_cv_units"):
        return estimators.CriticCV(units=int(name[len("critic_cv_units"):]), **options)
    if name.startswith("critic_cv_islinear"):
        return estimators.CriticCV(units=int(name[len("critic_cv_islinear"):]), linearize=True,
                                   unit_sampling="importance", **options)
    if name.startswith("critic_cv_linear"):
        return estimators.CriticCV(units=int(name[len("critic_cv_linear"):]), linearize=True, **options)
    if name == "critic_cv" and options:
        return estimators.CriticCV(**options)
    return name


def compile_sbn(model, estimator, jit, replay=None):
    """`model` compiled with Adam and `estimator` (a name, `estimator_option`),
    steps_per_execution 50, and `replay` (a `keras_bpq.Replay` or None)."""
    num_samples = FLAGS.rloo_k if estimator == "rloo" else 1
    model.compile(
        optimizer=keras.optimizers.Adam(FLAGS.learning_rate),
        estimator=estimator_option(estimator),
        num_samples=num_samples,
        steps_per_execution=50,
        jit_compile=jit,
        replay=replay,
    )
    model.scg_summary(print_fn=lambda s: None)
    return model


def encoder_indices(model):
    return [i for i, v in enumerate(model.actor_variables) if v.path.split("/")[0].startswith("q_")]


# A latent unit is active when its posterior mean varies over the data by
# more than this (Burda, Grosse and Salakhutdinov 2016, `Cov_x E[z | x]`).
ACTIVE_UNIT_VARIANCE = 0.01


def active_units(model, x):
    """`{node: count}`: each stochastic node's units whose posterior mean
    `E[z_u | x]` has a variance over the rows of `x` above `ACTIVE_UNIT_VARIANCE`
    (the others ignore the input: collapsed to one value for every image)."""
    records = model.record_forward(tf.constant(x, tf.float32)).records
    counts = {}
    for name, record in records.items():
        mean = record.layer.distribution(record.params, record.mask).mean().numpy()
        counts[name] = int(np.sum(np.var(mean.reshape(len(mean), -1), axis=0) > ACTIVE_UNIT_VARIANCE))
    return counts


def encoder_variance(model, x):
    index = encoder_indices(model)
    start = time.perf_counter()
    grads = diagnostics.estimate_gradients(model, x, num_draws=FLAGS.num_draws, chunk_size=FLAGS.chunk)
    seconds = time.perf_counter() - start
    draws = [grads[i].reshape(FLAGS.num_draws, -1) for i in index]
    return diagnostics.gradient_variance(draws), seconds


def reinforce_copy(model, train, seed):
    rf = compile_sbn(build_sbn(train.shape[1], FLAGS.arch), "reinforce", False)
    rf.compile(optimizer=keras.optimizers.SGD(0.0), estimator="reinforce", steps_per_execution=50)
    rf.scg_summary(print_fn=lambda s: None)
    for a, b in zip(rf.actor_variables, model.actor_variables):
        a.assign(b)
    before = [v.numpy().copy() for v in rf.actor_variables]
    rf.fit(common.binarised(train, FLAGS.batch_size, seed + 777), epochs=1, steps_per_epoch=50, verbose=0)
    if any(not np.array_equal(b, v.numpy()) for b, v in zip(before, rf.actor_variables)):
        raise RuntimeError("SGD(0.0) warm-up changed the weights")
    return rf


# ----------------------------------------------------------------------------- runs
def _steps_for(name, default, overrides):
    """`default`, or the steps given for `name` in `overrides` ("name=steps" items)."""
    for item in overrides:
        key, value = item.split("=")
        if key == name:
            return int(value)
    return default


def run_keras(estimator, seed, train, data, checkpoints):
    keras.utils.set_random_seed(seed)
    model = compile_sbn(build_sbn(train.shape[1], FLAGS.arch), estimator, FLAGS.curve_jit)
    test, train_eval, xvar = data["test"], data["train_eval"], data["var_batch"]

    def evaluate(step, seconds):
        row = {"step": step, "train_seconds": seconds}
        for key, images in (("test_nelbo", test), ("train_nelbo", train_eval)):
            row[key] = float(model.evaluate(images, batch_size=len(images), verbose=0, return_dict=True)["loss"])
        if not FLAGS.skip_variance and step in checkpoints:
            v, s = encoder_variance(model, xvar)
            row["encoder_variance"], row["variance_seconds"] = v, s
            if estimator == "auto":
                rf = reinforce_copy(model, train, seed * 100 + step)
                row["reinforce_same_weights_variance"], _ = encoder_variance(rf, xvar)
        curve.append(row)
        log(f"  [{estimator} seed {seed}] " + json.dumps(row))

    steps = _steps_for(estimator, FLAGS.steps, FLAGS.estimator_steps_override)
    curve, seconds, step, chunk_index = [], 0.0, 0, 0
    evaluate(0, 0.0)
    while step < steps:
        n = min(FLAGS.eval_every, steps - step)
        ds = common.binarised(train, FLAGS.batch_size, seed * 100_000 + chunk_index)
        start = time.perf_counter()
        model.fit(ds, epochs=1, steps_per_epoch=n, verbose=0)
        seconds += time.perf_counter() - start
        step += n
        chunk_index += 1
        evaluate(step, seconds)
    return {"curve": curve, "train_seconds": seconds, "steps_per_s": steps / seconds}


TIMING_BATCHES = 100


def timing_data(train, autoencoder):
    """TIMING_BATCHES batches of training images binarised once, held in memory
    and repeated (no shuffle, no map, tf.data autotuning off): the timed fits
    measure the training step and Keras's loop around it, not the input
    pipeline. `(x, x)` pairs for the autoencoder."""
    rng = np.random.RandomState(12345)
    x = common.fixed_binarisation(train[rng.randint(len(train), size=TIMING_BATCHES * FLAGS.batch_size)], 12345)
    ds = tf.data.Dataset.from_tensor_slices((x, x) if autoencoder else x)
    return common.without_autotuning(ds.batch(FLAGS.batch_size, drop_remainder=True).repeat())


def time_fits(make, train):
    """Best steps/s of --timing_repeats fits of --timing_steps after a warm-up
    fit of 100 steps, on `timing_data`."""
    model = make()
    fit_ds = timing_data(train, autoencoder=not isinstance(model, keras_bpq.BackpropQModel))
    model.fit(fit_ds, epochs=1, steps_per_epoch=100, verbose=0)
    seconds = common.round_seconds(
        lambda: model.fit(fit_ds, epochs=1, steps_per_epoch=FLAGS.timing_steps, verbose=0), FLAGS.timing_repeats
    )
    rates = [FLAGS.timing_steps / s for s in seconds]
    return {"best_steps_per_s": max(rates), "all_steps_per_s": rates}


def timing(train):
    settings = {"both": [False, True], "on": [True], "off": [False]}[FLAGS.jit_compile]
    pixels = train.shape[1]
    out = {}
    for jit in settings:
        key = "jit_on" if jit else "jit_off"
        out[key] = {}
        for estimator in FLAGS.estimators:
            def make(estimator=estimator):
                return compile_sbn(build_sbn(pixels, FLAGS.arch), estimator, jit)

            try:
                out[key][estimator] = time_fits(make, train)
            except Exception as error:  # noqa: BLE001  recorded, not hidden
                out[key][estimator] = {"error": f"{type(error).__name__}: {error}"}
            log(f"  timing {key} {estimator}: {out[key][estimator]}")

        def make_ae():
            m = build_autoencoder(pixels, FLAGS.arch)
            m.compile(
                optimizer=keras.optimizers.Adam(FLAGS.learning_rate),
                loss=lambda x, logits: keras.ops.sum(keras.ops.softplus(logits) - x * logits, axis=-1),
                steps_per_execution=50,
                jit_compile=jit,
            )
            return m

        out[key]["autoencoder"] = time_fits(make_ae, train)
        log(f"  timing {key} autoencoder: {out[key]['autoencoder']}")
    return out


def run_peer(name, seed, data_path):
    script, extra = PEERS[name]
    steps = _steps_for(name, FLAGS.peer_steps or FLAGS.steps, FLAGS.peer_steps_override)
    cmd = [
        sys.executable, os.path.join(_ROOT, "benchmarks", "peers", script), f"--data={data_path}",
        f"--arch={FLAGS.arch}", f"--steps={steps}", f"--eval_every={FLAGS.eval_every}",
        f"--batch_size={FLAGS.batch_size}", f"--learning_rate={FLAGS.learning_rate}", f"--seed={seed}",
    ] + extra
    log(f"  peer: {' '.join(shlex.quote(c) for c in cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-3000:]}", "command": cmd}
    result = json.loads(lines[-1])
    result["command"] = " ".join(shlex.quote(os.path.relpath(c, _ROOT) if c.startswith(_ROOT) else c)
                                 for c in cmd[1:])
    return result


# ----------------------------------------------------------------------------- report
def summarise(entry):
    """Per method: medians over seeds of the final test/train NELBO and steps/s."""
    rows = {}
    for name, runs in entry["methods"].items():
        ok = [r for r in runs if "curve" in r]
        if not ok:
            rows[name] = {"error": runs[0].get("error", "?")[:500]}
            continue
        last = [r["curve"][-1] for r in ok]
        rows[name] = {
            "steps": last[0]["step"],
            "test_nelbo": common.median([c["test_nelbo"] for c in last]),
            "train_nelbo": common.median([c["train_nelbo"] for c in last]),
            "best_test_nelbo": common.median([min(c["test_nelbo"] for c in r["curve"]) for r in ok]),
            "steps_per_s": common.median([r["steps_per_s"] for r in ok]),
            "seeds": len(ok),
        }
    return rows


def write_report(report):
    """sbn.json, then sbn.md and every section's PNG (its `plot`: `sbn_<tag>.png`
    unless the entry names another), rendered from the JSON (`render.write`)."""
    for tag, entry in render.sections(report).items():
        entry["plot"] = entry.get("plot") or f"sbn_{tag}.png"
    common.write_json(os.path.join(FLAGS.out_dir, "sbn.json"), report)
    render.write("sbn", report, os.path.join(FLAGS.out_dir, "sbn.md"))


def load_report():
    json_path = os.path.join(FLAGS.out_dir, "sbn.json")
    if not os.path.exists(json_path):
        return {}
    with open(json_path) as f:
        return json.load(f)


def merge(paths):
    """--merge_from: each section of each file replaces the section of the same
    tag (its reading notes kept when the new one has none)."""
    report = load_report()
    for path in paths:
        with open(path) as f:
            other = json.load(f)
        for tag, entry in other.items():
            if tag.startswith("_"):
                continue
            if not entry.get("notes") and report.get(tag, {}).get("notes"):
                entry["notes"] = report[tag]["notes"]
            report[tag] = entry
            log(f"merged {tag} from {path}")
    write_report(report)


def main(argv):
    del argv
    if FLAGS.merge_from:
        merge(FLAGS.merge_from)
        return
    start_all = time.perf_counter()
    machine = common.machine_info()
    seeds = [int(s) for s in FLAGS.seeds]
    checkpoints = {FLAGS.steps if c == "end" else int(c) for c in FLAGS.variance_checkpoints}
    tag = FLAGS.tag or f"{FLAGS.dataset}_{FLAGS.arch}"
    methods = {}
    tmp = tempfile.mkdtemp(prefix="sbn_bench_")
    timing_result = None
    for seed in seeds:
        train, test = common.load_data(FLAGS.dataset, seed)
        data = {
            "train": train,
            "test": common.fixed_binarisation(test[: FLAGS.test_size], seed + 1),
            "train_eval": common.fixed_binarisation(train[: FLAGS.test_size], seed + 2),
            "var_batch": common.fixed_binarisation(train[: FLAGS.batch_size], seed + 3),
        }
        data_path = os.path.join(tmp, f"data_{seed}.npz")
        np.savez(data_path, **data)
        first = seed == seeds[0]
        for estimator in FLAGS.estimators:
            if not first and estimator in FLAGS.first_seed_only:
                continue
            name = {"auto": "keras_bpq auto (critic_cv)", "rloo": f"keras_bpq rloo K={FLAGS.rloo_k}"}.get(
                estimator, f"keras_bpq {estimator}")
            log(f"{name}, seed {seed}")
            result = run_keras(estimator, seed, train, data, checkpoints)
            result["seed"] = seed
            methods.setdefault(name, []).append(result)
        for peer in FLAGS.peers:
            if not first and peer in FLAGS.first_seed_only:
                continue
            log(f"{peer}, seed {seed}")
            result = run_peer(peer, seed, data_path)
            result.setdefault("seed", seed)
            log(f"  -> {json.dumps({k: v for k, v in result.items() if k != 'curve'})[:600]}")
            methods.setdefault(peer, []).append(result)
        if timing_result is None and not FLAGS.skip_timing:
            log("timing")
            timing_result = timing(train)
    entry = {
        "dataset": FLAGS.dataset, "arch": FLAGS.arch, "command": common.command_line(), "machine": machine,
        "config": {
            "steps": FLAGS.steps, "batch_size": FLAGS.batch_size, "learning_rate": FLAGS.learning_rate,
            "seeds": seeds, "eval_every": FLAGS.eval_every, "test_size": FLAGS.test_size,
            "num_draws": FLAGS.num_draws, "variance_checkpoints": sorted(checkpoints),
            "timing_steps": FLAGS.timing_steps, "timing_repeats": FLAGS.timing_repeats,
            "estimators": FLAGS.estimators, "peers": FLAGS.peers, "rloo_k": FLAGS.rloo_k,
            "first_seed_only": FLAGS.first_seed_only,
            "estimator_steps_override": FLAGS.estimator_steps_override,
            "curve_jit_compile": FLAGS.curve_jit,
            "timing_data": "in_memory", "timing_batches": TIMING_BATCHES, "tf_data_autotune": False,
        },
        "methods": methods,
        "timing": timing_result,
        "runtime_s": time.perf_counter() - start_all,
    }
    if FLAGS.title:
        entry["title"] = FLAGS.title
    entry["summary"] = summarise(entry)
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    report = load_report()  # other sections and the "_appendix" are kept
    if tag in report and report[tag].get("notes"):
        entry["notes"] = report[tag]["notes"]
    report[tag] = entry
    write_report(report)
    log(json.dumps(entry["summary"], indent=1))
    log(f"wrote {FLAGS.out_dir}/sbn.json and sbn.md in {entry['runtime_s']:.0f}s")


if __name__ == "__main__":
    app.run(main)
