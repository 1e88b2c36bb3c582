"""The package's training step against a hand-written TF step of the same estimator.

Issue 16, target 3 ("zero overhead"): `reinforce`, `rloo` (K = --rloo_k) and
`disarm` trained by `BackpropQModel.fit` should cost at most 1.15x a plain
TensorFlow step of the same estimator on the same model and data.

Models: benchmarks/sbn.py's Fashion-MNIST sigmoid belief nets (`--archs`:
`linear` 784-200, `two_layer` 784-200-200; batch --batch_size), its data
(`common.load_data`, binarised once by `profile_step.batches`: fixed batches in
memory, served by `tf.data` with autotuning off).

Arms, all in this process, on the same batches:

* `package`: `sbn.build_sbn` compiled with the estimator, Adam, `jit_compile=True`
  and `steps_per_execution=--steps_per_execution`, trained with `fit`;
* `hand`: `HandSBN`, the same network as plain TF ops on its own variables
  (initial values copied from the package's model), the estimator written out
  with `tf.GradientTape` and `keras.optimizers.Adam`; the step is a
  `tf.function(jit_compile=True)`, called `--steps_per_execution` times per call
  of an outer `tf.function` that reads the batches from the same `tf.data`
  iterator, as Keras does;
* `hand_fit` (`--hand_fit`): the hand-written step as the `train_step` of a
  plain `keras.Model` trained with `fit` (same compile settings), which
  separates Keras' `fit` machinery from the package's own step.

Steady-state time per step, wall-clock and this process's CPU time: clocks read
at the end of every execution (a callback's `on_train_batch_end` in `fit`;
after each outer call, synchronised by reading its result, for `hand`),
`(last - first) / steps between`, so neither the compile nor `fit`'s set-up and
tear-down is in it. On a shared machine `--threads=1` makes the CPU time the
steadier figure. `--hlo` also compares the optimised XLA HLO of one step of
each (instructions, fusions, bytes copied, is-finite operations), which no
other process disturbs. Compile time is the
first call's wall time less its steady steps, reported on its own. The arms
alternate within each of --rounds rounds (A B C A B C ...); the report gives
each arm's median and the median of the per-round ratios package / hand, with
the load average around every round.

    nice -n 10 python benchmarks/overhead.py

Writes --out_dir/overhead.json and overhead.md (rendered from the JSON by
`render.overhead`; the "notes" of an earlier JSON of the same name are kept).
"""

import json
import os
import re
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import common  # noqa: E402
import render  # noqa: E402

from keras_bpq import estimators  # noqa: E402

# benchmarks/profile_step.py (its batches; it loads benchmarks/sbn.py: flags,
# data and models).
import profile_step  # noqa: E402

sbn = profile_step.sbn
bernoulli_log_prob = sbn.bernoulli_log_prob  # examples/sbn.py's

FLAGS = flags.FLAGS
flags.DEFINE_list("archs", ["linear", "two_layer"], "SBN architectures (benchmarks/sbn.py).")
flags.DEFINE_list("overhead_estimators", ["reinforce", "rloo", "disarm"], "Estimators compared.")
flags.DEFINE_integer("steps_per_execution", 50, "Steps per compiled call, every arm.")
flags.DEFINE_integer("executions", 10, "Compiled calls per timed run (steady time: the last executions - 1).")
flags.DEFINE_integer("rounds", 7, "Interleaved rounds (medians reported).")
flags.DEFINE_integer("num_batches", 20, "Distinct binarised batches cycled through.")
flags.DEFINE_bool("hand_fit", True, "Also time the hand-written step inside a plain keras.Model's fit.")
flags.DEFINE_integer(
    "threads", 0, "TF intra- and inter-op threads (0: TensorFlow's default, every core). 1 makes the CPU "
    "time per step nearly independent of other processes on a shared machine.")
flags.DEFINE_bool(
    "hlo", True, "Also compare the optimised XLA HLO of one package step and one hand-written step "
    "(load-independent: instructions, fusions, bytes copied, finiteness checks).")
flags.DEFINE_string("out_name", "overhead", "Output files <out_name>.json and .md in --out_dir.")

