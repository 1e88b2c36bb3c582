"""The sigmoid belief net of examples/sbn.py on several workers (MultiWorkerMirroredStrategy).

Two local worker processes, one command (it picks free ports on 127.0.0.1,
starts one process per worker with its `TF_CONFIG`, and waits for them):

    python examples/multi_worker.py --workers=2 --steps=1000 --model_dir=/tmp/sbn_multi_worker

On a real cluster, set `TF_CONFIG` on every machine (the same `cluster`, each
its own `task`) and run the same script there without `--workers`:

    TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]},
                "task": {"type": "worker", "index": 0}}' \
        python examples/multi_worker.py --steps=1000 --model_dir=/shared/sbn

Every worker trains the same model on its share of each global batch of
`--batch_size` examples. Only the chief (worker 0) keeps the checkpoint
`<model_dir>/model.keras`; the other workers save to a temporary folder that
they delete, as Keras' multi-worker guide does. Each worker prints a
fingerprint of its final weights: all of them must agree.
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sbn import binarised  # noqa: E402
from sbn import build_sbn  # noqa: E402
from sbn import define_flags  # noqa: E402  (--steps, --batch_size, ... of examples/sbn.py)
from sbn import load_digits  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer(
    "workers", 0, "Start this many local worker processes on 127.0.0.1 and wait for them; "
    "0: run as one worker of the cluster described by $TF_CONFIG."
)
flags.DEFINE_string("model_dir", "/tmp/sbn_multi_worker", "Where the chief saves model.keras.")
flags.DEFINE_integer("timeout", 600, "Seconds the local workers may run (with --workers).")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(num_workers):
    """Runs `num_workers` copies of this script, each with its own TF_CONFIG."""
    cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(num_workers)]}
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg.startswith(("--workers=", "--noworkers")):
            skip = False
        elif arg == "--workers":
            skip = True  # its value follows
        else:
            args.append(arg)
    processes = []
    for index in range(num_workers):
        config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CONFIG=json.dumps(config))
        processes.append(subprocess.Popen([sys.executable, os.path.abspath(__file__)] + args, env=env))
    deadline = time.time() + FLAGS.timeout
    codes = [None] * num_workers
    while None in codes and time.time() < deadline:
        codes = [p.poll() for p in processes]
        if any(c not in (None, 0) for c in codes):
            break  # a failed worker leaves the others waiting on collectives
        time.sleep(0.2)
    for p in processes:
        if p.poll() is None:
            p.kill()
    codes = [p.wait() for p in processes]
    if any(codes):
        sys.exit(f"workers exited with {codes} (timeout {FLAGS.timeout}s)")
    print(f"{num_workers} workers done; checkpoint: {os.path.join(FLAGS.model_dir, 'model.keras')}")


def fingerprint(model):
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()[:16]


def train():
    tf.get_logger().setLevel("WARNING")  # one INFO line per collective otherwise
    config = json.loads(os.environ["TF_CONFIG"])
    index = int(config["task"]["index"])
    is_chief = config["task"]["type"] == "chief" or (
        index == 0 and "chief" not in config["cluster"]
    )
    # RING collectives work on CPUs and GPUs alike (AUTO picks NCCL on GPUs).
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING
        )
    )
    keras.utils.set_random_seed(FLAGS.seed)
    train_images, _ = load_digits(FLAGS.seed)
    with strategy.scope():
        model = build_sbn(train_images.shape[1], FLAGS.z1, FLAGS.z2)
        model.compile(
            optimizer=keras.optimizers.Adam(FLAGS.learning_rate),
            estimator=FLAGS.estimator,
            steps_per_execution=min(FLAGS.steps_per_execution, FLAGS.steps),
        )
    steps_per_epoch = min(500, FLAGS.steps)
    history = model.fit(
        # The global batch; each worker trains on its shard of it.
        binarised(train_images, FLAGS.batch_size, FLAGS.seed, repeat=True),
        epochs=max(1, FLAGS.steps // steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        shuffle=False,  # the pipeline shuffles
        verbose=2 if is_chief else 0,
    )
    # Every worker saves (saving may need every worker); only the chief's stays.
    target = FLAGS.model_dir if is_chief else os.path.join(FLAGS.model_dir, f".worker_{index}")
    os.makedirs(target, exist_ok=True)
    model.save(os.path.join(target, "model.keras"))
    if not is_chief:
        shutil.rmtree(target)
    steps = int(model.training_state.steps.numpy())
    print(
        f"worker {index} of {len(config['cluster']['worker'])}: {steps} steps, loss "
        f"{history.history['loss'][-1]:.4f}, weights {fingerprint(model)}",
        flush=True,
    )
    # The chief hosts the cluster's coordination service: let the others
    # disconnect first (a worker still connected to a gone chief logs an error).
    strategy.reduce(tf.distribute.ReduceOp.SUM, tf.constant(1.0), axis=None)  # a barrier
    if is_chief:
        time.sleep(2.0)


def main(argv):
    del argv
    if FLAGS.workers:
        if "TF_CONFIG" in os.environ:
            sys.exit("Pass either --workers (local workers) or $TF_CONFIG, not both.")
        launch(FLAGS.workers)
    elif "TF_CONFIG" not in os.environ:
        sys.exit("Set $TF_CONFIG (one worker of a cluster) or pass --workers=2 (local workers).")
    else:
        train()


if __name__ == "__main__":
    define_flags()
    app.run(main)
