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
each stage's share of the actor's gradient apart). `op_profile` adds each
operation's time to its stage: CPU time summed over the threads that ran
it, measured in the step as it trains (unlike timing pieces alone, which
lets XLA drop or hoist what the piece does not need).

    python benchmarks/profile_step.py --dataset=fashion_mnist --arch=two_layer \
        --compare=reinforce,disarm,auto

Writes `<out_dir>/step_stages.json` (a section per `--out_tag`, by default
`<dataset>_<arch>`) and `step_stages.md` (rendered by `render.step_stages`).
"""

import glob
import json
import os
import re
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: E402

import common  # noqa: E402  (first: puts this checkout's package on the path)
import render  # noqa: E402
from keras_bpq import step as step_lib  # noqa: E402

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


# The profile's stages: the step's name scopes (`keras_bpq.step.STAGE_SCOPES`),
# each with the actor's gradient of its operations (`gradient_tape/<scope>`)
# as a stage of its own; "other": operations under none of them.
BACKWARD = "gradient_tape"
# Instructions whose time is their nested instructions' (each counted itself).
CONTAINERS = ("conditional", "while", "call")
_UNIQUE = re.compile(r"_\d+$")
_OPERAND = re.compile(r"%([\w.-]+)")
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.-]+) = .*?\s([a-z][\w-]*)\((?:.*?op_name="([^"]*)")?')


def stage_of(op_name):
    """The profile stage of a TensorFlow op name (`STAGE_SCOPES`'s first scope
    in it; under `gradient_tape/`, that scope's gradient; "other": none, or
    no op name, as XLA's own instructions have)."""
    parts = [_UNIQUE.sub("", part) for part in op_name.split("/")]  # a scope entered again: `update_1`
    backward = parts[0] == BACKWARD
    for part in parts[1:] if backward else parts:
        if part in step_lib.STAGE_SCOPES:
            return f"{part} (gradient)" if backward else part
    return "other"


def hlo_instructions(dump_dir):
    """`{(module, instruction): (opcode, TensorFlow op name)}` from the
    optimised HLO modules XLA dumped to `dump_dir` (`--xla_dump_to`). An
    instruction XLA made without an op name (a reduction's split, a fusion
    of such) takes its first named operand's: it works for that stage."""
    found = {}
    for path in glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")):
        with open(path) as f:
            module = f.readline().split()[1].rstrip(",")
            for line in f:  # each instruction after its operands
                match = _INSTRUCTION.match(line)
                if not match:
                    continue
                op_name = match.group(3) or ""
                if not op_name:
                    operands = (found.get((module, name)) for name in _OPERAND.findall(line[match.end(2):]))
                    op_name = next((o[1] for o in operands if o and o[1]), "")
                found[(module, match.group(1))] = (match.group(2), op_name)
    return found


def op_profile(model, data, steps, instructions):
    """`{stage: ms}`: CPU milliseconds per step of the compiled step's XLA
    operations by stage (`stage_of` their TensorFlow op names, read from
    `instructions`, `hlo_instructions`), summed over the threads that ran
    them, from the TensorFlow profiler's trace of one `fit` of `steps` steps
    (XLA's own events: `--xla_cpu_enable_xprof_traceme`, set by `main`)."""
    logdir = tempfile.mkdtemp(prefix="profile_step_")
    try:
        tf.profiler.experimental.start(logdir)
        common.fit_seconds_per_step(model, data, steps)
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb"))[-1], "rb") as f:
            space.ParseFromString(f.read())
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    picoseconds = {}
    for plane in space.planes:
        names = {key: meta.name for key, meta in plane.stat_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                stats = {names.get(stat.metadata_id): stat.ref_value for stat in event.stats}
                if "hlo_module" not in stats or "hlo_op" not in stats:
                    continue
                opcode, op_name = instructions.get((names[stats["hlo_module"]], names[stats["hlo_op"]]), ("", ""))
                if opcode in CONTAINERS:
                    continue
                stage = stage_of(op_name)
                picoseconds[stage] = picoseconds.get(stage, 0) + event.duration_ps
    return {stage: ps / 1e9 / steps for stage, ps in picoseconds.items()}


def main(argv):
    del argv
    dump_dir = tempfile.mkdtemp(prefix="profile_step_hlo_")
    if FLAGS.breakdown:  # read when XLA first compiles, below
        os.environ["XLA_FLAGS"] = " ".join([
            os.environ.get("XLA_FLAGS", ""), "--xla_cpu_enable_xprof_traceme=true", f"--xla_dump_to={dump_dir}",
            "--xla_dump_hlo_as_text", "--xla_dump_hlo_module_re=.*one_step_on_data.*"]).strip()
    try:
        run(dump_dir)
    finally:
        shutil.rmtree(dump_dir, ignore_errors=True)


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
            instructions = hlo_instructions(dump_dir)  # every model's step compiled by the timings above
            profiles = {name: op_profile(model, data, FLAGS.fit_steps, instructions) for name, model in models.items()}
            order = [s for base in step_lib.STAGE_SCOPES for s in (base, f"{base} (gradient)")] + ["other"]
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
