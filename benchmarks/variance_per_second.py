"""Gradient variance per second of training: which estimator buys the most
signal per second on an SBN, all measured at the same weights.

A model is trained with `--train_estimator` for `--train_steps` steps; then,
at those weights (every arm reads the same actor weights and the trained
critics where it has any), each estimator in `--arms` gets

* `variance`: the encoder gradient's total variance over `--num_draws` draws
  on one fixed batch (`diagnostics.estimate_gradients`), the critics frozen;
* `step`: its whole training step (fit, `steps_per_execution` 50, jit on,
  data in memory), timed in rounds that interleave the arms (best round);
* `variance x step`: the variance of the gradient averaged over one second of
  steps is `variance x step / 1 s`, so smaller is better; its ratio to
  reinforce's says how much more signal per second an arm gives;
* `mean_agreement`: its mean encoder gradient against `--reference`'s
  (`mean_agreement`): every arm is unbiased, so the means should agree
  within their standard errors on the trained net too.

    python benchmarks/variance_per_second.py --dataset=fashion_mnist --arch=two_layer

Writes `<out_dir>/variance_per_second.json` (a section per --out_tag: its
command, the machine at the start, the load at the end) and the page
`variance_per_second.md` rendered from it (`render.variance_per_second`).
"""

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from keras_bpq import diagnostics  # noqa: E402
import render  # noqa: E402

sbn = common.sbn_benchmark()  # benchmarks/sbn.py: flags, data and models

FLAGS = flags.FLAGS
flags.DEFINE_string("train_estimator", "auto", "Estimator that trains the shared weights.")
flags.DEFINE_integer("train_steps", 1000, "Training steps before the measurements.")
flags.DEFINE_list("arms", ["reinforce", "rloo", "disarm", "auto", "critic_cv_units16", "critic_cv_linear16"],
                  "Estimators measured at the trained weights.")
flags.DEFINE_integer("rounds", 3, "Timing rounds (arms interleaved; best round).")
flags.DEFINE_integer("fit_steps", 200, "Steps per timed fit.")
flags.DEFINE_string("out_tag", "", "Section name in the JSON (default <dataset>_<arch>).")
flags.DEFINE_bool("render_only", False, "Only rewrite the page from the JSON.")
flags.DEFINE_string("reference", "disarm",
                    "The arm every other arm's mean encoder gradient is compared with (all are unbiased).")


def arm_model(name, trained, pixels, train):
    """A model with `trained`'s actor weights (and critics where both have
    them) compiled with estimator `name` and SGD(0): fits time the step and
    change nothing."""
    model = sbn.build_sbn(pixels, FLAGS.arch)
    num_samples = FLAGS.rloo_k if name == "rloo" else 1
    model.compile(optimizer=keras.optimizers.SGD(0.0), estimator=sbn.estimator_option(name),
                  num_samples=num_samples, steps_per_execution=50, jit_compile=True)
    model.scg_summary(print_fn=lambda s: None)
    model.build_training_state()
    ours, theirs = model.weights, trained.weights
    if [v.shape for v in ours] != [v.shape for v in theirs]:  # no critics to share: the actor only
        ours, theirs = model.actor_variables, trained.actor_variables
    for a, b in zip(ours, theirs):
        a.assign(b)
    return model


def mean_agreement(draws, reference):
    """How far the mean of gradient `draws` (`[draws, P]`) is from the mean
    of `reference`'s, both unbiased estimates of one gradient: per coordinate
    `z = (mean - mean_ref) / sqrt(se^2 + se_ref^2)`; the share of coordinates
    with `|z| > 4` (about 6e-5 for Gaussian means), the largest `|z|`, and
    `|mean - mean_ref| / |mean_ref|`."""
    def mean_and_se2(d):
        return d.mean(axis=0), d.var(axis=0, ddof=1) / len(d)

    (mean, se2), (ref, ref_se2) = mean_and_se2(draws), mean_and_se2(reference)
    spread = np.sqrt(se2 + ref_se2)
    z = np.where(spread > 0, (mean - ref) / np.where(spread > 0, spread, 1.0), 0.0)
    return {"beyond_4_se": float(np.mean(np.abs(z) > 4)), "max_abs_z": float(np.max(np.abs(z))),
            "relative_difference": float(np.linalg.norm(mean - ref) / np.linalg.norm(ref))}


