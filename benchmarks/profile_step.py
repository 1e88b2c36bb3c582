"""Time per training step of the default estimator against reinforce, and where
the default's step spends it.

The model is benchmarks/sbn.py's (`--dataset`, `--arch`; defaults here:
Fashion-MNIST, two-layer, batch 50). Every timing runs `--iterations` calls in
one `tf.function` loop (or `fit` with steps_per_execution 50 for whole steps)
on fixed binarised batches, so neither Python nor tf.data is in it; each is the
best of `--repeats` rounds, and the estimators alternate within a round, so a
ratio compares times taken minutes apart at most.

The stages of every compared estimator's step (`--breakdown`, `stages`), each
timed alone and each a prefix of the next: the recorded forward pass; with
every node's estimator step and the surrogate; with the actor's gradient; and
the whole step. Their differences say what an estimator's step adds where.

    python benchmarks/profile_step.py --dataset=fashion_mnist --arch=two_layer \
        --compare=reinforce,disarm,auto

Writes `<out_dir>/step_stages.json` (a section per `--out_tag`, by default
`<dataset>_<arch>`) and `step_stages.md` (rendered by `render.step_stages`).
"""

import json

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import common  # noqa: E402
import render  # noqa: E402

sbn = common.sbn_benchmark()  # benchmarks/sbn.py: flags, data and models

FLAGS = flags.FLAGS
flags.DEFINE_list("compare", ["reinforce", "auto"], "Estimators whose whole steps are timed.")
flags.DEFINE_integer("fit_steps", 200, "Steps per timed fit (whole steps).")
flags.DEFINE_integer("iterations", 20, "Calls per timed loop (pieces).")
flags.DEFINE_integer("repeats", 3, "Timed rounds (best reported).")
flags.DEFINE_bool("breakdown", True, "Also time the cumulative stages of each compared step.")
flags.DEFINE_string("out_tag", "", "Section name in step_stages.json (default <dataset>_<arch>).")


def batches(train, count, seed):
    images = train[np.random.RandomState(seed).permutation(len(train))[: count * FLAGS.batch_size]]
    return common.fixed_binarisation(images, seed).reshape(count, FLAGS.batch_size, -1)


def loop(fn, jit):
    """`fn(x)` `--iterations` times in one compiled loop; returns seconds per call."""

    @tf.function(jit_compile=jit)
    def run(x):
        total = tf.constant(0.0)
        for _ in tf.range(FLAGS.iterations):
            total += tf.add_n([tf.reduce_sum(t) for t in tf.nest.flatten(fn(x))])
        return total

    def timed(x):
        run(x).numpy()  # trace and warm up
        return common.best_of(lambda: run(x).numpy(), FLAGS.repeats) / FLAGS.iterations

    return timed


def stages(model):
    """`{name: x -> tensors}`: the cumulative stages of one training step of
    `model`, each a prefix of the next, so their differences say where the
    step's time goes: the recorded forward pass; with every node's estimator
    step and the surrogate (`run_forward`: the heads, draws and expansions);
    with the actor's gradient. The whole step (fit) adds the critics, the
    optimizer and the metrics."""

    def forward(x):
        return model.record_forward(x).total

    def surrogate(x):
        return model.run_forward(x).surrogate

    def gradient(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model.run_forward(x).surrogate)
        return tape.gradient(loss, model.actor_variables)

    return {"forward": forward, "+ estimators' surrogates": surrogate, "+ actor gradient": gradient}


def main(argv):
    del argv
    keras.utils.set_random_seed(0)
    train, _ = common.load_data(FLAGS.dataset, 0)
    data = batches(train, 20, 0)
    pixels = train.shape[1]
    machine = common.machine_info()
    print(f"{FLAGS.dataset} {FLAGS.arch}, batch {FLAGS.batch_size}; load {machine['load_average']}")
    settings = {}
    for jit in (False, True):
        models = {e: sbn.compile_sbn(sbn.build_sbn(pixels, FLAGS.arch), e, jit) for e in FLAGS.compare}
        for model in models.values():
            common.fit_seconds_per_step(model, data, 100)
        best = {e: float("inf") for e in models}
        for _ in range(FLAGS.repeats):
            for name, model in models.items():
                best[name] = min(best[name], common.fit_seconds_per_step(model, data, FLAGS.fit_steps))
        base = best[FLAGS.compare[0]]
        print(f"\njit_compile={jit}: whole training step (fit, steps_per_execution 50)")
        for name, seconds in best.items():
            print(f"  {name:<12} {1e3 * seconds:8.2f} ms/step  {seconds / base:5.1f}x {FLAGS.compare[0]}")
        result = {"whole_ms": {name: 1e3 * seconds for name, seconds in best.items()}}
        if FLAGS.breakdown:
            x = tf.constant(data[0])
            timed = {name: {stage: 1e3 * loop(fn, jit)(x) for stage, fn in stages(model).items()}
                     for name, model in models.items()}
            result["stages_ms"] = {stage: {name: timed[name][stage] for name in models}
                                   for stage in next(iter(timed.values()))}
            print(f"  stages of the step, cumulative (ms; {FLAGS.iterations} calls per loop):")
            for stage, row in result["stages_ms"].items():
                print(f"    {stage:<28}" + "".join(f"{ms:12.2f}" for ms in row.values()))
        settings["on" if jit else "off"] = result
    tag = FLAGS.out_tag or f"{FLAGS.dataset}_{FLAGS.arch}"
    path = os.path.join(FLAGS.out_dir, "step_stages.json")
    report = json.load(open(path)) if os.path.exists(path) else {}
    report[tag] = {"command": common.command_line(), "batch_size": FLAGS.batch_size,
                   "fit_steps": FLAGS.fit_steps, "iterations": FLAGS.iterations, "repeats": FLAGS.repeats,
                   "jit_compile": settings, "machine": machine, "load_end": os.getloadavg()}
    common.write_json(path, report)
    render.write("step_stages", report, os.path.join(FLAGS.out_dir, "step_stages.md"))


if __name__ == "__main__":
    flags.FLAGS.set_default("dataset", "fashion_mnist")
    app.run(main)
