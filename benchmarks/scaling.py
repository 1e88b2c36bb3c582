"""Training throughput of the SBN of examples/sbn.py: devices and steps per call.

Steps/s of `fit` on the two-layer SBN (64 -> 32 -> 16 Bernoulli units, digits,
global batch 50) for every combination of

* setup: one device without a strategy (`plain`), `MirroredStrategy` on one
  CPU device (`mirrored1`), and on two logical CPU devices (`mirrored2`,
  25 examples per replica);
* `steps_per_execution` (1, 10, 50);
* estimator (`auto` = `critic_cv` with learned critics, and `reinforce`).

Each combination runs in a fresh process (logical devices must be configured
before TensorFlow starts): a warm-up fit (tracing), then `--repeats` timed fits
of `--timed_steps` steps; the median is reported, with the process CPU time per step.

    python benchmarks/scaling.py   # writes benchmarks/results/scaling.{json,md}
    python benchmarks/scaling.py --timed_steps=100 --repeats=1 --out_dir=/tmp/scaling
"""

import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import common  # noqa: E402
import numpy as np  # noqa: E402
import render  # noqa: E402

_ROOT = common.ROOT
# examples/sbn.py's pieces (it imports TensorFlow; no device is set up yet).
binarised = common.example("sbn").binarised
build_sbn = common.example("sbn").build_sbn
load_digits = common.example("sbn").load_digits

FLAGS = flags.FLAGS
flags.DEFINE_list("setups", ["plain", "mirrored1", "mirrored2"], "Device setups to time.")
flags.DEFINE_list("spe", ["1", "10", "50"], "steps_per_execution values to time.")
flags.DEFINE_list("estimators", ["auto", "reinforce"], "Estimators to time.")
flags.DEFINE_integer("timed_steps", 300, "Steps per timed fit (a multiple of every --spe).")
flags.DEFINE_integer("repeats", 3, "Timed fits per combination (the median is reported).")
flags.DEFINE_integer("global_batch", 50, "Global batch size.")
flags.DEFINE_string("out_dir", os.path.join(_ROOT, "benchmarks", "results"), "Where to write scaling.{json,md}.")
flags.DEFINE_string("child", "", "Internal: time one combination given as JSON and print the result.")


def time_one(setup, spe, estimator, timed_steps, repeats, global_batch):
    """Runs in a fresh process: the steps/s of one combination."""
    import tensorflow as tf

    if setup == "mirrored2":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    keras.utils.set_random_seed(0)
    train, _ = load_digits(0)
    strategy = {
        "plain": tf.distribute.get_strategy,
        "mirrored1": lambda: tf.distribute.MirroredStrategy(["/cpu:0"]),
        "mirrored2": lambda: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
    }[setup]()
    with strategy.scope():
        model = build_sbn(train.shape[1], 32, 16)
        model.compile(optimizer=keras.optimizers.Adam(3e-3), estimator=estimator, steps_per_execution=spe)
    data = binarised(train, global_batch, 0, repeat=True)
    warmup = common.seconds_of(lambda: model.fit(data, epochs=1, steps_per_epoch=2 * spe, shuffle=False, verbose=0))
    rates, cpu_ms, loads = [], [], []
    for _ in range(repeats):
        load = common.load_average()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        history = model.fit(data, epochs=1, steps_per_epoch=timed_steps, shuffle=False, verbose=0)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rates.append(timed_steps / wall)
        cpu_ms.append(1000 * cpu / timed_steps)
        loads.append([load, common.load_average()[0]])
    return {
        "setup": setup,
        "steps_per_execution": spe,
        "estimator": estimator,
        "replicas": strategy.num_replicas_in_sync,
        "steps_per_s": float(np.median(rates)),
        "steps_per_s_runs": rates,
        "cpu_ms_per_step": float(np.median(cpu_ms)),
        "warmup_s": warmup,
        "load_average_1min_before_after": loads,
        "final_loss": float(history.history["loss"][-1]),
        "steps_trained": int(model.training_state.steps.numpy()),
    }


SETUP_NAMES = {
    "plain": "1 CPU device, no strategy",
    "mirrored1": "MirroredStrategy, 1 CPU device",
    "mirrored2": "MirroredStrategy, 2 logical CPU devices",
}


