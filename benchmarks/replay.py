"""Critic learning with replay: how close the learned critics get to the exact Q,
per forward pass and per second, with replay off and on (each correction).

On the chain and DAG graphs of tests/graphs.py (`x -> z1 -> z2 -> z3 -> cost`,
and `z1 -> {z2, z3} -> z4 -> cost` with a shared descendant), every arm trains a
model from the same weights with `critic_cv` (learned critics; `auto` would
serve these graphs' heads by common noise and learn none): the actor
learns too (Adam, `--actor_lr`), so the policy moves and replayed rows are
off-policy. The arms differ only in `compile(replay=...)`: none, or
`Replay(--capacity, --updates_per_step, correction)` for each correction.

Every `--chunk` steps the learned critics are scored on `--eval_rows` fresh
forward passes of the graph's inputs: the relative MSE
`mean((Q - Q*)^2) / var(Q*)` of each learned critic (the online copy) against
`Q*`, the exact Q of the *current* policy by enumeration
(`diagnostics.ExactCritic`), averaged over the critics. Forward passes count
the rows that training sampled (steps x batch); replayed rows are not forward
passes. Seconds are the arm's `fit` wall time, scoring excluded, without the
first chunk's trace of the step function (plain graph mode, no XLA): that
chunk is counted at the median time of the others (its trace is reported on
its own). "At equal seconds" compares every arm at the seconds the `off` arm
took for all its steps (each arm's last scoring within them).

    python benchmarks/replay.py                      # defaults: about 5 minutes on 2 cores
    python benchmarks/replay.py --steps=3000 --chunk=500 --seeds=0,1,2

Writes benchmarks/results/replay.json and the page replay.md rendered from it
(`render.replay`), both written atomically.
"""

import json
import os
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
from keras_bpq import q_values  # noqa: E402

graphs = common.test_graphs()

FLAGS = flags.FLAGS
flags.DEFINE_list("graphs", ["chain", "dag"], "Graphs of tests/graphs.py.")
flags.DEFINE_list("arms", ["off", "expected", "retrace", "none"], "'off' or a Replay correction.")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds (keras.utils.set_random_seed) of each arm.")
flags.DEFINE_integer("steps", 600, "Training steps per arm.")
flags.DEFINE_integer("chunk", 100, "Steps between scorings.")
flags.DEFINE_integer("batch_size", 24, "Rows per step (the graph's 3 inputs repeated).")
flags.DEFINE_integer("capacity", 2048, "Replay(capacity=...).")
flags.DEFINE_integer("updates_per_step", 4, "Replay(updates_per_step=...).")
flags.DEFINE_float("actor_lr", 0.01, "Adam learning rate of the actor (0: a fixed policy).")
flags.DEFINE_float("critic_lr", 3e-3, "Adam learning rate of the critics.")
flags.DEFINE_integer("eval_rows", 150, "Fresh forward passes per scoring.")
flags.DEFINE_string("out_dir", common.RESULTS, "Where replay.json and replay.md go.")
flags.DEFINE_bool("render_only", False, "Only rewrite replay.md from replay.json.")


def log(message):
    print(message, flush=True)


