"""The knowledge-graph agent at equal training wall-clock (issue 16, target 1).

kg.py compares the estimators at equal steps; this compares them at equal
training time. Every arm (a kg.py estimator: `minerva`, `rloo`, `auto`) trains
its own agent of `examples/kg_reasoning.py` from the same seed, in turns of
`--chunk_steps` steps (round robin, so machine load falls on every arm alike)
until each has trained for the largest budget (and for two turns at least).
An arm's clock counts only its own `fit` calls, its first compile included;
the compile is also reported alone (its first turn's time less a turn at its
steady per-step time). At each budget an arm is scored on the test split
(beam search, filtered, as `--beam_pool` / `--beam_unique` say) with its
weights at the end of its last turn that ended at or before the budget;
evaluation is not on the clock. Data in memory, tf.data autotuning off.
kg_reasoning's `--jit_compile` (by default Keras' choice: XLA only where a GPU
is present) applies to every arm.

With `--select_every=S`, an arm's weights are also kept as a checkpoint every
S seconds of its clock (those at the end of its last turn within each multiple
of S, and those it is scored with at each budget), each scored on the valid and
the test split; its score at a budget is then the test metrics of the
checkpoint, of those within the budget, with the best valid Hits@1 (the
earliest of those tied), as MINERVA keeps the model that scores best on the
dev split, and the last turn's test metrics are kept beside as `at_budget_last`.
The page then also shows each arm's checkpoints between two budgets: the mean
of their test Hits@1 and the deviation of their valid Hits@1
(`equal_time_sections.checkpoint_spans`); and each arm at its best dev
checkpoint of those within the default's steps at each budget, the same
selection at equal steps (`equal_time_sections.selected_at_equal_steps`).

An arm `<estimator>+replay_<correction>` trains that estimator with
`compile(replay=keras_bpq.Replay(--replay_capacity, --replay_updates,
correction))` (issue 19: the default with replay on and off at equal
wall-clock; replay trains the first hop's learned critic). An arm
`<estimator>+critic_<dim>x<hidden>` (after any `+replay_` part) gives its
critics that size (`kg_reasoning.critics_for`) in place of `--critic_dim` /
`--critic_hidden`'s, and a last part `+critic_every_<k>` trains them every
`k` steps (`compile(critic_update_period=k)`).

    python benchmarks/kg_equal_time.py --datasets=umls,kinship --budgets=60,180 \
        --seeds=0 --batch_size=128

Writes `<out_dir>/kg_equal_time.json` (a section per dataset, or `--out_tag`) and
`kg_equal_time.md` (rendered from the JSON by `render.kg_equal_time`). A
10-minute budget of 3 seeds takes hours: `--extend` adds a later run's seeds to
the section (`equal_time_sections.extended`). RESULTS.md's headline reads a
dataset's section and, for budgets that one lacks, its section `<dataset>_long`.
"""

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402

import common  # noqa: E402
import equal_time_sections  # noqa: E402
import keras_bpq  # noqa: E402
import render  # noqa: E402

kg_reasoning = common.example("kg_reasoning")

# Shared with the example (defined there): --batch_size, --rollouts, --beam,
# --beam_pool, --beam_unique, --learning_rate, --steps_per_execution,
# --entropy_beta, --hops, --dim, --hidden, --critic_dim, --critic_hidden,
# --action_dropout, --entity_embeddings.
FLAGS = flags.FLAGS
flags.DEFINE_list("datasets", ["umls", "kinship"], "Datasets.")
flags.DEFINE_list("estimators", ["minerva", "rloo", "auto"], "Arms (kg_reasoning --estimator values).")
flags.DEFINE_list("budgets", ["60", "180"], "Training budgets in seconds (compile included).")
flags.DEFINE_list("seeds", ["0"], "Seeds.")
flags.DEFINE_integer("chunk_steps", 50, "Steps per turn (a multiple of --steps_per_execution).")
flags.DEFINE_integer("replay_capacity", 5000, "Rows of a replay arm's buffer.")
flags.DEFINE_integer("replay_updates", 1, "A replay arm's extra critic updates per step.")
flags.DEFINE_integer("select_every", 0, "Seconds of an arm's clock between checkpoints scored on the valid split; "
                     "an arm's score at a budget is then that of its checkpoint with the best valid Hits@1 (0: its "
                     "last turn's, and no valid scoring).")