def reading(results, cores):
    """Ratios worth stating, computed from the numbers."""
    by = {(r["estimator"], r["setup"], r["steps_per_execution"]): r["steps_per_s"] for r in results}
    lines = []
    for estimator in sorted({r["estimator"] for r in results}):
        for setup in ("plain", "mirrored1", "mirrored2"):
            spes = sorted(s for e, su, s in by if e == estimator and su == setup)
            if len(spes) > 1 and spes[0] == 1:
                gains = ", ".join(
                    f"{by[(estimator, setup, s)] / by[(estimator, setup, 1)]:.2f}x at {s}" for s in spes[1:]
                )
                lines.append(f"{estimator}, {SETUP_NAMES[setup]}: steps_per_execution speed-up over 1: {gains}.")
        for spe in sorted({s for e, _, s in by if e == estimator}):
            if (estimator, "plain", spe) in by and (estimator, "mirrored2", spe) in by:
                ratio = by[(estimator, "mirrored2", spe)] / by[(estimator, "plain", spe)]
                lines.append(
                    f"{estimator}, steps_per_execution {spe}: 2 logical CPU devices run at "
                    f"{ratio:.2f}x the steps/s of one device without a strategy."
                )
    lines.append(
        f"Two logical devices on one machine share its cores (here {cores}, also used by other "
        "jobs), so MirroredStrategy only adds the cost of splitting the batch and "
        "all-reducing every gradient; it pays with several GPUs or machines, not here."
    )
    return lines


def main(argv):
    del argv
    if FLAGS.child:
        spec = json.loads(FLAGS.child)
        print("RESULT " + json.dumps(time_one(**spec)), flush=True)
        return
    start_all = time.perf_counter()
    machine = common.machine_info()  # at the start: the load before the runs
    results = []
    for estimator in FLAGS.estimators:
        for setup in FLAGS.setups:
            for spe in (int(s) for s in FLAGS.spe):
                if FLAGS.timed_steps % spe:
                    raise ValueError(f"--timed_steps={FLAGS.timed_steps} is not a multiple of {spe}.")
                spec = dict(
                    setup=setup, spe=spe, estimator=estimator, timed_steps=FLAGS.timed_steps,
                    repeats=FLAGS.repeats, global_batch=FLAGS.global_batch,
                )
                proc = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--child=" + json.dumps(spec)],
                    capture_output=True, text=True, timeout=1800,
                )
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode or not lines:
                    raise RuntimeError(f"{spec} failed:\n{proc.stderr[-3000:]}")
                result = json.loads(lines[-1][len("RESULT "):])
                print(
                    f"{estimator:9s} {setup:9s} spe={spe:3d}: {result['steps_per_s']:7.1f} steps/s "
                    f"({result['cpu_ms_per_step']:.2f} CPU ms/step, warm-up {result['warmup_s']:.1f}s, "
                    f"load {result['load_average_1min_before_after']})",
                    flush=True,
                )
                results.append(result)
    loads = [v for r in results for pair in r["load_average_1min_before_after"] for v in pair]
    report = {
        "title": "Training throughput: devices and steps per call",
        "command": common.command_line(),
        "machine": machine,
        "config": {
            "timed_steps": FLAGS.timed_steps,
            "repeats": FLAGS.repeats,
            "global_batch": FLAGS.global_batch,
            "z1": 32,
            "z2": 16,
            "learning_rate": 3e-3,
            "setups": SETUP_NAMES,
        },
        "results": results,
        "load_range": [min(loads), max(loads)],
        "reading": reading(results, machine["cores"]),
        "runtime_s": time.perf_counter() - start_all,
    }
    common.write_json(os.path.join(FLAGS.out_dir, "scaling.json"), report, indent=2)
    render.write("scaling", report, os.path.join(FLAGS.out_dir, "scaling.md"))
    print("\n".join(report["reading"]))
    print(f"wrote {FLAGS.out_dir}/scaling.{{json,md}} in {report['runtime_s']:.0f}s")


if __name__ == "__main__":
    app.run(main)