def relative_mse(model, x, rows):
    """Mean over the learned critics of `mean((Q - Q*)^2) / var(Q*)` on `rows`
    fresh forward passes (the graph's inputs repeated)."""
    data = tf.constant(np.repeat(x, rows // len(x), axis=0))
    out = model.run_forward(data)
    errors = []
    for name, critic in model.training_state.learned_critics.items():
        info = model.scg().node(name)
        context = q_values.context(info, data, out.records)
        sample = out.records[name].sample
        learned = critic.q(context, sample, target=False).numpy()
        exact = diagnostics.ExactCritic(model, name).q(context, sample).numpy()
        errors.append(float(np.mean((learned - exact) ** 2) / np.var(exact)))
    return float(np.mean(errors))


def run_arm(graph, arm, seed):
    """`{"passes", "seconds", "mse"}` after every chunk (cumulative forward
    passes and seconds without the trace), and `trace_seconds`."""
    keras.utils.set_random_seed(seed)
    model, x = graphs.ALL[graph]()
    replay = None if arm == "off" else keras_bpq.Replay(FLAGS.capacity, FLAGS.updates_per_step, correction=arm)
    model.compile(optimizer=keras.optimizers.Adam(FLAGS.actor_lr) if FLAGS.actor_lr else keras.optimizers.SGD(0.0),
                  critic_optimizer=keras.optimizers.Adam(FLAGS.critic_lr), critic_hidden_units=(32,), tau=0.05,
                  steps_per_execution=FLAGS.chunk, replay=replay, estimator="critic_cv")
    data = np.repeat(x, FLAGS.batch_size // len(x), axis=0)
    batch = len(data)
    ds = common.without_autotuning(tf.data.Dataset.from_tensor_slices(data).repeat().batch(batch))
    passes, chunk_seconds, errors = [], [], []
    for done in range(FLAGS.chunk, FLAGS.steps + 1, FLAGS.chunk):
        chunk_seconds.append(
            common.seconds_of(lambda: model.fit(ds, epochs=1, steps_per_epoch=FLAGS.chunk, verbose=0)))
        passes.append(done * batch)
        errors.append(relative_mse(model, x, FLAGS.eval_rows))
    steady = float(np.median(chunk_seconds[1:]))
    seconds = np.cumsum([steady] + chunk_seconds[1:]).tolist()
    return {"passes": passes, "seconds": seconds, "mse": errors, "trace_seconds": chunk_seconds[0] - steady}


def at_seconds(curve, budget):
    """The relative MSE of the last scoring within `budget` seconds (None if none)."""
    within = [error for seconds, error in zip(curve["seconds"], curve["mse"]) if seconds <= budget * (1 + 1e-9)]
    return within[-1] if within else None


def summarise(curves):
    """Per arm, medians over seeds: the final relative MSE (equal forward
    passes), the relative MSE at the 'off' arm's seconds (equal seconds), the
    seconds per step and the trace's seconds."""
    summary = {}
    seeds = sorted(next(iter(curves.values())))
    for arm, by_seed in curves.items():
        entry = {
            "final": float(np.median([by_seed[s]["mse"][-1] for s in seeds])),
            "seconds_per_step": float(np.median([by_seed[s]["seconds"][-1] / FLAGS.steps for s in seeds])),
            "trace_seconds": float(np.median([by_seed[s]["trace_seconds"] for s in seeds])),
        }
        if "off" in curves:
            equal = [at_seconds(by_seed[s], curves["off"][s]["seconds"][-1]) for s in seeds]
            entry["at_off_seconds"] = None if None in equal else float(np.median(equal))
        summary[arm] = entry
    return summary


def main(argv):
    del argv
    path = os.path.join(FLAGS.out_dir, "replay.json")
    md_path = os.path.join(FLAGS.out_dir, "replay.md")
    if FLAGS.render_only:
        with open(path) as f:
            render.write("replay", json.load(f), md_path)
        return
    report = {"command": common.command_line(),
              "settings": {name: FLAGS[name].value for name in
                           ("steps", "chunk", "batch_size", "capacity", "updates_per_step", "actor_lr",
                            "critic_lr", "eval_rows", "seeds")},
              "machine": common.machine_info(), "graphs": {}}
    started = time.perf_counter()
    for graph in FLAGS.graphs:
        curves = {arm: {} for arm in FLAGS.arms}
        for seed in FLAGS.seeds:
            for arm in FLAGS.arms:  # arms interleaved, one seed at a time
                curve = curves[arm][seed] = run_arm(graph, arm, int(seed))
                log(f"{graph} seed {seed} {arm}: {curve['passes'][-1]} forward passes, "
                    f"{curve['seconds'][-1]:.2f} s (+ trace {curve['trace_seconds']:.1f} s), "
                    f"relative MSE {curve['mse'][-1]:.4f}")
        report["graphs"][graph] = {"curves": curves, "summary": summarise(curves)}
    report["seconds"] = time.perf_counter() - started
    report["load_average_at_end"] = common.rounded_load(common.load_average())
    common.write_json(path, report)
    render.write("replay", report, md_path)


if __name__ == "__main__":
    app.run(main)
