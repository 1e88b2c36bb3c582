"""Where the knowledge-graph agent's first compile and its training step go,
per estimator (issue 16: what remains of the default's loss at 60 s).

Each arm (a kg_reasoning `--estimator`: `minerva`, `rloo`, `auto`, with
kg_equal_time.py's `+critic_<dim>x<hidden>` and `+critic_every_<k>` parts) is
`examples/kg_reasoning.py`'s agent, compiled as kg_equal_time.py compiles it
(kg_reasoning's `--jit_compile`: by default Keras' choice, which runs without
XLA on a machine without a GPU; `--jit_compile=true` compiles with XLA). Per arm:

* the first compile: in each of `--compile_rounds` rounds a fresh agent's
  first `fit` of `--steps_per_execution` steps, less those steps at the
  steady step time (the arms in turns, their order reversed every round; the
  median of the rounds), and, of it, the Python trace of the training step
  alone (`tf.function(train_step).get_concrete_function`, timed the same
  rounds) and that trace's operations by stage (`stage_profile.traced_ops`:
  the step's name scopes, `keras_bpq.step.STAGE_SCOPES`), which the rest of
  the compile (graph optimisation, or XLA's) works through;
* the steady step: the best of `--repeats` `fit`s of `--fit_steps` steps
  (the arms in turns), and where it goes: one more profiled `fit`'s CPU
  milliseconds per step by stage (`stage_profile.op_profile`).

    python benchmarks/kg_profile_step.py --dataset=umls --batch_size=128 \
        --action_dropout=0.5 --noentity_embeddings --dim=64 --hidden=128

Writes `<out_dir>/kg_step_stages.json` (a section per `--out_tag`, by default
the dataset) and `kg_step_stages.md` (rendered by `render.kg_step_stages`).
"""

import contextlib
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import common  # noqa: E402  (first: puts this checkout's package on the path)
import equal_time_sections  # noqa: E402
import render  # noqa: E402
import stage_profile  # noqa: E402

kg_reasoning = common.example("kg_reasoning")

# Shared with the example (defined there): --dataset, --batch_size, --rollouts,
# --learning_rate, --steps_per_execution, --entropy_beta, --hops, --dim,
# --hidden, --action_dropout, --entity_embeddings, --seed.
FLAGS = flags.FLAGS
flags.DEFINE_list("estimators", ["minerva", "rloo", "auto"], "Arms (kg_reasoning --estimator values, with "
                  "kg_equal_time.py's critic parts).")
flags.DEFINE_integer("compile_rounds", 2, "Fresh agents per arm whose first compile is timed (median).")
flags.DEFINE_integer("fit_steps", 30, "Steps per timed fit of the steady step.")
flags.DEFINE_integer("repeats", 3, "Timed fits of the steady step per arm (best reported).")
flags.DEFINE_string("out_tag", "", "Section name in kg_step_stages.json (default: the dataset).")
flags.DEFINE_string("out_dir", common.RESULTS, "Where kg_step_stages.json and .md go.")

SETTINGS = ("batch_size", "rollouts", "learning_rate", "steps_per_execution", "entropy_beta", "hops", "dim",
            "hidden", "action_dropout", "entity_embeddings", "seed", "jit_compile")


class Arm:
    """One estimator's agent, compiled, and a `fit` of its data."""

    def __init__(self, kg, name):
        arm = equal_time_sections.kg_arm(name)
        if arm.replay:
            raise app.UsageError(f"Arm {name!r}: kg_profile_step.py profiles no replay arms.")
        self.agent = kg_reasoning.agent_from_flags(kg, arm.estimator, FLAGS.seed, **arm.agent_options())
        self.data = common.without_autotuning(kg_reasoning.train_dataset(kg, FLAGS.batch_size, FLAGS.seed))

    def fit(self, steps):
        """Trains `steps` steps; returns the wall seconds."""
        return common.seconds_of(
            lambda: self.agent.model.fit(self.data, epochs=1, steps_per_epoch=steps, verbose=0))

    def trace(self):
        """`(seconds, graph_def)` of tracing the training step alone on a batch."""
        batch = next(iter(self.data))
        start = time.perf_counter()
        graph = tf.function(self.agent.model.train_step, autograph=False).get_concrete_function(batch).graph
        return time.perf_counter() - start, graph.as_graph_def()


