"""Small stochastic computation graphs shared by the tests.

Each builder returns `(model, x)`: an uncompiled `BackpropQModel` and a batch of
inputs. The graphs are tiny so that exact enumeration and XLA compiles stay fast,
and every cost depends on its samples non-linearly and on the inputs, so both
score-function and deterministic-path gradients are exercised.
"""

import keras
import numpy as np

import keras_bpq

INPUT_DIM = 3
BATCH = 3


def dense(units, name, seed):
    return keras.layers.Dense(
        units,
        name=name,
        kernel_initializer=keras.initializers.RandomNormal(stddev=1.0, seed=seed),
        bias_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=seed + 100),
    )


def square_cost(h, x):
    return keras.ops.sum(keras.ops.square(h - x[:, : h.shape[-1]]), axis=-1)


def inputs():
    return np.random.RandomState(1).normal(size=(BATCH, INPUT_DIM)).astype("float32")


def chain():
    """x -> z1 (2 bits) -> z2 (2 bits) -> z3 (1 bit) -> cost."""
    x = keras.Input((INPUT_DIM,))
    z1 = keras_bpq.Bernoulli(name="z1", seed=1)(dense(2, "d1", 1)(x))
    z2 = keras_bpq.Bernoulli(name="z2", seed=2)(dense(2, "d2", 2)(z1))
    z3 = keras_bpq.Bernoulli(name="z3", seed=3)(dense(1, "d3", 3)(z2))
    cost = square_cost(dense(2, "dec", 4)(z3), x)
    return keras_bpq.BackpropQModel(inputs=x, outputs=z3, costs={"cost": cost}, name="chain"), inputs()


def tree():
    """x -> z1; z1 -> a (2 bits) -> cost_a; z1 -> b (3-way categorical) -> cost_b."""
    x = keras.Input((INPUT_DIM,))
    z1 = keras_bpq.Bernoulli(name="z1", seed=1)(dense(1, "d1", 1)(x))
    h = keras.layers.Concatenate()([z1, x])
    a = keras_bpq.Bernoulli(name="a", seed=2)(dense(2, "da", 2)(h))
    b = keras_bpq.Categorical(name="b", seed=3)(dense(3, "db", 3)(h))
    cost_a = square_cost(dense(2, "dec_a", 4)(a), x)
    cost_b = square_cost(dense(1, "dec_b", 5)(b), x)
    model = keras_bpq.BackpropQModel(
        inputs=x, outputs=[a, b], costs={"cost_a": cost_a, "cost_b": cost_b}, name="tree"
    )
    return model, inputs()


def dag():
    """z1 feeds z2 and z3, which both feed the shared descendant z4 -> cost."""
    x = keras.Input((INPUT_DIM,))
    z1 = keras_bpq.Bernoulli(name="z1", seed=1)(dense(1, "d1", 1)(x))
    z2 = keras_bpq.Bernoulli(name="z2", seed=2)(dense(1, "d2", 2)(z1))
    z3 = keras_bpq.Categorical(name="z3", seed=3)(dense(2, "d3", 3)(z1))
    z4 = keras_bpq.Bernoulli(name="z4", seed=4)(
        dense(1, "d4", 4)(keras.layers.Concatenate()([z2, z3]))
    )
    cost = square_cost(dense(2, "dec", 5)(keras.layers.Concatenate()([z4, z2])), x)
    return keras_bpq.BackpropQModel(inputs=x, outputs=z4, costs={"cost": cost}, name="dag"), inputs()


def two_costs():
    """z1 -> near (cost at depth 1); z1 -> z2 -> far (cost at depth 2)."""
    x = keras.Input((INPUT_DIM,))
    z1 = keras_bpq.Bernoulli(name="z1", seed=1)(dense(2, "d1", 1)(x))
    z2 = keras_bpq.Bernoulli(name="z2", seed=2)(dense(2, "d2", 2)(z1))
    near = square_cost(dense(1, "dec1", 3)(z1), x)
    far = square_cost(dense(2, "dec2", 4)(z2), x)
    model = keras_bpq.BackpropQModel(
        inputs=x, outputs=z2, costs={"near": near, "far": far}, name="two_costs"
    )
    return model, inputs()


def mixed():
    """A Normal node between discrete ones: z1 -> n (Normal, 1 unit) -> z2 -> cost."""
    x = keras.Input((INPUT_DIM,))
    z1 = keras_bpq.Bernoulli(name="z1", seed=1)(dense(1, "d1", 1)(x))
    n = keras_bpq.Normal(name="n", seed=2)(dense(2, "dn", 2)(keras.layers.Concatenate()([z1, x])))
    z2 = keras_bpq.Bernoulli(name="z2", seed=3)(dense(1, "d2", 3)(n))
    cost = square_cost(dense(1, "dec", 4)(keras.layers.Concatenate()([z2, n])), x)
    return keras_bpq.BackpropQModel(inputs=x, outputs=z2, costs={"cost": cost}, name="mixed"), inputs()


