"""SCG discovery: nodes in execution order, C_X, parents, contexts, cost ancestors."""

import keras
import numpy as np
import tensorflow as tf

import graphs
import keras_bpq


def test_chain_structure():
    model, x = graphs.chain()
    model.compile()
    scg = model.scg(x)
    assert scg.node_names == ("z1", "z2", "z3")
    assert scg.costs == ("cost",)
    assert scg.cost_ancestors["cost"] == ("z1", "z2", "z3")
    z1, z2, z3 = scg.nodes
    assert (z1.parents, z2.parents, z3.parents) == ((), ("z1",), ("z2",))
    assert z3.ancestors == ("z1", "z2")
    assert all(info.costs == ("cost",) for info in scg.nodes)
    assert z1.context == ("inputs",)
    assert z3.context == ("inputs", "z1", "z2")
    assert (z1.support_size, z1.factorized_units, z3.support_size) == (4, 2, 2)


def test_tree_routes_each_cost_to_its_branch():
    model, x = graphs.tree()
    model.compile()
    scg = model.scg(x)
    # Siblings run in whatever order Keras executes them; z1 always runs first.
    assert scg.node_names[0] == "z1" and set(scg.node_names) == {"z1", "a", "b"}
    assert scg.cost_ancestors == {"cost_a": ("z1", "a"), "cost_b": ("z1", "b")}
    assert scg.node("z1").costs == ("cost_a", "cost_b")
    assert scg.node("a").costs == ("cost_a",)
    assert scg.node("b").costs == ("cost_b",)
    assert scg.node("b").context == ("inputs", "z1")
    assert scg.node("b").distribution == "Categorical"
    assert scg.node("b").support_size == 3


def test_dag_with_shared_descendant():
    model, x = graphs.dag()
    model.compile()
    scg = model.scg(x)
    assert scg.node_names == ("z1", "z2", "z3", "z4")
    assert scg.node("z4").parents == ("z2", "z3")
    assert scg.node("z4").ancestors == ("z1", "z2", "z3")
    assert scg.cost_ancestors["cost"] == ("z1", "z2", "z3", "z4")
    assert scg.node("z4").context == ("inputs", "z1", "z2", "z3")


def test_two_costs_at_different_depths():
    model, x = graphs.two_costs()
    model.compile()
    scg = model.scg(x)
    assert scg.node("z1").costs == ("near", "far")
    assert scg.node("z2").costs == ("far",)
    assert scg.cost_ancestors == {"near": ("z1",), "far": ("z1", "z2")}
    # z2's context holds z1: an ancestor of z2's cost "far".
    assert scg.node("z2").context == ("inputs", "z1")


def test_mixed_graph_marks_reparameterised_node():
    model, x = graphs.mixed()
    model.compile()
    scg = model.scg(x)
    assert scg.node("n").reparameterized and scg.node("n").support_size is None
    assert not scg.node("z1").reparameterized
    assert scg.node("z2").parents == ("n",)
    summary = model.scg_summary(print_fn=lambda s: None)
    assert "reparam" in summary and "critic_cv" in summary


class OutOfOrder(keras_bpq.BackpropQModel):
    """Builds node `late` first but runs it second; shares one node layer twice."""

    def __init__(self):
        super().__init__()
        self.late = keras_bpq.Bernoulli(name="late", seed=1)
        self.early = keras_bpq.Bernoulli(name="early", seed=2)
        self.shared = keras_bpq.Categorical(name="hop", seed=3)
        self.d1 = keras.layers.Dense(2)
        self.d2 = keras.layers.Dense(2)
        self.d3 = keras.layers.Dense(3)
        self.d4 = keras.layers.Dense(3)

    def call(self, x, training=None):
        e = self.early(self.d1(x))
        l = self.late(self.d2(e))
        h1 = self.shared(self.d3(l))
        h2 = self.shared(self.d4(h1))
        keras_bpq.add_cost("first", keras.ops.sum(e, axis=-1))
        keras_bpq.add_cost("last", keras.ops.sum(h2 * x, axis=-1))
        return h2


def test_subclassed_model_order_comes_from_execution():
    model = OutOfOrder()
    model.compile()
    x = np.ones((2, 3), "float32")
    scg = model.scg(x)
    assert scg.node_names == ("early", "late", "hop", "hop@2")
    assert scg.node("hop@2").parents == ("hop",)
    assert scg.node("early").costs == ("first", "last")
    assert scg.node("late").costs == ("last",)
    assert scg.costs == ("first", "last")
    history = model.fit(x, epochs=1, verbose=0)
    assert {"loss", "first", "last"} <= set(history.history)


def test_discovery_inside_xla_function_sees_the_same_graph():
    model, x = graphs.dag()
    model.compile()
    outside = model.scg(x)
    seen = {}

    @tf.function(jit_compile=True)
    def step(inputs):
        seen["scg"] = model.discover(inputs)
        return model(inputs, training=True)

    step(tf.constant(x))
    assert seen["scg"] == outside


def test_summary_lists_every_node_and_cost():
    model, x = graphs.two_costs()
    model.compile()
    lines = []
    model.scg_summary(print_fn=lines.append)
    text = lines[0]
    for word in ["node", "distribution", "context", "costs influenced", "estimator", "critic"]:
        assert word in text
    assert "cost far: stochastic ancestors z1 -> z2" in text