def main(argv):
    del argv
    md_path = os.path.join(FLAGS.out_dir, "variance_per_second.md")
    if FLAGS.render_only:
        with open(os.path.join(FLAGS.out_dir, "variance_per_second.json")) as f:
            render.write("variance_per_second", json.load(f), md_path)
        return
    machine = common.machine_info()  # at the start: the load before the runs
    keras.utils.set_random_seed(0)
    train, _ = common.load_data(FLAGS.dataset, 0)
    pixels = train.shape[1]
    tag = FLAGS.out_tag or f"{FLAGS.dataset}_{FLAGS.arch}"
    print(f"{tag}: load {os.getloadavg()}", flush=True)
    trained = sbn.compile_sbn(sbn.build_sbn(pixels, FLAGS.arch), FLAGS.train_estimator, True)
    start = time.perf_counter()
    trained.fit(common.binarised(train, FLAGS.batch_size, 0), epochs=1, steps_per_epoch=FLAGS.train_steps, verbose=0)
    print(f"trained {FLAGS.train_estimator} {FLAGS.train_steps} steps in {time.perf_counter() - start:.1f} s",
          flush=True)
    rng = np.random.RandomState(1)
    x = common.fixed_binarisation(train[rng.randint(len(train), size=FLAGS.batch_size)], 7)
    data = common.fixed_binarisation(train[rng.randint(len(train), size=20 * FLAGS.batch_size)], 8)
    data = data.reshape(20, FLAGS.batch_size, -1)
    arms = {name: arm_model(name, trained, pixels, train) for name in FLAGS.arms}
    # reinforce's EMA baseline warmed up at these weights (SGD(0) leaves them).
    for name, model in arms.items():
        start = time.perf_counter()
        model.fit(common.binarised(train, FLAGS.batch_size, 777), epochs=1, steps_per_epoch=50, verbose=0)
        print(f"  {name}: warm-up and compile {time.perf_counter() - start:.1f} s", flush=True)
    results, draws = {}, {}
    for name, model in arms.items():
        index = sbn.encoder_indices(model)
        grads = diagnostics.estimate_gradients(model, x, num_draws=FLAGS.num_draws, chunk_size=FLAGS.chunk)
        draws[name] = np.concatenate([grads[i].reshape(FLAGS.num_draws, -1) for i in index], axis=1)
        results[name] = {"variance": diagnostics.gradient_variance([draws[name]])}
        print(f"  {name}: variance {results[name]['variance']:.4g}", flush=True)
    if FLAGS.reference in draws:
        for name in draws:
            if name != FLAGS.reference:
                results[name]["mean_agreement"] = mean_agreement(draws[name], draws[FLAGS.reference])
                results[name]["mean_agreement"]["reference"] = FLAGS.reference
                print(f"  {name}: mean against {FLAGS.reference}'s {results[name]['mean_agreement']}", flush=True)
    best = {name: float("inf") for name in arms}
    for _ in range(FLAGS.rounds):
        for name, model in arms.items():
            best[name] = min(best[name], common.fit_seconds_per_step(model, data, FLAGS.fit_steps))
    base = results.get("reinforce")
    print(f"\n{tag} after {FLAGS.train_steps} {FLAGS.train_estimator} steps; load {os.getloadavg()}")
    print(f"  {'arm':<22} {'variance':>10} {'ms/step':>8} {'x rf step':>9} {'var/rf':>8} {'var*step/rf':>11}")
    for name in arms:
        r = results[name]
        r["step_ms"] = 1e3 * best[name]
        if base:
            r["step_ratio"] = best[name] / best["reinforce"]
            r["variance_ratio"] = r["variance"] / base["variance"]
            r["signal_per_second_ratio"] = 1.0 / (r["step_ratio"] * r["variance_ratio"])
        print(f"  {name:<22} {r['variance']:10.4g} {r['step_ms']:8.2f} {r.get('step_ratio', 0):9.2f} "
              f"{r.get('variance_ratio', 0):8.4f} {1 / r.get('signal_per_second_ratio', 1):11.5f}")
    path = os.path.join(FLAGS.out_dir, "variance_per_second.json")
    report = json.load(open(path)) if os.path.exists(path) else {}
    report[tag] = {"command": common.command_line(), "train_estimator": FLAGS.train_estimator,
                   "train_steps": FLAGS.train_steps, "num_draws": FLAGS.num_draws, "load": os.getloadavg(),
                   "arms": results, "machine": machine}
    common.write_json(path, report)
    render.write("variance_per_second", report, md_path)


if __name__ == "__main__":
    flags.FLAGS.set_default("dataset", "fashion_mnist")
    flags.FLAGS.set_default("num_draws", 200)
    app.run(main)
