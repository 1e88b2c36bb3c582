"""A two-layer sigmoid belief net (a discrete VAE) trained with keras_bpq.

Encoder q(z1 | x) q(z2 | z1) and decoder p(z2) p(z1 | z2) p(x | z1), with
Bernoulli latent layers. The per-example negative ELBO is the model's cost,
split into three named costs so each shows in the progress bar:

    recon = -log p(x | z1)
    kl1   = log q(z1 | x)  - log p(z1 | z2)
    kl2   = log q(z2 | z1) - log p(z2)

Data: scikit-learn's 8x8 digits (shipped with the wheel, no download),
dynamically binarised in the tf.data pipeline.

    python examples/sbn.py --steps=10000 --estimator=auto
    python examples/sbn.py --export_dir=serving/sbn/1  # then serve it (README)
"""

import time

from absl import app
from absl import flags
import keras
import numpy as np
import tensorflow as tf

import keras_bpq

FLAGS = flags.FLAGS


def define_flags():
    """Command-line flags, defined only when run as a script (so that importing
    this module next to another example does not redefine `--steps`)."""
    flags.DEFINE_integer("steps", 10000, "Training steps.")
    flags.DEFINE_integer("batch_size", 50, "Batch size.")
    flags.DEFINE_integer("z1", 32, "Units of the first latent layer.")
    flags.DEFINE_integer("z2", 16, "Units of the second latent layer.")
    flags.DEFINE_string("estimator", "auto", "Estimator for every node (see keras_bpq.estimators).")
    flags.DEFINE_float("learning_rate", 3e-3, "Adam learning rate.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_integer("steps_per_execution", 50, "Steps per compiled call.")
    flags.DEFINE_bool("jit_compile", False, "Compile the step with XLA (slower on small CPU models).")
    flags.DEFINE_string(
        "export_dir", "", "If set, export the trained model there as a SavedModel for TF Serving "
        "(a version folder, e.g. serving/sbn/1)."
    )


def load_digits(seed):
    """Digits scaled to [0, 1] probabilities, split 1500 train / 297 test."""
    from sklearn.datasets import load_digits as sk_digits

    images = sk_digits().data.astype("float32") / 16.0
    order = np.random.RandomState(seed).permutation(len(images))
    return images[order[:1500]], images[order[1500:]]


def binarised(images, batch_size, seed, repeat):
    """A tf.data pipeline drawing a fresh binarisation of every image each epoch.

    Batch `i` is binarised with the stateless seed `(seed, i)`, so the pipeline
    is reproducible even with parallel map calls."""
    ds = tf.data.Dataset.from_tensor_slices(images)
    if repeat:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.batch(batch_size).enumerate()

    def binarise(index, p):
        noise = tf.random.stateless_uniform(tf.shape(p), seed=tf.stack([tf.cast(seed, tf.int64), index]))
        return tf.cast(noise < p, tf.float32)

    ds = ds.map(binarise, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def bernoulli_log_prob(sample, logits):
    """log Bernoulli(sample | sigmoid(logits)), summed over units."""
    return keras.ops.sum(sample * logits - keras.ops.softplus(logits), axis=-1)


@keras.saving.register_keras_serializable(package="examples")
class PriorLogits(keras.layers.Layer):
    """Learned logits of the top prior p(z2), broadcast to the batch."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.logits = self.add_weight(shape=(self.units,), initializer="zeros", name="logits")

    def call(self, x):
        return keras.ops.zeros((keras.ops.shape(x)[0], self.units)) + self.logits

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def build_sbn(pixels, z1_units, z2_units):
    x = keras.Input((pixels,), name="x")
    q1 = keras.layers.Dense(z1_units, name="q_z1")(x)
    z1 = keras_bpq.Bernoulli(name="z1")(q1)
    q2 = keras.layers.Dense(z2_units, name="q_z2")(z1)
    z2 = keras_bpq.Bernoulli(name="z2")(q2)
    p2 = PriorLogits(z2_units, name="p_z2")(x)
    p1 = keras.layers.Dense(z1_units, name="p_z1")(z2)
    px = keras.layers.Dense(pixels, name="p_x")(z1)
    costs = {
        "recon": -bernoulli_log_prob(x, px),
        "kl1": bernoulli_log_prob(z1, q1) - bernoulli_log_prob(z1, p1),
        "kl2": bernoulli_log_prob(z2, q2) - bernoulli_log_prob(z2, p2),
    }
    return keras_bpq.BackpropQModel(inputs=x, outputs=px, costs=costs, name="sbn")


def main(argv):
    del argv
    keras.utils.set_random_seed(FLAGS.seed)
    train, test = load_digits(FLAGS.seed)
    model = build_sbn(train.shape[1], FLAGS.z1, FLAGS.z2)
    model.compile(
        optimizer=keras.optimizers.Adam(FLAGS.learning_rate),
        estimator=FLAGS.estimator,
        steps_per_execution=FLAGS.steps_per_execution,
        jit_compile=FLAGS.jit_compile,
    )
    model.scg_summary()
    steps_per_epoch = 500
    start = time.time()
    model.fit(
        binarised(train, FLAGS.batch_size, FLAGS.seed, repeat=True),
        epochs=max(1, FLAGS.steps // steps_per_epoch),
        steps_per_epoch=min(steps_per_epoch, FLAGS.steps),
        shuffle=False,  # the pipeline shuffles
        verbose=2,
    )
    seconds = time.time() - start
    results = {}
    for split, images in (("train", train), ("test", test)):
        # Average over several binarisations and latent samples.
        data = binarised(np.tile(images, (10, 1)), 500, FLAGS.seed + 1, repeat=False)
        results[split] = model.evaluate(data, verbose=0, return_dict=True)["loss"]
    print(f"trained {FLAGS.steps} steps in {seconds:.1f}s ({FLAGS.steps / seconds:.0f} steps/s)")
    print(f"train negative ELBO: {results['train']:.3f} nats")
    print(f"test negative ELBO:  {results['test']:.3f} nats")
    if FLAGS.export_dir:
        model.export(FLAGS.export_dir)


if __name__ == "__main__":
    define_flags()
    app.run(main)
