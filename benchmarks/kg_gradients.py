"""Knowledge-graph agent: how large and how repeatable each hop's gradient is.

For each estimator (`examples/kg_reasoning.py --estimator` values) and one
fixed training batch of a freshly initialised agent, draws `--draws` forward
passes and takes the gradient of each hop's own surrogate `mean L_hop` with
respect to the actor's variables. Reports, per hop, the mean gradient norm per
draw, the mean cosine between draws (near 1 the hop's gradient is the same
direction every draw, little sampling noise; near 0 it is mostly noise) and
the total variance over the draws (the sum of every parameter's variance). The
two hops share the policy's variables, so under Adam the larger one sets the
step normalisation of the other.

    python benchmarks/kg_gradients.py --dataset=kinship
    python benchmarks/kg_gradients.py --dataset=umls --estimators=minerva,auto,rloo
    python benchmarks/kg_gradients.py --dataset=umls --estimators=auto,critic_cv_nodev --draws=16

Writes `<out_dir>/kg_gradients_<dataset>.json` and prints a markdown table.
"""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import common  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

ROOT = pathlib.Path(common.ROOT)
kg_reasoning = common.example("kg_reasoning")

# Shared with the example (defined there): --dataset, --batch_size, --rollouts, --seed.
FLAGS = flags.FLAGS
flags.DEFINE_list("estimators", ["minerva", "auto"], "Estimators (kg_reasoning --estimator values).")
flags.DEFINE_integer("draws", 4, "Forward passes on the same batch.")
flags.DEFINE_string("out_dir", str(ROOT / "benchmarks" / "results"), "Where the json goes.")


def hop_gradients(agent, batch, draws):
    """`{hop: [draws, num_params]}` gradients of each hop's mean surrogate."""
    model = agent.model
    out = {}
    for _ in range(draws):
        with tf.GradientTape(persistent=True) as tape:
            forward = model.run_forward(batch)
            losses = {
                name: tf.reduce_mean(model.node_estimators[name].surrogate(step))
                for name, step in forward.steps.items()
            }
        for name, loss in losses.items():
            grads = tape.gradient(loss, model.actor_variables)
            flat = [tf.reshape(tf.convert_to_tensor(g), [-1]) for g in grads if g is not None]
            out.setdefault(name, []).append(tf.concat(flat, 0).numpy())
        del tape
    return {name: np.stack(rows) for name, rows in out.items()}


def summarise(grads):
    norms = np.linalg.norm(grads, axis=1)
    unit = grads / np.maximum(norms[:, None], 1e-30)
    cosine = unit @ unit.T
    pairs = cosine[np.triu_indices(len(grads), k=1)]
    return {"norm": float(norms.mean()), "cosine": float(pairs.mean()),
            "variance": float(grads.var(axis=0, ddof=1).sum())}


def main(argv):
    del argv
    kg = kg_reasoning.load_graph(FLAGS.dataset)
    batch = next(iter(kg_reasoning.train_dataset(kg, FLAGS.batch_size, FLAGS.seed)))[0]
    rows = []
    for estimator in FLAGS.estimators:
        agent = kg_reasoning.build_agent(kg, seed=FLAGS.seed)
        kg_reasoning.compile_agent(agent, estimator, FLAGS.rollouts)
        agent.model.build_training_state()
        for hop, grads in hop_gradients(agent, batch, FLAGS.draws).items():
            rows.append({"estimator": estimator, "hop": hop, **summarise(grads)})
    result = {"command": common.command_line(), "dataset": FLAGS.dataset, "batch_size": FLAGS.batch_size,
              "rollouts": FLAGS.rollouts, "seed": FLAGS.seed, "draws": FLAGS.draws, "rows": rows}
    common.write_json(os.path.join(FLAGS.out_dir, f"kg_gradients_{FLAGS.dataset}.json"), result)
    print("| estimator | hop | gradient norm per draw | mean cosine between draws | total variance |\n"
          "|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['estimator']} | {r['hop']} | {r['norm']:.2e} | {r['cosine']:.2f} | {r['variance']:.3g} |")


if __name__ == "__main__":
    app.run(main)