def masked_categorical():
    """Bernoulli and masked Categorical nodes: x -> z1 (2 bits) -> c (4-way
    categorical: outcomes 0 and 1 always allowed, 2 only where z1[0] = 1, 3 only
    where x[0] > 0) -> z2 (1 bit) -> cost; c also feeds a cost of its own.
    Not in ALL: the graphs there serve every test of the catalogue."""
    x = keras.Input((INPUT_DIM,))
    z1 = keras_bpq.Bernoulli(name="z1", seed=1)(dense(2, "d1", 1)(x))
    allowed = keras.ops.concatenate(
        [keras.ops.ones_like(z1), z1[:, :1], keras.ops.cast(x[:, :1] > 0, z1.dtype)], axis=-1
    ) > 0.5
    c = keras_bpq.Categorical(name="c", seed=2)(
        dense(4, "dc", 2)(keras.layers.Concatenate()([z1, x])), mask=allowed
    )
    z2 = keras_bpq.Bernoulli(name="z2", seed=3)(dense(1, "d2", 3)(keras.layers.Concatenate()([c, x])))
    cost = square_cost(dense(2, "dec", 4)(keras.layers.Concatenate()([z2, c])), x)
    cost_c = square_cost(dense(1, "dec_c", 5)(c), x)
    model = keras_bpq.BackpropQModel(
        inputs=x, outputs=[c, z2], costs={"cost": cost, "cost_c": cost_c}, name="masked_categorical"
    )
    return model, inputs()


def factorised_categorical():
    """A Categorical node of two independent 3-way choices (logits and mask
    `[batch, 2, 3]`): x -> z1 (2 bits) -> g (outcome 2 of choice 1 allowed
    only where z1[0] = 1) -> z2 (1 bit) -> cost; g also feeds a cost of its
    own. Not in ALL: the graphs there serve every test of the catalogue."""
    x = keras.Input((INPUT_DIM,))
    z1 = keras_bpq.Bernoulli(name="z1", seed=1)(dense(2, "d1", 1)(x))
    ones = keras.ops.ones_like(z1)
    allowed = keras.ops.reshape(keras.ops.concatenate([ones, ones, ones[:, :1], z1[:, :1]], axis=-1) > 0.5, (-1, 2, 3))
    logits = keras.layers.Reshape((2, 3))(dense(6, "dg", 2)(keras.layers.Concatenate()([z1, x])))
    g = keras_bpq.Categorical(name="g", seed=2)(logits, mask=allowed)
    flat = keras.layers.Flatten()(g)
    z2 = keras_bpq.Bernoulli(name="z2", seed=3)(dense(1, "d2", 3)(keras.layers.Concatenate()([flat, x])))
    cost = square_cost(dense(2, "dec", 4)(keras.layers.Concatenate()([z2, flat])), x)
    cost_g = square_cost(dense(1, "dec_g", 5)(flat), x)
    model = keras_bpq.BackpropQModel(
        inputs=x, outputs=[g, z2], costs={"cost": cost, "cost_g": cost_g}, name="factorised_categorical"
    )
    return model, inputs()


ALL = {"chain": chain, "tree": tree, "dag": dag, "two_costs": two_costs, "mixed": mixed}


def walk_adjacency(seed, num_entities=10, out_degree=3):
    """A random graph: every entity links to itself and `out_degree` others."""
    rng = np.random.RandomState(seed)
    adjacency = np.eye(num_entities, dtype="float32")
    for e in range(num_entities):
        others = [o for o in range(num_entities) if o != e]
        adjacency[e, rng.choice(others, out_degree, replace=False)] = 1.0
    return adjacency


def walk_task(num_entities=10, out_degree=3, seed=0):
    """A goal-conditioned 2-hop walk over a random graph (the shape of
    knowledge-graph reasoning): each hop is a masked Categorical over the current
    entity's neighbours (itself included, as a "stay" action); the cost is 1
    unless the walk ends at the goal.

    Returns `(model, queries)`: queries are `[one_hot(start), one_hot(goal)]`
    rows for every goal reachable in at most two hops.
    """
    adjacency = walk_adjacency(seed, num_entities, out_degree)
    reach = ((adjacency @ adjacency) > 0)
    eye = np.eye(num_entities, dtype="float32")
    queries = np.array(
        [np.concatenate([eye[s], eye[g]]) for s in range(num_entities) for g in range(num_entities)
         if reach[s, g] and g != s],
        "float32",
    )
    x = keras.Input((2 * num_entities,))
    start, goal = x[:, :num_entities], x[:, num_entities:]
    allowed1 = keras.ops.matmul(start, adjacency) > 0
    hop1 = keras_bpq.Categorical(name="hop1", seed=1)(dense(num_entities, "policy1", 1)(x), mask=allowed1)
    allowed2 = keras.ops.matmul(hop1, adjacency) > 0
    features = keras.layers.Concatenate()([hop1, goal])
    hop2 = keras_bpq.Categorical(name="hop2", seed=2)(
        dense(num_entities, "policy2", 2)(features), mask=allowed2
    )
    miss = 1.0 - keras.ops.sum(hop2 * goal, axis=-1)
    model = keras_bpq.BackpropQModel(inputs=x, outputs=hop2, costs={"miss": miss}, name="walk")
    return model, queries