# Costs each node influences (C_X) in sbn.build_sbn's networks; checked against
# the package's SCG before timing.
NODE_COSTS = {
    "linear": {"z1": ("recon", "kl1")},
    "two_layer": {"z1": ("recon", "kl1", "kl2"), "z2": ("kl1", "kl2")},
}


class HandSBN:
    """sbn.build_sbn's network and an estimator as plain TF ops.

    Costs (examples/sbn.py): `recon = -log p(x | z1)`, `kl<i> = log q(z<i> | .)
    - log p(z<i> | .)`; node `z<i>` draws `z = 1[u < sigmoid(logits)]`, `u ~ U(0, 1)`
    from a Philox `tf.random.Generator`.
    Surrogates, summed over nodes with `c_X` the node's downstream costs:

    * reinforce: `log q(z) sg[c_X - b]`, `b` the bias-corrected EMA of past
      batch means of `c_X` (`estimators.Reinforce`'s decay);
    * rloo: `log q(z_k) sg[c_X,k - mean_{j != k} c_X,j]` over K draws per example;
    * disarm: per unit, `sg[1/2 (f(z) - f(z~)) (-1)^{z~} 1[z != z~] sigmoid(|logits|)] logits`,
      `z~ = 1[1 - u < sigmoid(logits)]` the antithetic sample from the same `u`,
      `f(z~)` the downstream costs with the node forced to `z~` and later nodes
      drawn afresh.

    `step(x)` is one Adam step on `mean(total + surrogate)`; it returns the
    batch mean of the total cost.
    """

    def __init__(self, model, arch, estimator, num_samples, learning_rate, seed):
        self.arch, self.estimator, self.num_samples = arch, estimator, num_samples

        def copy(layer, attribute):
            return keras.Variable(getattr(model.get_layer(layer), attribute).numpy(), name=f"{layer}_{attribute}")

        self.w_q1, self.b_q1 = copy("q_z1", "kernel"), copy("q_z1", "bias")
        self.w_x, self.b_x = copy("p_x", "kernel"), copy("p_x", "bias")
        self.variables = [self.w_q1, self.b_q1, self.w_x, self.b_x]
        if arch == "two_layer":
            self.w_q2, self.b_q2 = copy("q_z2", "kernel"), copy("q_z2", "bias")
            self.w_p1, self.b_p1 = copy("p_z1", "kernel"), copy("p_z1", "bias")
            self.prior = copy("p_z2", "logits")
            self.variables += [self.w_q2, self.b_q2, self.w_p1, self.b_p1, self.prior]
        else:
            self.prior = copy("p_z1", "logits")
            self.variables.append(self.prior)
        self.optimizer = keras.optimizers.Adam(learning_rate)
        self.optimizer.build(self.variables)
        self.generator = tf.random.Generator.from_seed(seed, alg="philox")
        self.decay = estimators.Reinforce().decay
        self.node_costs = NODE_COSTS[arch]
        self.baseline = {n: keras.Variable(0.0, name=f"{n}_baseline") for n in self.node_costs}
        self.baseline_steps = keras.Variable(0.0, name="baseline_steps")

    def uniform(self, like):
        return self.generator.uniform(tf.shape(like))

    def forward(self, x, noise=None, forced=None):
        """`(costs, logits, samples)`: per-example costs and each node's logits
        and sample; `noise[n]` is node n's uniform noise, `forced[n]` its sample."""
        noise, forced = noise or {}, forced or {}
        logits, samples = {}, {}

        def node(name, node_logits):
            logits[name] = node_logits
            if name in forced:
                samples[name] = forced[name]
            else:
                u = noise[name] if name in noise else self.uniform(node_logits)
                samples[name] = tf.cast(u < tf.sigmoid(node_logits), tf.float32)
            return samples[name]

        z1 = node("z1", tf.matmul(x, self.w_q1) + self.b_q1)
        px = tf.matmul(z1, self.w_x) + self.b_x
        costs = {"recon": -bernoulli_log_prob(x, px)}
        if self.arch == "two_layer":
            z2 = node("z2", tf.matmul(z1, self.w_q2) + self.b_q2)
            p1 = tf.matmul(z2, self.w_p1) + self.b_p1
            costs["kl1"] = bernoulli_log_prob(z1, logits["z1"]) - bernoulli_log_prob(z1, p1)
            costs["kl2"] = bernoulli_log_prob(z2, logits["z2"]) - bernoulli_log_prob(z2, self.prior)
        else:
            costs["kl1"] = bernoulli_log_prob(z1, logits["z1"]) - bernoulli_log_prob(z1, self.prior)
        return costs, logits, samples

    def downstream(self, costs, name):
        return tf.add_n([costs[c] for c in self.node_costs[name]])

    def surrogate(self, x):
        """`(total, surrogate, downstream means)`, per row."""
        if self.estimator == "rloo":
            x = tf.repeat(x, self.num_samples, axis=0)
        noise = {}
        if self.estimator == "disarm":
            # z2's noise depends on nothing but its shape: draw each node's u up front.
            noise = {n: self.generator.uniform([tf.shape(x)[0], sbn.H]) for n in self.node_costs}
        costs, logits, samples = self.forward(x, noise)
        total = tf.add_n(list(costs.values()))
        surrogate = tf.zeros_like(total)
        means = {}
        for name in self.node_costs:
            c = self.downstream(costs, name)
            means[name] = tf.reduce_mean(c)
            z, l = samples[name], logits[name]
            if self.estimator == "reinforce":
                correction = 1.0 - tf.pow(self.decay, self.baseline_steps)
                b = tf.where(self.baseline_steps > 0, self.baseline[name] / tf.maximum(correction, 1e-12), 0.0)
                surrogate += bernoulli_log_prob(z, l) * tf.stop_gradient(c - b)
            elif self.estimator == "rloo":
                k = self.num_samples
                grouped = tf.reshape(c, [-1, k])
                others = (tf.reduce_sum(grouped, axis=1, keepdims=True) - grouped) / (k - 1.0)
                surrogate += bernoulli_log_prob(z, l) * tf.stop_gradient(c - tf.reshape(others, [-1]))
            else:  # disarm
                p = tf.sigmoid(l)
                anti = tf.cast(1.0 - noise[name] < p, tf.float32)
                held = {n: samples[n] for n in list(self.node_costs)[: list(self.node_costs).index(name)]}
                anti_costs, _, _ = self.forward(x, forced={**held, name: anti})
                weight = tf.where(anti > 0.5, -1.0, 1.0) * tf.cast(tf.not_equal(z, anti), tf.float32)
                weight *= tf.sigmoid(tf.abs(l))
                f_diff = c - self.downstream(anti_costs, name)
                surrogate += tf.reduce_sum(tf.stop_gradient(0.5 * f_diff[:, None] * weight) * l, axis=1)
        return total, surrogate, means

    def step(self, x):
        with tf.GradientTape() as tape:
            total, surrogate, means = self.surrogate(x)
            loss = tf.reduce_mean(total + surrogate)
        grads = tape.gradient(loss, self.variables)
        self.optimizer.apply_gradients(zip(grads, self.variables))
        if self.estimator == "reinforce":
            for name, mean in means.items():
                self.baseline[name].assign(self.decay * self.baseline[name] + (1.0 - self.decay) * mean)
            self.baseline_steps.assign_add(1.0)
        return tf.reduce_mean(total)


