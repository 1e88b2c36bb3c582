"""Time per training step of the default estimator against reinforce, and where
each compared step spends it.

The model is benchmarks/sbn.py's (`--dataset`, `--arch`; defaults here:
Fashion-MNIST, two-layer, batch 50). Whole steps are timed by `fit`
(steps_per_execution 50) on fixed binarised batches, so neither Python nor
tf.data is in them; each is the best of `--repeats` rounds, and the
estimators alternate within a round, so a ratio compares times taken
minutes apart at most.

Where the time goes (`--breakdown`, XLA only): one more `fit` of each
compiled step runs under the TensorFlow profiler, with XLA's CPU runtime
tracing each operation it runs (`--xla_cpu_enable_xprof_traceme`) and
dumping the optimised HLO, whose op names carry the step's name scopes
(`keras_bpq.step.STAGE_SCOPES`: the recorded pass, the estimators' steps
and surrogate, the critics, the updates with the write guard, the metrics;
each stage's share of the actor's gradient apart). `stage_profile.op_profile` adds each
operation's time to its stage: CPU time summed over the threads that ran
it, measured in the step as it trains (unlike timing pieces alone, which
lets XLA drop or hoist what the piece does not need).

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

import common  # noqa: E402  (first: puts this checkout's package on the path)
import render  # noqa: E402
import stage_profile  # noqa: E402

sbn = common.sbn_benchmark()  # benchmarks/sbn.py: flags, data and models

FLAGS = flags.FLAGS
flags.DEFINE_list("compare", ["reinforce", "auto"], "Estimators whose whole steps are timed.")
flags.DEFINE_integer("fit_steps", 200, "Steps per timed fit (whole steps).")
flags.DEFINE_integer("repeats", 3, "Timed rounds (best reported).")
flags.DEFINE_bool("breakdown", True, "Also profile each compared XLA step's operations by stage.")
flags.DEFINE_string("out_tag", "", "Section name in step_stages.json (default <dataset>_<arch>).")


def batches(train, count, seed):
    images = train[np.random.RandomState(seed).permutation(len(train))[: count * FLAGS.batch_size]]
    return common.fixed_binarisation(images, seed).reshape(count, FLAGS.batch_size, -1)


def main(argv):
    del argv
    if not FLAGS.breakdown:
        return run(None)
    with stage_profile.profiled_xla() as dump_dir:  # read when XLA first compiles, below
        run(dump_dir)


def run(dump_dir):
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
        if FLAGS.breakdown and jit:
            instructions = stage_profile.hlo_instructions(dump_dir)  # every model's step compiled by the timings above
            profiles = {
                name: stage_profile.op_profile(
                    lambda model=model: common.fit_seconds_per_step(model, data, FLAGS.fit_steps),
                    FLAGS.fit_steps, instructions)
                for name, model in models.items()
            }
            order = stage_profile.stages()
            result["op_ms"] = {stage: {name: profiles[name].get(stage, 0.0) for name in models}
                               for stage in order if any(stage in p for p in profiles.values())}
            print("  CPU ms per step of the step's XLA operations by stage (all threads):")
            for stage, row in result["op_ms"].items():
                print(f"    {stage:<24}" + "".join(f"{ms:12.2f}" for ms in row.values()))
        settings["on" if jit else "off"] = result
    tag = FLAGS.out_tag or f"{FLAGS.dataset}_{FLAGS.arch}"
    path = os.path.join(FLAGS.out_dir, "step_stages.json")
    report = json.load(open(path)) if os.path.exists(path) else {}
    report[tag] = {"command": common.command_line(), "batch_size": FLAGS.batch_size,
                   "fit_steps": FLAGS.fit_steps, "repeats": FLAGS.repeats,
                   "jit_compile": settings, "machine": machine, "load_end": os.getloadavg()}
    common.write_json(path, report)
    render.write("step_stages", report, os.path.join(FLAGS.out_dir, "step_stages.md"))


if __name__ == "__main__":
    flags.FLAGS.set_default("dataset", "fashion_mnist")
    app.run(main)