flags.DEFINE_string("out_tag", "", "Section name in the JSON (default: the dataset; needs one dataset).")
flags.DEFINE_bool("extend", False, "Add this run's seeds to the section already in the JSON (same arms, budgets, "
                  "chunk_steps and settings; new seeds only): its command and machine are listed beside the earlier "
                  "run's and the summary is taken over all the seeds.")
flags.DEFINE_string("out_dir", common.RESULTS, "Where kg_equal_time.json and .md go.")

SETTINGS = ("batch_size", "rollouts", "beam", "beam_pool", "beam_unique", "learning_rate",
            "steps_per_execution", "entropy_beta", "hops", "dim", "hidden", "critic_dim", "critic_hidden",
            "action_dropout", "entity_embeddings",
            "replay_capacity", "replay_updates", "jit_compile")


class Arm:
    """One estimator's agent, its training clock and its last turn's weights."""

    def __init__(self, kg, name, seed):
        keras.utils.set_random_seed(seed)
        arm = equal_time_sections.kg_arm(name)
        options = arm.agent_options()
        if arm.replay:
            options["replay"] = keras_bpq.Replay(FLAGS.replay_capacity, FLAGS.replay_updates, arm.replay)
        self.agent = kg_reasoning.agent_from_flags(kg, arm.estimator, seed, **options)
        self.data = common.without_autotuning(kg_reasoning.train_dataset(kg, FLAGS.batch_size, seed))
        self.callbacks = [kg_reasoning.EntropyDecay(self.agent.entropy)] if self.agent.entropy is not None else []
        self.clock, self.step, self.turns = 0.0, 0, []
        self.last = (0.0, 0, self.weights())  # (clock, step, weights) after the last turn

    def turn(self):
        """Trains `--chunk_steps` steps; returns `(clock, step, weights)` before them."""
        before = self.last
        start = time.perf_counter()
        self.agent.model.fit(self.data, epochs=1, steps_per_epoch=FLAGS.chunk_steps, callbacks=self.callbacks,
                             verbose=0)
        seconds = time.perf_counter() - start
        self.clock += seconds
        self.step += FLAGS.chunk_steps
        self.turns.append(seconds)
        self.last = (self.clock, self.step, self.weights())
        return before

    def weights(self):
        """`[(variable, value)]` of every weight of the agent (its critics and
        training state are created by the first step)."""
        return [(v, v.numpy()) for v in self.agent.model.weights]

    def score(self, state, split="test"):
        """Metrics on `split` of the agent with the weights of `state` (`(clock,
        step, weights)`); the agent's own weights are put back after."""
        clock, step, weights = state
        current = self.weights()
        for variable, value in weights:
            variable.assign(value)
        metrics = kg_reasoning.evaluate(self.agent, split, FLAGS.beam, pool=FLAGS.beam_pool,
                                        unique=FLAGS.beam_unique)
        for variable, value in current:
            variable.assign(value)
        return {"step": step, "train_seconds": clock, **metrics}