def profile(kg, dump_dir):
    """`{arm: result}` (the module docstring's measures) and whether the
    steps ran under XLA (whose optimised HLO `stage_profile.profiled_xla`
    dumps to `dump_dir`)."""
    first = {e: [] for e in FLAGS.estimators}
    traces = {e: [] for e in FLAGS.estimators}
    arms, graphs = {}, {}
    for index in range(FLAGS.compile_rounds):
        for estimator in FLAGS.estimators[:: 1 if index % 2 == 0 else -1]:
            keras.utils.set_random_seed(FLAGS.seed)
            arms[estimator] = Arm(kg, estimator)
            first[estimator].append(arms[estimator].fit(FLAGS.steps_per_execution))
            seconds, graphs[estimator] = arms[estimator].trace()
            traces[estimator].append(seconds)
            print(f"  {estimator}: first fit {first[estimator][-1]:.1f} s, trace {seconds:.1f} s", flush=True)
    best = {e: float("inf") for e in arms}
    for _ in range(FLAGS.repeats):
        for estimator, arm in arms.items():
            best[estimator] = min(best[estimator], arm.fit(FLAGS.fit_steps) / FLAGS.fit_steps)
    jit = bool(next(iter(arms.values())).agent.model.jit_compile)
    instructions = stage_profile.hlo_instructions(dump_dir) if jit else None  # every arm's compiled step
    results = {}
    for estimator, arm in arms.items():
        op_ms = stage_profile.op_profile(lambda arm=arm: arm.fit(FLAGS.fit_steps), FLAGS.fit_steps, instructions)
        compiles = [f - FLAGS.steps_per_execution * best[estimator] for f in first[estimator]]
        results[estimator] = {
            "first_fit_seconds": first[estimator], "compile_seconds": common.median(compiles),
            "trace_seconds": common.median(traces[estimator]),
            "traced_ops": stage_profile.traced_ops(graphs[estimator]),
            "whole_ms": 1e3 * best[estimator], "op_ms": op_ms,
        }
        print(f"  {estimator}: " + json.dumps({k: v for k, v in results[estimator].items() if k != "op_ms"}),
              flush=True)
    return results, jit


def main(argv):
    del argv
    with contextlib.ExitStack() as stack:
        dump_dir = None if FLAGS.jit_compile == "false" else stack.enter_context(stage_profile.profiled_xla())
        machine = common.machine_info()
        print(f"{FLAGS.dataset}: arms {FLAGS.estimators}; load {machine['load_average']}", flush=True)
        results, jit = profile(kg_reasoning.load_graph(FLAGS.dataset), dump_dir)
    path = os.path.join(FLAGS.out_dir, "kg_step_stages.json")
    report = json.load(open(path)) if os.path.exists(path) else {}
    tag = FLAGS.out_tag or FLAGS.dataset
    report[tag] = {"command": common.command_line(), "settings": {k: FLAGS[k].value for k in SETTINGS},
                   "compile_rounds": FLAGS.compile_rounds, "fit_steps": FLAGS.fit_steps, "repeats": FLAGS.repeats,
                   "xla": jit, "stages": stage_profile.stages(), "arms": results, "machine": machine,
                   "load_end": os.getloadavg(), "notes": report.get(tag, {}).get("notes", [])}
    common.write_json(path, report)
    render.write("kg_step_stages", report, os.path.join(FLAGS.out_dir, "kg_step_stages.md"))
    print(render.page("kg_step_stages", report))


if __name__ == "__main__":
    app.run(main)
