"""Test objective at equal training wall-clock, XLA compile time counted.

Every arm (an estimator) trains its own copy of one SBN from the same seed;
the arms train in turns of `--chunk_steps` steps (round robin, so machine load
falls on every arm alike) until each has trained for the largest budget.
An arm's clock counts only its own `fit` calls, its first XLA compile
included; the compile is also reported alone (its first chunk's time less the
chunk at its steady per-step time). After every turn each arm's test
objective (-ELBO, one sample per image, the fixed test subset) is recorded,
with the mean -ELBO of the turn's training batches (`train_nelbo`, at the
weights as they trained: whether a lead at equal steps is lost in training
or only on the test set) and each node's active units on the test subset
(`sbn.active_units`: the units whose posterior mean varies with the image);
an arm's value at a budget is its last one at or before that budget.

    python benchmarks/equal_time.py --dataset=fashion_mnist --arch=two_layer \
        --arms=auto,rloo,disarm,reinforce --budgets=60,180,600 --seeds=0,1,2

An arm `<estimator>+replay_<correction>` trains with
`compile(replay=keras_bpq.Replay(--replay_capacity, --replay_updates, correction))`
(issue 19: the default with replay on and off at equal wall-clock).

Writes `<out_dir>/equal_time.json` (a section per `--out_tag`, by default
`<dataset>_<arch>`) and
`equal_time.md` (rendered from the JSON by `render.equal_time`).
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402

import common  # noqa: E402
import equal_time_sections  # noqa: E402
import keras_bpq  # noqa: E402
import render  # noqa: E402

sbn = common.sbn_benchmark()  # benchmarks/sbn.py: flags, data and models

FLAGS = flags.FLAGS
flags.DEFINE_list("arms", ["auto", "rloo", "disarm", "reinforce"], "Estimators compared.")
flags.DEFINE_list("budgets", ["60", "180", "600"], "Training budgets in seconds (compile included).")
flags.DEFINE_integer("chunk_steps", 250, "Steps per turn.")
flags.DEFINE_bool("jit", True, "Train with jit_compile=True (the faster CPU mode on these nets).")
flags.DEFINE_integer("replay_capacity", 5000, "Rows of a replay arm's buffer.")
flags.DEFINE_integer("replay_updates", 1, "A replay arm's extra critic updates per step.")
flags.DEFINE_string("out_tag", "", "Section name in the JSON (default <dataset>_<arch>).")
flags.DEFINE_bool("extend", False, "Add this run's seeds to the section --out_tag already in the JSON (same arms, "
                  "budgets, chunk_steps and jit; new seeds only): its command and machine are listed beside the "
                  "earlier run's and the summary is taken over all the seeds.")


def compile_arm(name, pixels):
    """A fresh SBN compiled for arm `name`: an estimator name, or
    `<estimator>+replay_<correction>` for that estimator with replay."""
    estimator, _, correction = name.partition("+replay_")
    replay = keras_bpq.Replay(FLAGS.replay_capacity, FLAGS.replay_updates, correction) if correction else None
    return sbn.compile_sbn(sbn.build_sbn(pixels, FLAGS.arch), estimator, FLAGS.jit, replay)


def run_seed(seed, train, test):
    budgets = [float(b) for b in FLAGS.budgets]
    models, clocks, curves, chunks = {}, {}, {}, {}
    for name in FLAGS.arms:
        keras.utils.set_random_seed(seed)
        models[name] = compile_arm(name, train.shape[1])
        clocks[name], curves[name], chunks[name] = 0.0, [], []
    step = {name: 0 for name in FLAGS.arms}
    while any(clocks[n] < max(budgets) for n in FLAGS.arms):
        for name in FLAGS.arms:
            if clocks[name] >= max(budgets):
                continue
            ds = common.binarised(train, FLAGS.batch_size, seed * 100_000 + len(chunks[name]))
            seconds = common.seconds_of(
                lambda: models[name].fit(ds, epochs=1, steps_per_epoch=FLAGS.chunk_steps, verbose=0))
            clocks[name] += seconds
            chunks[name].append(seconds)
            step[name] += FLAGS.chunk_steps
            # The mean over this turn's training batches (read before `evaluate` resets the metrics).
            train_nelbo = float(models[name].get_metrics_result()["loss"])
            nelbo = float(models[name].evaluate(test, batch_size=len(test), verbose=0, return_dict=True)["loss"])
            active = sbn.active_units(models[name], test)
            curves[name].append({"step": step[name], "train_seconds": clocks[name], "test_nelbo": nelbo,
                                 "train_nelbo": train_nelbo, "active_units": active})
            sbn.log(f"  [seed {seed}] {name}: step {step[name]} {clocks[name]:.1f} s test -ELBO {nelbo:.2f}"
                    f" (training batches {train_nelbo:.2f}; active units {active})")
    result = {}
    for name in FLAGS.arms:
        steady = common.median(chunks[name][1:]) if len(chunks[name]) > 1 else chunks[name][0]
        result[name] = {
            "curve": curves[name],
            "compile_seconds": max(chunks[name][0] - steady, 0.0),
            "ms_per_step": 1e3 * steady / FLAGS.chunk_steps,
            "at_budget": {str(int(b)): _at(curves[name], b) for b in budgets},
        }
    return result


def _at(curve, budget):
    done = [c["test_nelbo"] for c in curve if c["train_seconds"] <= budget]
    return done[-1] if done else None


def main(argv):
    del argv
    seeds = [int(s) for s in FLAGS.seeds]
    train, test_all = common.load_data(FLAGS.dataset, 0)
    test = common.fixed_binarisation(test_all[: FLAGS.test_size], 0)
    tag = FLAGS.out_tag or f"{FLAGS.dataset}_{FLAGS.arch}"
    machine = common.machine_info()
    sbn.log(f"{tag}: arms {FLAGS.arms}, budgets {FLAGS.budgets}; load {machine['load_average']}")
    runs = [run_seed(seed, train, test) for seed in seeds]
    budgets = [str(int(float(b))) for b in FLAGS.budgets]
    path = os.path.join(FLAGS.out_dir, "equal_time.json")
    report = json.load(open(path)) if os.path.exists(path) else {}
    entry = {"command": common.command_line(), "seeds": seeds, "budgets": budgets,
             "chunk_steps": FLAGS.chunk_steps, "jit": FLAGS.jit, "runs": runs,
             "summary": equal_time_sections.summary(runs, budgets),
             "machine": machine, "load_end": os.getloadavg()}
    if FLAGS.extend:
        entry = equal_time_sections.extended_in(report, tag, entry, path)
    report[tag] = entry
    common.write_json(path, report)
    render.write("equal_time", report, os.path.join(FLAGS.out_dir, "equal_time.md"))
    sbn.log(render.page("equal_time", {tag: report[tag]}))


if __name__ == "__main__":
    flags.FLAGS.set_default("dataset", "fashion_mnist")
    app.run(main)
