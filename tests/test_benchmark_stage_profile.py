"""`benchmarks/stage_profile.py`: the stage of an op name (with XLA or
without, where the training loop's scopes come first) and a traced step's
operations counted by stage, those of the functions it runs (a tf.cond's
branches) included: what kg_profile_step.py and profile_step.py report."""

import pytest
import tensorflow as tf

from keras_bpq import step


@pytest.fixture(scope="module")
def stage_profile(benchmark_script):
    """benchmarks/stage_profile.py."""
    return benchmark_script("stage_profile")


def test_stage_of_reads_the_first_stage_scope(stage_profile):
    assert stage_profile.stage_of("update_1/cond/adam/Square") == "update"
    assert stage_profile.stage_of("gradient_tape/record/sbn_1/MatMul") == "record (gradient)"
    assert stage_profile.stage_of("metrics/Add_2") == "metrics"
    # Without XLA, an executed op's name starts with the training loop's scopes.
    loop = "while/body/_1/while/cond/then/_339/while/cond/StatefulPartitionedCall/"
    assert stage_profile.stage_of(loop + "update_1/cond/else/_671/update_1/cond/adam/Square") == "update"
    assert stage_profile.stage_of(loop + "gradient_tape/estimators/Mul") == "estimators (gradient)"
    assert stage_profile.stage_of(loop + "gradient_tape/GatherV2") == "other"
    assert stage_profile.stage_of("while/body/_1/while/add") == "other"
    assert stage_profile.stage_of("") == "other"
    assert stage_profile.stages()[:2] == [step.STAGE_SCOPES[0], f"{step.STAGE_SCOPES[0]} (gradient)"]
    assert stage_profile.stages()[-1] == "other" and len(stage_profile.stages()) == 2 * len(step.STAGE_SCOPES) + 1


def test_traced_ops_counts_a_functions_operations_under_its_callers_stage(stage_profile):
    def traced(x):
        with tf.name_scope("record"):
            y = x * 2.0
        with tf.name_scope("update"):
            z = tf.cond(y[0] > 0, lambda: tf.sqrt(y) + 1.0, lambda: y - 1.0)
        return z + 1.0

    graph_def = tf.function(traced, autograph=False).get_concrete_function(
        tf.TensorSpec([3], tf.float32)).graph.as_graph_def()
    functions = {f.signature.name: f for f in graph_def.library.function}
    (cond,) = [n for n in graph_def.node if n.op in ("If", "StatelessIf")]
    branches = sum(len(functions[cond.attr[a].func.name].node_def) for a in ("then_branch", "else_branch"))
    top = {name: [n for n in graph_def.node if n.name.startswith(f"{name}/")] for name in ("record", "update")}
    assert branches > 2 and top["record"] and cond in top["update"]
    counts = stage_profile.traced_ops(graph_def)
    assert counts == {
        "record": len(top["record"]),
        "update": len(top["update"]) + branches,
        "other": len(graph_def.node) - len(top["record"]) - len(top["update"]),
    }