def run_seed(kg, seed, budgets):
    arms = {e: Arm(kg, e, seed) for e in FLAGS.estimators}
    at_budget = {e: {} for e in arms}
    last = {e: {} for e in arms}  # with --select_every: the last turn's test metrics at each budget
    checkpoints = {e: {} for e in arms}  # with --select_every: {step: {"valid": ..., "test": ...}}

    def checkpoint(name, state):
        step = state[1]
        if step not in checkpoints[name]:
            checkpoints[name][step] = {split: arms[name].score(state, split) for split in ("valid", "test")}
        return checkpoints[name][step]

    def training(arm):  # to the largest budget, and at least two turns (a steady one to time)
        return arm.clock < budgets[-1] or len(arm.turns) < 2

    while any(training(arm) for arm in arms.values()):
        for name, arm in arms.items():
            if not training(arm):
                continue
            before = arm.turn()
            every = FLAGS.select_every
            if every and arm.clock // every > before[0] // every:  # this turn crossed a multiple of `every`
                checkpoint(name, before)
            for budget in budgets:
                key = str(int(budget))
                if key not in at_budget[name] and arm.clock > budget:
                    if every:
                        last[name][key] = checkpoint(name, before)["test"]
                        at_budget[name][key] = equal_time_sections.selected_on_valid(
                            list(checkpoints[name].values()))["test"]
                    else:
                        at_budget[name][key] = arm.score(before)
            print(f"  [seed {seed}] {name}: step {arm.step} {arm.clock:.1f} s", flush=True)
    result = {}
    for name, arm in arms.items():
        steady = common.median(arm.turns[1:])
        result[name] = {"at_budget": at_budget[name], "compile_seconds": max(arm.turns[0] - steady, 0.0),
                        "ms_per_step": 1e3 * steady / FLAGS.chunk_steps, "steps": arm.step}
        if FLAGS.select_every:
            result[name]["at_budget_last"] = last[name]
            result[name]["checkpoints"] = [{"step": step, "valid_hits@1": c["valid"]["hits@1"],
                                            "test_hits@1": c["test"]["hits@1"]}
                                           for step, c in sorted(checkpoints[name].items())]
        print(f"  [seed {seed}] {name}: " + json.dumps(at_budget[name]), flush=True)
    return result


def settings():
    """The section's settings: SETTINGS' flags, and `select_every` where set
    (sections written without it hold no such key, and `--extend` compares them)."""
    values = {k: FLAGS[k].value for k in SETTINGS}
    if FLAGS.select_every:
        values["select_every"] = FLAGS.select_every
    return values


def main(argv):
    del argv
    if FLAGS.chunk_steps % FLAGS.steps_per_execution:
        raise ValueError("--chunk_steps must be a multiple of --steps_per_execution.")
    if FLAGS.out_tag and len(FLAGS.datasets) != 1:
        raise ValueError("--out_tag names the section of one dataset: pass one --datasets value.")
    budgets = sorted(float(b) for b in FLAGS.budgets)
    names = [str(int(b)) for b in budgets]
    seeds = [int(s) for s in FLAGS.seeds]
    path = os.path.join(FLAGS.out_dir, "kg_equal_time.json")
    report = json.load(open(path)) if os.path.exists(path) else {}
    for dataset in FLAGS.datasets:
        machine = common.machine_info()
        print(f"{dataset}: arms {FLAGS.estimators}, budgets {names}; load {machine['load_average']}", flush=True)
        kg = kg_reasoning.load_graph(dataset)
        runs = [run_seed(kg, seed, budgets) for seed in seeds]
        tag = FLAGS.out_tag or dataset
        entry = {"command": common.command_line(), "seeds": seeds, "budgets": names,
                 "chunk_steps": FLAGS.chunk_steps, "settings": settings(),
                 "runs": runs, "summary": equal_time_sections.kg_summary(runs, names), "machine": machine,
                 "load_end": os.getloadavg()}
        if FLAGS.extend:
            entry = equal_time_sections.extended_in(report, tag, entry, path, equal_time_sections.kg_summary,
                                                    equal_time_sections.KG_SAME)
        report[tag] = entry
        common.write_json(path, report)
        render.write("kg_equal_time", report, os.path.join(FLAGS.out_dir, "kg_equal_time.md"))
    print(render.page("kg_equal_time", report))


if __name__ == "__main__":
    app.run(main)
