"""Serve a stochastic policy, log what it did, learn a better one from the log.

The loop a recommender runs, on scikit-learn's digits as a contextual bandit
(the action is a class; reward 1 when it names the image's class, cost =
-reward):

1. train a weak logging policy with keras_bpq (a `Categorical` node trained
   online on 60 labelled images) and export it as a SavedModel;
2. serve it in a fresh Python process that never imports keras_bpq (as TF
   Serving would): for every training image it returns the action and
   `action_log_prob`, the log-probability of the action it served;
3. log `(image, action, propensity = exp(action_log_prob), cost)`;
4. learn a new policy from the log alone with `keras_bpq.logged.LoggedModel`
   and the doubly robust estimator, and export it;
5. serve both exports on the test images in a fresh process and print their
   rewards.

    python examples/serve_log_learn.py
    python examples/serve_log_learn.py --out_dir=serving  # keeps serving/{logging,learned}/1
"""

import os
import subprocess
import sys
import tempfile

from absl import app
from absl import flags
import keras
import numpy as np

import keras_bpq
from keras_bpq import logged

FLAGS = flags.FLAGS
CLASSES = 10

# Runs in a fresh process: TensorFlow only, as a serving system would.
SERVE = r'''
import sys
import numpy as np
import tensorflow as tf

path, inputs, out = sys.argv[1:4]
served = tf.saved_model.load(path).signatures["serving_default"](x=tf.constant(np.load(inputs)))
assert "keras_bpq" not in sys.modules
np.savez(out, action=served["action"].numpy(), log_prob=served["action_log_prob"].numpy())
'''


def define_flags():
    flags.DEFINE_string("out_dir", "", "Where the two SavedModels go (default: a temporary folder).")
    flags.DEFINE_integer("logging_images", 60, "Labelled images the logging policy is trained on.")
    flags.DEFINE_float("logging_learning_rate", 0.01, "Adam learning rate of the logging policy (low: it keeps exploring).")
    flags.DEFINE_integer("epochs", 20, "Epochs over the log.")
    flags.DEFINE_integer("seed", 0, "Random seed.")


def cost_of_action(labels, action):
    """The per-example cost `-reward` of a one-hot action given one-hot labels."""
    return -keras.ops.sum(labels * action, axis=-1)


def policy_model(features):
    x = keras.Input((features,), name="x")
    action = keras_bpq.Categorical(name="action")(keras.layers.Dense(CLASSES, name="logits")(x))
    return keras_bpq.BackpropQModel(inputs=x, outputs=action)


def serve(path, images, workdir):
    """`(one-hot actions, log-probabilities)` served by the SavedModel at `path`,
    from a process that never imports keras_bpq."""
    inputs, out = os.path.join(workdir, "inputs.npy"), os.path.join(workdir, "served.npz")
    np.save(inputs, images)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-c", SERVE, path, inputs, out], check=True, env=env, cwd=workdir)
    served = np.load(out)
    return served["action"], served["log_prob"]


def main(argv):
    del argv
    from sklearn.datasets import load_digits

    keras.utils.set_random_seed(FLAGS.seed)
    digits = load_digits()
    order = np.random.RandomState(FLAGS.seed).permutation(len(digits.target))
    images = digits.data.astype("float32")[order] / 16.0
    labels = np.eye(CLASSES, dtype="float32")[digits.target[order]]
    train, test = slice(0, 1500), slice(1500, None)
    workdir = tempfile.mkdtemp(prefix="serve_log_learn_")
    out_dir = FLAGS.out_dir or workdir
    paths = {name: os.path.join(out_dir, name, "1") for name in ("logging", "learned")}

    # 1. A weak logging policy, trained online with keras_bpq (its cost is a
    # compiled loss of the labels), then exported.
    logging_policy = policy_model(images.shape[1])
    logging_policy.compile(optimizer=keras.optimizers.Adam(FLAGS.logging_learning_rate), loss=cost_of_action,
                           jit_compile=True)
    few = slice(0, FLAGS.logging_images)
    logging_policy.fit(images[few], labels[few], batch_size=20, epochs=5, verbose=0)
    logging_policy.export(paths["logging"], verbose=False)

    # 2-3. Serve it without keras_bpq and log what it did.
    action, log_prob = serve(paths["logging"], images[train], workdir)
    log = {
        "action": action,
        "propensity": np.exp(log_prob),
        "cost": keras.ops.convert_to_numpy(cost_of_action(labels[train], action)),
    }

    # 4. Learn a new policy from the log alone (doubly robust), and export it.
    policy = policy_model(images.shape[1])
    learner = logged.LoggedModel(policy, node="action", estimator=logged.DoublyRobust())
    learner.compile(optimizer=keras.optimizers.Adam(0.01), jit_compile=True)
    learner.fit(images[train], log, batch_size=100, epochs=FLAGS.epochs, verbose=0)
    estimate = -learner.evaluate(images[train], log, verbose=0, return_dict=True)["loss"]
    policy.export(paths["learned"], verbose=False)

    # 5. Both exports, served on the test images.
    rewards = {}
    for name, path in paths.items():
        served, _ = serve(path, images[test], workdir)
        rewards[name] = -float(np.mean(keras.ops.convert_to_numpy(cost_of_action(labels[test], served))))
    print(f"logged {len(log['cost'])} rows; reward of the logged actions: {-log['cost'].mean():.3f}")
    print(f"doubly robust estimate of the learned policy's reward (on the log): {estimate:.3f}")
    print(f"served on {len(labels[test])} test images: logging policy reward {rewards['logging']:.3f}, "
          f"learned policy reward {rewards['learned']:.3f}")
    print(f"SavedModels: {paths['logging']} and {paths['learned']}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
