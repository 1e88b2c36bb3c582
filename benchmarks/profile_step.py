"""Time per training step of the default estimator against reinforce, and where
the default's step spends it.

The model is benchmarks/sbn.py's (`--dataset`, `--arch`; defaults here:
Fashion-MNIST, two-layer, batch 50). Every timing runs `--iterations` calls in
one `tf.function` loop (or `fit` with steps_per_execution 50 for whole steps)
on fixed binarised batches, so neither Python nor tf.data is in it; each is the
best of `--repeats` rounds, and the estimators alternate within a round, so a
ratio compares times taken minutes apart at most.

Pieces of the default's step (`--breakdown`), each timed alone:

* `forward`: the recorded forward pass (sampling and costs);
* `exact <node>` / `learned <node>`: a forward pass and the node's exact heads
  (costs re-evaluated downstream at the sample and its one-unit flips), or its
  learned critic heads at the same outcomes;
* `forward + critics`: critic targets, loss and gradient;
* `forward + surrogate + backward`: every node's surrogate (all of the above
  heads) and the actor's gradient.

    python benchmarks/profile_step.py --dataset=fashion_mnist --arch=two_layer

`--breakdown_of=critic_cv_units<S>` (with it in --compare) breaks down
`estimators.CriticCV(units=S)`'s step instead, its heads at S + 1 outcomes.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import common  # noqa: E402
from keras_bpq import estimators  # noqa: E402
from keras_bpq import q_values  # noqa: E402

sbn = common.sbn_benchmark()  # benchmarks/sbn.py: flags, data and models

FLAGS = flags.FLAGS
flags.DEFINE_list("compare", ["reinforce", "auto"], "Estimators whose whole steps are timed.")
flags.DEFINE_integer("fit_steps", 200, "Steps per timed fit (whole steps).")
flags.DEFINE_integer("iterations", 20, "Calls per timed loop (pieces).")
flags.DEFINE_integer("repeats", 3, "Timed rounds (best reported).")
flags.DEFINE_bool("breakdown", True, "Also time the pieces of the default's step.")
flags.DEFINE_string(
    "breakdown_of", "auto",
    "The --compare estimator whose step is broken down: 'auto', or 'critic_cv_units<S>' (its local "
    "sums over S random units per node).")


def batches(train, count, seed):
    images = train[np.random.RandomState(seed).permutation(len(train))[: count * FLAGS.batch_size]]
    return common.fixed_binarisation(images, seed).reshape(count, FLAGS.batch_size, -1)


def loop(fn, jit):
    """`fn(x)` `--iterations` times in one compiled loop; returns seconds per call."""

    @tf.function(jit_compile=jit)
    def run(x):
        total = tf.constant(0.0)
        for _ in tf.range(FLAGS.iterations):
            total += tf.add_n([tf.reduce_sum(t) for t in tf.nest.flatten(fn(x))])
        return total

    def timed(x):
        run(x).numpy()  # trace and warm up
        return common.best_of(lambda: run(x).numpy(), FLAGS.repeats) / FLAGS.iterations

    return timed


def pieces(model, x, units=None):
    """`{name: x -> tensors}` for the pieces of one critic_cv step (local sums
    over `units` random units per node, None: all)."""
    scg = model.scg(x)

    def forward(x):
        return model.record_forward(x)[2]

    def heads(info, kind):
        def fn(x):
            _, _, _, records = model.record_forward(x)
            record = records[info.name]
            step = estimators.NodeStep(info=info, record=record, downstream=None, state=estimators.NoState())
            values = estimators.local_outcomes(step, units)[0].with_first(record.sample)
            context = q_values.context(info, x, records)
            if kind == "learned":
                return model.training_state.critics[info.name].q_outcomes(context, values, target=True)
            exact = tuple(c for c in info.costs if scg.cost_ancestors[c][-1] == info.name)
            forced = {n: context[n] for n in info.context if n != "inputs"}
            return model.q_function.downstream_evaluator(info, exact)(x, forced, values, training=True)

        return fn

    def critics(x):
        out = model.run_forward(x)
        return model.critic_set().evaluate(out, with_gradient=True).grads

    def backward(x):
        with tf.GradientTape() as tape:
            out = model.run_forward(x)
            loss = tf.reduce_mean(out.surrogate)
        return tape.gradient(loss, model.actor_variables)

    result = {"forward": forward}
    for info in scg.nodes:
        result[f"exact {info.name}"] = heads(info, "exact")
        if info.name in model.training_state.critics:
            result[f"learned {info.name}"] = heads(info, "learned")
    result["forward + critics"] = critics
    result["forward + surrogate + backward"] = backward
    return result


def main(argv):
    del argv
    keras.utils.set_random_seed(0)
    train, _ = common.load_data(FLAGS.dataset, 0)
    data = batches(train, 20, 0)
    pixels = train.shape[1]
    print(f"{FLAGS.dataset} {FLAGS.arch}, batch {FLAGS.batch_size}; load {os.getloadavg()}")
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
        if not FLAGS.breakdown or FLAGS.breakdown_of not in models:
            continue
        model = models[FLAGS.breakdown_of]
        units = getattr(sbn.estimator_option(FLAGS.breakdown_of), "units", None)  # CriticCV(units=S)
        x = tf.constant(data[0])
        print(f"  pieces of the {FLAGS.breakdown_of} step (each alone, {FLAGS.iterations} calls per loop):")
        for name, fn in pieces(model, x, units).items():
            seconds = loop(fn, jit)(x)
            print(f"    {name:<32} {1e3 * seconds:8.2f} ms")


if __name__ == "__main__":
    flags.FLAGS.set_default("dataset", "fashion_mnist")
    app.run(main)
