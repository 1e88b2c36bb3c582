"""Where a compiled training step's time and its trace go, by the step's stage.

A `BackpropQModel`'s traced step names each stage's operations by a name
scope (`keras_bpq.step.STAGE_SCOPES`: the recorded pass, the estimators'
steps and surrogate, the critics, the updates with the write guard, the
metrics), the actor's gradient of a stage under `gradient_tape/<scope>`.
`stage_of` maps a TensorFlow op name to its stage. Under XLA,
`profiled_xla` has XLA's CPU runtime trace each operation it runs and dump
the optimised HLO (whose op names carry the scopes); `hlo_instructions`
reads the dump and `op_profile` adds each operation's CPU time, from the
TensorFlow profiler's trace of the step as it trains, to its stage.
`traced_ops` counts a traced step's operations by stage: what the first
compile traces and XLA compiles. Used by profile_step.py (the SBNs) and
kg_profile_step.py (the knowledge-graph agent).
"""

import collections
import contextlib
import glob
import os
import re
import shutil
import tempfile

from tensorflow.tsl.profiler.protobuf import xplane_pb2
import tensorflow as tf

import common  # noqa: F401  (first: puts this checkout's package on the path)
from keras_bpq import step as step_lib

# The profile's stages: the step's name scopes (`keras_bpq.step.STAGE_SCOPES`),
# each with the actor's gradient of its operations (`gradient_tape/<scope>`)
# as a stage of its own; "other": operations under none of them.
BACKWARD = "gradient_tape"
OTHER = "other"
# XLA instructions and TensorFlow operations whose time is that of what they
# run (each counted itself).
CONTAINERS = ("conditional", "while", "call", "PartitionedCall", "StatefulPartitionedCall", "While",
              "StatelessWhile", "If", "StatelessIf", "Case", "StatelessCase")
_UNIQUE = re.compile(r"_\d+$")
_OPERAND = re.compile(r"%([\w.-]+)")
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.-]+) = .*?\s([a-z][\w-]*)\((?:.*?op_name="([^"]*)")?')
# TensorFlow graph attributes that name a function an operation runs (a
# tf.cond's branches, a loop's condition and body, a call).
_FUNCTION_ATTRS = ("then_branch", "else_branch", "cond", "body", "f")


def stages():
    """Every stage in the order the pages list them."""
    return [s for base in step_lib.STAGE_SCOPES for s in (base, f"{base} (gradient)")] + [OTHER]


def stage_of(op_name):
    """The profile stage of a TensorFlow op name: the first of
    `STAGE_SCOPES` among its scopes, or, where `gradient_tape` comes first,
    that scope's gradient; "other": none, or no op name, as XLA's own
    instructions have. Scopes before the step's (the training loop's, such
    as `while/body/...` in an op name of a graph run without XLA) are
    passed over."""
    backward = False
    for part in op_name.split("/"):
        part = _UNIQUE.sub("", part)  # a scope entered again: `update_1`
        if part == BACKWARD:
            backward = True
        elif part in step_lib.STAGE_SCOPES:
            return f"{part} (gradient)" if backward else part
    return OTHER


def traced_ops(graph_def):
    """`{stage: count}` of the TensorFlow operations of a traced step
    (`graph_def`, its function library included). An operation inside a
    function the step runs (a tf.cond's branch, a loop's body) carries the
    names its function gave it, not the step's scopes: one whose own name
    names no stage counts under the stage of the operation that runs its
    function. A function run from two places counts at each."""
    functions = {f.signature.name: f for f in graph_def.library.function}
    counts = collections.Counter()

    def visit(nodes, outer):
        for node in nodes:
            stage = stage_of(node.name)
            stage = outer if stage == OTHER else stage
            counts[stage] += 1
            for attr in _FUNCTION_ATTRS:
                if attr in node.attr and node.attr[attr].func.name in functions:
                    visit(functions[node.attr[attr].func.name].node_def, stage)

    visit(graph_def.node, OTHER)
    return dict(counts)


@contextlib.contextmanager
def profiled_xla(module_re=".*one_step_on_data.*"):
    """Within: XLA traces each operation it runs for the profiler and dumps
    the optimised HLO of the modules `module_re` matches (those compiled
    first within: XLA reads its flags when it first compiles) to the
    directory it yields, removed after."""
    dump_dir = tempfile.mkdtemp(prefix="stage_profile_hlo_")
    before = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = " ".join([
        before or "", "--xla_cpu_enable_xprof_traceme=true", f"--xla_dump_to={dump_dir}",
        "--xla_dump_hlo_as_text", f"--xla_dump_hlo_module_re={module_re}"]).strip()
    try:
        yield dump_dir
    finally:
        if before is None:
            os.environ.pop("XLA_FLAGS")
        else:
            os.environ["XLA_FLAGS"] = before
        shutil.rmtree(dump_dir, ignore_errors=True)


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


def op_profile(train, steps, instructions=None):
    """`{stage: ms}`: CPU milliseconds per step of the step's operations by
    stage (`stage_of` their TensorFlow op names), summed over the threads
    that ran them, from the TensorFlow profiler's trace of `train()`, which
    trains `steps` steps. Under XLA (`instructions`, `hlo_instructions` of
    the compiled step): XLA's own events (`profiled_xla`), each named by its
    instruction's op name; else the TensorFlow executor's events, one per
    operation run, named by the operation (those that run a function, whose
    operations have events of their own, left out)."""
    logdir = tempfile.mkdtemp(prefix="stage_profile_")
    try:
        tf.profiler.experimental.start(logdir)
        train()
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb"))[-1], "rb") as f:
            space.ParseFromString(f.read())
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    picoseconds = collections.Counter()
    for plane in space.planes:
        names = {key: meta.name for key, meta in plane.stat_metadata.items()}
        events = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                if instructions is not None:
                    stats = {names.get(stat.metadata_id): stat.ref_value for stat in event.stats}
                    if "hlo_module" not in stats or "hlo_op" not in stats:
                        continue
                    kind, op_name = instructions.get((names[stats["hlo_module"]], names[stats["hlo_op"]]), ("", ""))
                else:  # "<op name>:<op type>"; the executor's own events are named "<class>::<method>"
                    name = events.get(event.metadata_id, "")
                    op_name, _, kind = name.rpartition(":")
                    if not line.name.startswith("tf_Compute") or not op_name or "::" in name:
                        continue
                if kind in CONTAINERS:
                    continue
                picoseconds[stage_of(op_name)] += event.duration_ps
    return {stage: ps / 1e9 / steps for stage, ps in picoseconds.items()}