class HandFitModel(keras.Model):
    """A plain `keras.Model` whose `train_step` is a `HandSBN`'s step, with a
    running mean of the total cost as its one metric (logged as `loss`)."""

    def __init__(self, hand, **kwargs):
        super().__init__(**kwargs)
        self.hand = hand
        self.total = keras.metrics.Mean(name="loss")

    @property
    def metrics(self):
        return [self.total]

    def train_step(self, data):
        self.total.update_state(self.hand.step(data))
        return {"loss": self.total.result()}


def clock():
    """`(wall, cpu)` seconds: wall-clock, and this process's CPU time (every thread)."""
    return time.perf_counter(), time.process_time()


class Timer(keras.callbacks.Callback):
    """`clock()` at the end of every execution of `fit`."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(clock())


def dataset(data):
    return common.without_autotuning(tf.data.Dataset.from_tensor_slices(data).repeat())


class Arm:
    """One arm: `run(steps)` trains `steps` steps and returns `clock()` at the
    end of every execution."""

    def __init__(self, name, data):
        self.name, self.data = name, data
        self.steady, self.steady_cpu, self.compile_seconds, self.loss = [], [], None, None

    def time(self, executions):
        """`(wall, cpu, total)`: steady wall and CPU seconds per step, and the
        wall seconds of the whole run."""
        start = time.perf_counter()
        times = self.run(executions * FLAGS.steps_per_execution)
        steps = (len(times) - 1) * FLAGS.steps_per_execution
        wall, cpu = ((last - first) / steps for first, last in zip(times[0], times[-1]))
        return wall, cpu, times[-1][0] - start


class PackageArm(Arm):
    def __init__(self, model, data):
        super().__init__("package", data)
        self.model = model

    def run(self, steps):
        timer = Timer()
        history = self.model.fit(
            dataset(self.data), epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0, callbacks=[timer])
        self.loss = float(history.history["loss"][-1])
        return timer.times


class HandArm(Arm):
    def __init__(self, hand, data):
        super().__init__("hand", data)
        self.hand = hand
        step = tf.function(hand.step, jit_compile=True)
        spe = FLAGS.steps_per_execution

        @tf.function
        def execution(iterator):
            total = tf.constant(0.0)
            for _ in tf.range(spe):
                total += step(next(iterator))
            return total / spe

        self.execution = execution

    def run(self, steps):
        iterator = iter(dataset(self.data))
        times, losses = [], []
        for _ in range(steps // FLAGS.steps_per_execution):
            losses.append(float(self.execution(iterator).numpy()))
            times.append(clock())
        self.loss = float(np.mean(losses))
        return times


class HandFitArm(Arm):
    def __init__(self, hand, data):
        super().__init__("hand_fit", data)
        self.model = HandFitModel(hand)
        self.model.compile(jit_compile=True, steps_per_execution=FLAGS.steps_per_execution)

    run = PackageArm.run


_COPY = re.compile(r"= (\w+)\[([\d,]*)\]\S* copy\(")
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "pred": 1, "f64": 8}


def hlo_summary(step, x):
    """Counts in the optimised XLA HLO of `step(x)` compiled alone (its entry
    computation): instructions, fusions, bytes copied by `copy`
    instructions, and is-finite operations."""
    hlo = tf.function(step, jit_compile=True, autograph=False).experimental_get_compiler_ir(x)(stage="optimized_hlo")
    entry = hlo[hlo.index("\nENTRY"):]
    lines = [line for line in entry.splitlines() if " = " in line]
    copied = sum(
        _BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
        for dtype, dims in _COPY.findall(entry)
    )
    return {
        "instructions": len(lines),
        "fusions": sum(" fusion(" in line for line in lines),
        "copied_bytes": copied,
        "is_finite": sum("is-finite" in line for line in lines),
    }


def build_arms(arch, estimator, data, pixels, seed):
    keras.utils.set_random_seed(seed)
    num_samples = FLAGS.rloo_k if estimator == "rloo" else 1
    model = sbn.build_sbn(pixels, arch)
    model.compile(
        optimizer=keras.optimizers.Adam(FLAGS.learning_rate),
        estimator=estimator,
        num_samples=num_samples,
        steps_per_execution=FLAGS.steps_per_execution,
        jit_compile=True,
    )
    scg = model.scg()
    found = {info.name: info.costs for info in scg.nodes}
    if found != NODE_COSTS[arch]:
        raise RuntimeError(f"HandSBN({arch}) assumes node costs {NODE_COSTS[arch]}; the package found {found}.")
    arms = [PackageArm(model, data)]
    hand = HandSBN(model, arch, estimator, num_samples, FLAGS.learning_rate, seed)
    arms.append(HandArm(hand, data))
    if FLAGS.hand_fit:
        hand_fit = HandSBN(model, arch, estimator, num_samples, FLAGS.learning_rate, seed)
        arms.append(HandFitArm(hand_fit, data))
    return arms


def compare(arch, estimator, data, pixels, seed):
    arms = build_arms(arch, estimator, data, pixels, seed)
    hlo = None
    if FLAGS.hlo:
        x = tf.constant(data[0])
        hlo = {"package": hlo_summary(arms[0].model.train_step, x), "hand": hlo_summary(arms[1].hand.step, x)}
    for arm in arms:  # trace, compile, warm up
        steady, _, seconds = arm.time(2)
        arm.compile_seconds = seconds - 2 * FLAGS.steps_per_execution * steady
    loads = []
    for index in range(FLAGS.rounds):
        loads.append(common.load_average()[0])
        order = arms if index % 2 == 0 else arms[::-1]
        for arm in order:
            wall, cpu, _ = arm.time(FLAGS.executions)
            arm.steady.append(wall)
            arm.steady_cpu.append(cpu)
    loads.append(common.load_average()[0])
    package = arms[0]
    result = {
        "arch": arch,
        "estimator": estimator,
        "num_samples": FLAGS.rloo_k if estimator == "rloo" else 1,
        "load_1min": {"median": float(np.median(loads)), "min": min(loads), "max": max(loads)},
        "arms": {},
        "hlo": hlo,
    }
    for arm in arms:
        result["arms"][arm.name] = {
            "ms_per_step": [1e3 * s for s in arm.steady],
            "median_ms": 1e3 * float(np.median(arm.steady)),
            "cpu_ms_per_step": [1e3 * s for s in arm.steady_cpu],
            "median_cpu_ms": 1e3 * float(np.median(arm.steady_cpu)),
            "compile_seconds": arm.compile_seconds,
            "final_mean_loss": arm.loss,
        }
        if arm is not package:
            ratios = np.array(package.steady) / np.array(arm.steady)
            result["arms"][arm.name]["package_ratio"] = {
                "median_of_rounds": float(np.median(ratios)),
                "min": float(ratios.min()),
                "max": float(ratios.max()),
                "of_medians": float(np.median(package.steady) / np.median(arm.steady)),
                "cpu_of_medians": float(np.median(package.steady_cpu) / np.median(arm.steady_cpu)),
            }
    return result


def main(argv):
    del argv
    if FLAGS.threads:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)
    start = time.perf_counter()
    train, _ = common.load_data("fashion_mnist", 0)
    data = profile_step.batches(train, FLAGS.num_batches, 0)
    report = {
        "command": common.command_line(),
        "machine": common.machine_info(),
        "settings": {
            "batch_size": FLAGS.batch_size,
            "steps_per_execution": FLAGS.steps_per_execution,
            "executions": FLAGS.executions,
            "rounds": FLAGS.rounds,
            "rloo_k": FLAGS.rloo_k,
            "learning_rate": FLAGS.learning_rate,
            "threads": FLAGS.threads or "default",
        },
        "results": [],
    }
    out_dir = FLAGS.out_dir
    previous = os.path.join(out_dir, f"{FLAGS.out_name}.json")
    if os.path.exists(previous):
        with open(previous) as f:
            report["notes"] = json.load(f).get("notes", [])
    for arch in FLAGS.archs:
        for estimator in FLAGS.overhead_estimators:
            result = compare(arch, estimator, data, train.shape[1], 0)
            report["results"].append(result)
            a = result["arms"]
            line = f"{arch:<9} {estimator:<9} package {a['package']['median_ms']:.3f} ms"
            for name in ("hand", "hand_fit"):
                if name in a:
                    line += (f"  {name} {a[name]['median_ms']:.3f} ms"
                             f" (ratio {a[name]['package_ratio']['median_of_rounds']:.2f},"
                             f" CPU {a[name]['package_ratio']['cpu_of_medians']:.2f})")
            line += (f"  compile {a['package']['compile_seconds']:.1f}/{a['hand']['compile_seconds']:.1f} s"
                     f"  load {result['load_1min']['median']:.1f}")
            print(line, flush=True)
    report["machine"]["load_average_end"] = common.load_average()
    report["seconds"] = time.perf_counter() - start
    common.write_json(os.path.join(out_dir, f"{FLAGS.out_name}.json"), report)
    render.write("overhead", report, os.path.join(out_dir, f"{FLAGS.out_name}.md"))


if __name__ == "__main__":
    flags.FLAGS.set_default("dataset", "fashion_mnist")
    app.run(main)
