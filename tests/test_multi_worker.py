"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1.

Each test starts both workers (free ports, their own `TF_CONFIG`), trains a
bounded number of steps and waits under a time limit.
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np

import graphs

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
TIMEOUT = 240

WORKER = textwrap.dedent(
    """
    import json, os, shutil, sys
    sys.path.insert(0, {tests!r})
    import numpy as np, tensorflow as tf, keras
    import graphs
    out = sys.argv[1]
    config = json.loads(os.environ["TF_CONFIG"])
    index = config["task"]["index"]
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING))
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model, x = graphs.chain()
        # z1: an EMA baseline; z1, z2: learned critics with target copies; z3: exact heads.
        model.compile(optimizer=keras.optimizers.Adam(0.05), estimator={{"z1": "reinforce", "z2": "critic_cv"}},
                      steps_per_execution=1)
    model.build_training_state()
    start = [v.numpy() for v in model.weights]
    data = tf.data.Dataset.from_tensor_slices(np.tile(x, (4, 1))).repeat().batch(8)  # 4 rows a worker
    history = model.fit(data, steps_per_epoch=4, epochs=2, validation_data=data,
                        validation_steps=2, shuffle=False, verbose=0)
    variables = model.weights + model.optimizer.variables + model.critic_optimizer.variables
    np.savez(os.path.join(out, f"worker{{index}}.npz"), *[v.numpy() for v in variables])
    np.savez(os.path.join(out, f"start{{index}}.npz"), *start)
    # Keras' multi-worker pattern: every worker saves, only the chief's file stays.
    model_dir = os.path.join(out, "model")
    target = model_dir if index == 0 else os.path.join(model_dir, f".worker_{{index}}")
    os.makedirs(target, exist_ok=True)
    model.save(os.path.join(target, "model.keras"))
    if index != 0:
        shutil.rmtree(target)
    with open(os.path.join(out, f"worker{{index}}.json"), "w") as f:
        json.dump({{"history": history.history, "steps": int(model.training_state.steps.numpy()),
                   "replicas": strategy.num_replicas_in_sync}}, f)
    """
).format(tests=str(TESTS))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(argv, logs, num_workers=2):
    """Runs `argv` once per worker with its TF_CONFIG (output to `logs/worker<i>.log`)."""
    cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(num_workers)]}
    processes, files = [], []
    for index in range(num_workers):
        config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CONFIG=json.dumps(config), TF_CPP_MIN_LOG_LEVEL="2")
        files.append(open(logs / f"worker{index}.log", "w"))
        processes.append(subprocess.Popen(argv, env=env, stdout=files[-1], stderr=subprocess.STDOUT, cwd=ROOT))
    deadline = time.time() + TIMEOUT
    try:
        # A failed worker leaves the other waiting on collectives: stop early.
        while time.time() < deadline and any(p.poll() is None for p in processes):
            if any(p.poll() not in (None, 0) for p in processes):
                break
            time.sleep(0.2)
    finally:
        for p, f in zip(processes, files):
            if p.poll() is None:
                p.kill()
            p.wait()
            f.close()
    for index, p in enumerate(processes):
        output = (logs / f"worker{index}.log").read_text()
        assert p.returncode == 0, f"worker {index} exited with {p.returncode}:\n{output[-3000:]}"


def test_two_workers_train_one_model_and_only_the_chief_checkpoints(tmp_path):
    run_workers([sys.executable, "-c", WORKER, str(tmp_path)], tmp_path)
    logs = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(2)]
    assert logs[0]["replicas"] == 2
    assert logs[0]["steps"] == logs[1]["steps"] == 8
    # Progress-bar metrics are global: both workers report the same numbers.
    assert logs[0]["history"] == logs[1]["history"]
    assert np.isfinite(logs[0]["history"]["loss"]).all()
    for key in ("cost", "z2_critic_loss", "val_loss", "val_cost", "val_z2_critic_loss"):
        assert key in logs[0]["history"], sorted(logs[0]["history"])

    final = [np.load(tmp_path / f"worker{i}.npz") for i in range(2)]
    start = [np.load(tmp_path / f"start{i}.npz") for i in range(2)]
    assert final[0].files == final[1].files
    for key in final[0].files:
        np.testing.assert_allclose(final[0][key], final[1][key], rtol=1e-6, atol=1e-7, err_msg=key)
    for key in start[0].files:
        np.testing.assert_array_equal(start[0][key], start[1][key])
    assert any(not np.allclose(start[0][k], final[0][k]) for k in start[0].files)

    assert sorted(os.listdir(tmp_path / "model")) == ["model.keras"]
    model = keras.saving.load_model(tmp_path / "model" / "model.keras")
    variables = model.weights + model.optimizer.variables + model.critic_optimizer.variables
    assert len(variables) == len(final[0].files)
    for i, v in enumerate(variables):
        np.testing.assert_array_equal(v.numpy(), final[0][f"arr_{i}"], err_msg=v.path)
    assert int(model.training_state.steps.numpy()) == 8
    model.fit(np.tile(graphs.inputs(), (4, 1)), batch_size=4, epochs=1, verbose=0)
    assert int(model.training_state.steps.numpy()) == 11


def test_readme_multi_worker_command_trains_two_local_workers(tmp_path):
    """The README's "Scaling out" command, with fewer steps."""
    section = (ROOT / "README.md").read_text().split("## Scaling out", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"^python examples/multi_worker\.py --workers=2 .*$", section, re.M).group(0)
    args = command.split()[2:]
    args = [a for a in args if not a.startswith(("--steps=", "--model_dir="))]
    args += ["--steps=20", "--steps_per_execution=10", f"--model_dir={tmp_path}"]
    result = subprocess.run(
        [sys.executable, "examples/multi_worker.py"] + args, cwd=ROOT, capture_output=True,
        text=True, timeout=TIMEOUT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    reports = re.findall(r"worker (\d) of 2: (\d+) steps, loss \S+, weights (\w+)", result.stdout)
    assert sorted(r[0] for r in reports) == ["0", "1"], result.stdout
    assert {r[1] for r in reports} == {"20"}
    assert reports[0][2] == reports[1][2]
    assert sorted(os.listdir(tmp_path)) == ["model.keras"]
