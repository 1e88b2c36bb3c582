"""The REBAR / RELAX toy: one Bernoulli node, one learnable logit.

    b ~ Bernoulli(sigmoid(theta)),   cost = (b - t)^2,   t in {0.45, 0.499}

    J(theta)       = p (1 - t)^2 + (1 - p) t^2,          p = sigmoid(theta)
    dJ / dtheta    = (1 - 2 t) p (1 - p)                 (0.025 and 0.0005 at theta = 0)

The minimum is at p -> 0. With t = 0.499 the two outcomes' costs differ by only
1 - 2t = 0.002, so the learning signal is tiny next to the noise of a
score-function estimator (Tucker et al. 2017; Grathwohl et al. 2018).

The node is the cost's last stochastic ancestor, so the `critic` and
`critic_cv` estimators use the cost itself, re-evaluated with `b` forced to
each outcome, as an exact Q: no critic is learned here.

Measured per t and estimator (reinforce, critic, critic_cv):

1. Per-draw gradient statistics from `keras_bpq.diagnostics.estimate_gradients`
   with a batch of one row: mean, std, variance (and its closed form), the
   exact gradient (closed form and by enumeration), SNR = |mean| / std, and
   whether the mean is within 4 standard errors of the exact gradient.
   `reinforce` is measured twice: with its fresh state (EMA baseline 0) and
   with the baseline set to the exact E[cost], the value its EMA tracks.
2. Training with Adam from theta = 0 until p(b=1) < --threshold, checked every
   --check_every steps (also the compiled steps_per_execution), capped at
   --max_steps; several seeds. Two reinforce references are trained too
   (--reinforce_references): a preset ("warm") EMA baseline, and no baseline.
3. Speed: wall time of each `estimate_gradients` call (and its growth with
   num_draws, --scaling_draws), and training steps/s from interleaved timed
   runs of --throughput_steps steps after training.

    python benchmarks/toy.py                 # writes benchmarks/results/toy.{json,md}
    python benchmarks/toy.py --seeds=0,1 --max_steps=5000 --out_dir=/tmp/toy
"""

import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_IMPORT_START = time.perf_counter()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_bpq  # noqa: E402
from keras_bpq import diagnostics  # noqa: E402
from keras_bpq import estimators as estimators_lib  # noqa: E402

tf.get_logger().setLevel("ERROR")  # estimate_gradients retraces on every call
IMPORT_SECONDS = time.perf_counter() - _IMPORT_START

FLAGS = flags.FLAGS
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Training seeds.")
flags.DEFINE_list("targets", ["0.45", "0.499"], "Values of t.")
flags.DEFINE_list("thetas", ["0.0", "-2.0"], "Logits at which the gradient variance is measured.")
flags.DEFINE_list("estimators", ["reinforce", "critic", "critic_cv"], "Estimators to compare.")
flags.DEFINE_bool(
    "reinforce_references", True,
    "Also train two reinforce references: 'reinforce_warm_baseline' (EMA baseline state "
    "preset to E[cost] at theta = 0) and 'reinforce_no_baseline' (baseline always 0).",
)
flags.DEFINE_integer("num_draws", 2000, "Draws per gradient-variance measurement (batch of 1 row).")
flags.DEFINE_integer("max_steps", 20000, "Training budget in steps.")
flags.DEFINE_float("learning_rate", 0.01, "Adam learning rate.")
flags.DEFINE_integer("batch_size", 1, "Training batch size.")
flags.DEFINE_integer("check_every", 25, "Check p(b=1) every this many steps (= steps_per_execution).")
flags.DEFINE_float("threshold", 0.05, "Training stops once p(b=1) falls below this.")
flags.DEFINE_integer("throughput_steps", 3000, "Steps of each timed throughput run.")
flags.DEFINE_integer(
    "throughput_repeats", 5,
    "Interleaved rounds of throughput runs (one per estimator and t each); the best is reported.",
)
flags.DEFINE_list(
    "scaling_draws", ["20", "2000", "8000", "32000"],
    "num_draws values at which one estimate_gradients call is timed (reinforce, t = first "
    "target, theta = 0); empty to skip.",
)
flags.DEFINE_integer("variance_seed", 1234, "Seed of the gradient-variance draws.")
flags.DEFINE_string("out_dir", "benchmarks/results", "Where toy.json, toy.md and plots go.")
flags.DEFINE_bool("plots", True, "Write PNG plots (skipped if matplotlib is missing).")


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def as_float32(t):
    """The value of t that the graph holds: a float32 constant (0.499 -> 0.49900001)."""
    return float(np.float32(t))


def exact_gradient(t, theta):
    p = sigmoid(theta)
    return (1.0 - 2.0 * t) * p * (1.0 - p)


def expected_cost(t, theta):
    p = sigmoid(theta)
    return p * (1.0 - t) ** 2 + (1.0 - p) * t**2


def closed_form_draws(estimator, t, theta, baseline=0.0):
    """Per-draw gradient given b = 1 and b = 0, for batch size 1.

    reinforce: (b - p) (c(b) - B); critic: the per-unit advantage with the exact
    Q, (b - p) (1 - p(b)) (c(b) - c(1 - b)); critic_cv: p (1 - p) (c1 - c0) for
    every draw (its residual c - Q(b) is zero with the exact Q).
    """
    p = sigmoid(theta)
    c1, c0 = (1.0 - t) ** 2, t**2
    if estimator == "reinforce":
        return (1.0 - p) * (c1 - baseline), -p * (c0 - baseline)
    if estimator == "critic":
        return (1.0 - p) ** 2 * (c1 - c0), p**2 * (c1 - c0)
    if estimator == "critic_cv":
        g = p * (1.0 - p) * (c1 - c0)
        return g, g
    return None  # no closed form here for other estimators


def closed_form_variance(estimator, t, theta, baseline=0.0):
    p = sigmoid(theta)
    draws = closed_form_draws(estimator, t, theta, baseline)
    if draws is None:
        return None
    g1, g0 = draws
    mean = p * g1 + (1.0 - p) * g0
    return max(0.0, p * g1**2 + (1.0 - p) * g0**2 - mean**2)


# -- model -------------------------------------------------------------------
class Logit(keras.layers.Layer):
    """One learnable logit theta, broadcast to the batch: [batch, 1]."""

    def build(self, input_shape):
        self.theta = self.add_weight(shape=(), initializer="zeros", name="theta")

    def call(self, x):
        return keras.ops.zeros_like(x[:, :1]) + self.theta


class ReinforceNoBaseline(estimators_lib.Reinforce):
    """Reference only: the package's reinforce with its baseline held at 0."""

    name = "reinforce_no_baseline"

    def baseline(self, state):
        return tf.constant(0.0)


# Training configurations: the package estimators, plus two reinforce references.
REFERENCES = {
    "reinforce_warm_baseline": "reinforce, EMA baseline state preset to E[c] at theta = 0",
    "reinforce_no_baseline": "reinforce with the baseline held at 0",
}


def package_estimator(config):
    if config == "reinforce_no_baseline":
        return ReinforceNoBaseline()
    if config == "reinforce_warm_baseline":
        return "reinforce"
    return config


def build_model(t, config, seed, learning_rate, steps_per_execution):
    keras.utils.set_random_seed(seed)
    x = keras.Input((1,), name="x")
    b = keras_bpq.Bernoulli(name="b")(Logit(name="logit")(x))
    cost = keras.ops.square(b[:, 0] - t)
    model = keras_bpq.BackpropQModel(inputs=x, outputs=b, costs={"cost": cost}, name="toy")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        estimator=package_estimator(config),
        steps_per_execution=steps_per_execution,
    )
    model.critic_variables  # creates the estimator state (and critics, none here)
    if config == "reinforce_warm_baseline":
        set_baseline(model, expected_cost(as_float32(t), 0.0))
    return model


def set_baseline(model, value):
    """Presets reinforce's EMA baseline so that it reads `value` (bias correction ~1)."""
    state = model.machinery.node_state["b"]
    state["baseline"].assign(value)
    state["baseline_steps"].assign(1e4)  # 1 - 0.99^1e4 = 1


def theta_variable(model):
    return model.get_layer("logit").theta


def summary_text(model):
    return model.scg_summary(print_fn=lambda s: None)


# -- 1. gradient variance ------------------------------------------------------
def measure_variance(t, estimator, thetas, num_draws, seed):
    model = build_model(t, estimator, seed, 0.01, 1)
    t32 = as_float32(t)
    x = np.ones((1, 1), np.float32)
    rows = []
    variants = [("fresh", None)]
    if estimator == "reinforce":
        variants.append(("baseline=E[c]", "exact"))
    for label, baseline_kind in variants:
        for theta in thetas:
            theta_variable(model).assign(theta)
            baseline = 0.0
            if baseline_kind == "exact":
                baseline = expected_cost(t32, theta)
                set_baseline(model, baseline)
            start = time.perf_counter()
            draws = diagnostics.estimate_gradients(model, x, num_draws=num_draws)[0]
            seconds = time.perf_counter() - start
            enumerated = float(diagnostics.exact_gradients(model, x)[0])
            g = draws.astype(np.float64).reshape(-1)
            mean, std = float(g.mean()), float(g.std(ddof=1))
            exact = exact_gradient(t32, theta)
            se = std / math.sqrt(len(g))
            # float32 rounding: costs near 0.25 carry ~3e-8 absolute error, and the
            # gap c1 - c0 = 0.002 (t = 0.499) loses ~4 digits to cancellation.
            rounding = 1e-5 * abs(exact) + 1e-7
            zero_variance = std <= rounding
            variance_cf = closed_form_variance(estimator, t32, theta, baseline)
            rows.append(
                {
                    "t": t,
                    "estimator": estimator,
                    "variant": label,
                    "theta": theta,
                    "p": sigmoid(theta),
                    "baseline": baseline,
                    "num_draws": num_draws,
                    "mean": mean,
                    "std": std,
                    "variance": std**2,
                    "variance_closed_form": variance_cf,
                    "gradient_variance_diagnostic": diagnostics.gradient_variance([draws]),
                    "exact": exact,
                    "exact_decimal_t": exact_gradient(t, theta),
                    "exact_enumeration": enumerated,
                    "standard_error": se,
                    "z": None if zero_variance else abs(mean - exact) / se,
                    "abs_error": abs(mean - exact),
                    "within_4_se": bool(abs(mean - exact) <= 4.0 * se + rounding),
                    "zero_variance": bool(zero_variance),
                    "snr": None if zero_variance else abs(mean) / std,
                    "snr_closed_form": (
                        None if variance_cf is None or variance_cf <= (1e-6 * abs(exact)) ** 2
                        else abs(exact) / math.sqrt(variance_cf)
                    ),
                    "estimate_seconds": seconds,
                    "distinct_values": int(len(np.unique(draws))),
                }
            )
    return rows, summary_text(model)


def measure_scaling(t, draws_list, seed):
    """Wall time of one estimate_gradients call (trace included) against num_draws."""
    model = build_model(t, "reinforce", seed, 0.01, 1)
    x = np.ones((1, 1), np.float32)
    rows = []
    for num_draws in draws_list:
        start = time.perf_counter()
        diagnostics.estimate_gradients(model, x, num_draws=num_draws)
        rows.append({"num_draws": num_draws, "seconds": time.perf_counter() - start})
        print(f"estimate_gradients, {num_draws} draws: {rows[-1]['seconds']:.2f}s", flush=True)
    return rows


# -- 2./3. training --------------------------------------------------------------
def train(t, config, seed, args):
    k = args["check_every"]
    max_steps = args["max_steps"]
    model = build_model(t, config, seed, args["learning_rate"], k)
    theta = theta_variable(model)
    logit_threshold = math.log(args["threshold"] / (1.0 - args["threshold"]))
    curve = []

    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            value = float(theta.numpy())
            curve.append(sigmoid(value))
            if value < logit_threshold:
                self.model.stop_training = True

    data = tf.data.Dataset.from_tensors(np.ones((args["batch_size"], 1), np.float32)).repeat()
    start = time.perf_counter()
    model.fit(
        data, epochs=1, steps_per_epoch=max_steps, verbose=0, shuffle=False, callbacks=[Stop()]
    )
    seconds = time.perf_counter() - start
    steps_run = len(curve) * k
    reached = curve[-1] < args["threshold"]
    result = {
        "t": t,
        "estimator": config,
        "seed": seed,
        "steps": steps_run if reached else None,
        "reached": bool(reached),
        "steps_run": steps_run,
        "final_p": curve[-1],
        "min_p": min(curve),
        "max_p": max(curve),
        "seconds": seconds,
        "curve_p": [round(p, 6) for p in curve],
    }
    return result, model, data


def throughput(models, steps, k, repeats):
    """Steps/s of already-traced models: `repeats` rounds, each timing one `fit` of
    `steps` steps per model in turn, so that load from other jobs hits every model
    alike; the best round per model is reported."""
    steps = int(math.ceil(steps / k) * k)
    seconds = {key: [] for key in models}
    cpu = {key: [] for key in models}
    for _ in range(repeats):
        for key, (model, data) in models.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
            seconds[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
    out = {}
    for key, times in seconds.items():
        rates = [steps / x for x in times]
        out[key] = {
            "steps": steps,
            "seconds": times,
            "cpu_seconds": cpu[key],
            "steps_per_second_each": rates,
            "steps_per_second": max(rates),
            "steps_per_second_median": float(np.median(rates)),
            "microseconds_per_step": 1e6 / max(rates),
            "cpu_microseconds_per_step": 1e6 * min(cpu[key]) / steps,
        }
        print(
            f"{key:28s} {max(rates):.0f} steps/s (best of {repeats}), "
            f"{out[key]['cpu_microseconds_per_step']:.0f} CPU us/step",
            flush=True,
        )
    return out


# -- reporting -------------------------------------------------------------------
def fmt(x, digits=3):
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        return f"{x:.{digits}e}"
    return f"{x:.{digits + 1}g}"


def median_steps(runs):
    values = [r["steps"] if r["reached"] else math.inf for r in runs]
    return float(np.median(values))


def steps_text(value, max_steps):
    if value is None or math.isinf(value):
        return f"not reached (>{max_steps})"
    return f"{value:.0f}"


def row_name(row):
    if row["variant"] == "fresh":
        return row["estimator"] + (" (fresh: baseline 0)" if row["estimator"] == "reinforce" else "")
    return f"{row['estimator']} ({row['variant']})"


def variance_table(rows):
    lines = [
        "| estimator | theta | p(b=1) | mean | std | variance | variance (closed form) | exact "
        "| SNR | SNR (closed form) | z | within 4 SE | estimate time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        snr = "inf (zero variance)" if r["snr"] is None else fmt(r["snr"])
        snr_cf = fmt(r["snr_closed_form"])
        if r["snr_closed_form"] is None and r["variance_closed_form"] is not None:
            snr_cf = "inf"
        z = "-" if r["z"] is None else f"{r['z']:.2f}"
        lines.append(
            f"| {row_name(r)} | {r['theta']:g} | {r['p']:.3f} | {fmt(r['mean'], 4)} | {fmt(r['std'])} "
            f"| {fmt(r['variance'])} | {fmt(r['variance_closed_form'])} | {fmt(r['exact'], 4)} | {snr} "
            f"| {snr_cf} | {z} | {'yes' if r['within_4_se'] else 'NO'} | {r['estimate_seconds']:.2f} |"
        )
    return lines


def speed_text(speed, config):
    if config in speed:
        return f"{speed[config]['steps_per_second']:.0f}"
    return "(as reinforce)"


def cpu_text(speed, config):
    if config in speed:
        return f"{speed[config]['cpu_microseconds_per_step']:.0f}"
    return "(as reinforce)"


def training_table(runs_by_config, speed, max_steps):
    lines = [
        "| estimator | median steps | steps per seed | final p(b=1) per seed | steps/s "
        "| CPU us/step | wall time per seed (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for config, runs in runs_by_config.items():
        per_seed = ", ".join(str(r["steps"]) if r["reached"] else f">{r['steps_run']}" for r in runs)
        finals = ", ".join(f"{r['final_p']:.3f}" for r in runs)
        times = ", ".join(f"{r['seconds']:.1f}" for r in runs)
        name = config if config not in REFERENCES else f"{config} (reference)"
        lines.append(
            f"| {name} | {steps_text(median_steps(runs), max_steps)} | {per_seed} | {finals} "
            f"| {speed_text(speed, config)} | {cpu_text(speed, config)} | {times} |"
        )
    return lines


def machine_info():
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def versions():
    import tensorflow_probability as tfp

    out = {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tensorflow_probability": tfp.__version__,
        "keras_bpq": keras_bpq.__version__,
        "numpy": np.__version__,
    }
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--", "keras_bpq"], cwd=os.path.dirname(here),
            capture_output=True, text=True, check=True,
        ).stdout
        out["git_commit"] = commit + (" + uncommitted keras_bpq changes" if diff else "")
        if diff:
            out["keras_bpq_diff_sha1"] = hashlib.sha1(diff.encode()).hexdigest()
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def make_plots(results, out_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping plots.")
        return []
    k = results["settings"]["check_every"]
    targets = results["settings"]["targets"]
    colors = {
        "reinforce": "tab:red",
        "critic": "tab:blue",
        "critic_cv": "tab:green",
        "reinforce_warm_baseline": "tab:orange",
        "reinforce_no_baseline": "tab:gray",
    }
    fig, axes = plt.subplots(1, len(targets), figsize=(6.5 * len(targets), 4.5), squeeze=False)
    for ax, t in zip(axes[0], targets):
        seen = set()
        for run in results["training"]:
            if run["t"] != t:
                continue
            config = run["estimator"]
            steps = k * (np.arange(len(run["curve_p"])) + 1)
            ax.plot(
                steps, run["curve_p"], color=colors.get(config), alpha=0.7, lw=1,
                ls="--" if config in REFERENCES else "-",
                label=None if config in seen else config,
            )
            seen.add(config)
        ax.axhline(results["settings"]["threshold"], color="k", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel("training step")
        ax.set_ylabel("p(b=1) = sigmoid(theta)")
        ax.set_title(f"REBAR toy, t = {t}: one line per seed")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "toy_training.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def grouped(results, t):
    s = results["settings"]
    var_rows = [r for r in results["variance"] if r["t"] == t]
    runs = {
        config: [r for r in results["training"] if r["t"] == t and r["estimator"] == config]
        for config in s["configs"]
    }
    speed = {
        config: results["throughput"][f"{t}/{config}"]
        for config in s["configs"]
        if f"{t}/{config}" in results["throughput"]
    }
    return var_rows, runs, speed


def write_markdown(results, path):
    s = results["settings"]
    max_steps = s["max_steps"]
    m = results["machine"]
    v = results["versions"]
    enum_error = max(
        (abs(r["exact"] - r["exact_enumeration"]) / abs(r["exact"]) for r in results["variance"]),
        default=0.0,
    )
    load = ""
    if "load_average_at_start" in m:
        start_load, end_load = m["load_average_at_start"][0], m.get("load_average_at_end", [0])[0]
        load = (
            f" 1-minute load average {start_load:g} at the start and {end_load:g} at the end on "
            f"{m['cpu_count']} cores"
        )
        if max(start_load, end_load) > 0.75 * (m["cpu_count"] or 1):
            load += (
                ": the machine was shared with other jobs, so wall times and steps/s are noisy "
                "(the best of the repeated throughput runs is shown)."
            )
        else:
            load += "."
    lines = [
        "## REBAR toy",
        "",
        "One Bernoulli node `b ~ Bernoulli(sigmoid(theta))` with a single learnable logit "
        "`theta` (a one-weight layer broadcast to the batch), cost `(b - t)^2` per example, "
        "functional `BackpropQModel(inputs=x, outputs=b, costs={\"cost\": cost})`. "
        "Exact gradient `(1 - 2t) sigmoid(theta) (1 - sigmoid(theta))`; the optimum is "
        "p(b=1) -> 0.",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"Machine: {m.get('cpu_model', m['processor'])}, {m['cpu_count']} CPU cores, "
        f"{m['platform']}, Python {m['python']}; TensorFlow {v['tensorflow']}, Keras {v['keras']}, "
        f"TFP {v['tensorflow_probability']}, keras_bpq {v['keras_bpq']}"
        + (f" (commit {v['git_commit']})" if "git_commit" in v else "")
        + f". Total run time {results['total_seconds']:.0f} s (plus about "
        f"{results['import_seconds']:.0f} s of imports)." + load,
        "",
        "Settings:",
        f"* Gradient variance: `keras_bpq.diagnostics.estimate_gradients(model, x, "
        f"num_draws={s['num_draws']})` with `x` a single row (batch size 1), at theta in "
        f"{{{', '.join(f'{x:g}' for x in s['thetas'])}}}. SNR = |mean| / std of the per-draw "
        "gradient; SNR (closed form) = |exact| / closed-form std; z = |mean - exact| / standard "
        "error; \"within 4 SE\" also allows 1e-5 relative + 1e-7 absolute for float32 rounding, "
        "and an estimator whose std is below that is reported as zero variance. The exact "
        "gradient is the closed form for the float32 value of t that the graph holds (0.499 is "
        "stored as 0.49900001, which moves the exact gradient by 1.3e-5 relative); "
        f"`diagnostics.exact_gradients` (enumeration, float32) agrees with it to {enum_error:.1e} "
        "relative or better in every row. The closed-form variances follow from the per-draw "
        "values given b = 1 and b = 0. Estimate time: one `estimate_gradients` call of all draws, including its "
        "tf.function trace (it builds a new tf.function on every call).",
        "* `reinforce` is the package's score function with an EMA baseline (decay 0.99, bias "
        "corrected; the baseline never sees the current batch, so step 1 uses baseline 0). A "
        "fresh model's baseline is 0, so the `reinforce (fresh)` rows have no baseline; the "
        "`baseline=E[c]` rows preset the baseline state to the exact expected cost, the value "
        "the EMA tracks.",
        f"* Training: Adam (Keras defaults, learning rate {s['learning_rate']:g}), batch size "
        f"{s['batch_size']}, theta = 0 at the start, `steps_per_execution={s['check_every']}`; "
        f"p(b=1) is checked every {s['check_every']} steps (so step counts are multiples of "
        f"{s['check_every']}) and training stops at p(b=1) < {s['threshold']:g}, or at the budget "
        f"of {max_steps} steps (\"not reached\"); seeds {s['seeds']} (the seed drives the "
        "Bernoulli draws).",
        "* Two reinforce references, not package estimators: `reinforce_warm_baseline` is "
        "`reinforce` with its EMA state preset to E[c] at theta = 0 (as if the baseline had "
        "been warmed up), `reinforce_no_baseline` holds the baseline at 0 (a subclass of "
        "`keras_bpq.estimators.Reinforce`).",
        f"* Steps/s: after all training, {s['throughput_repeats']} interleaved rounds in which "
        f"each estimator's seed-0 model (one per t, already traced) runs a timed `fit` of "
        f"{s['throughput_steps']} more steps; the best round is shown (callbacks included; every "
        "round is in `toy.json`). Interleaving spreads load from other jobs over all "
        "estimators alike. CPU us/step is the process CPU time (all threads) per step, the "
        "least of the rounds: less sensitive to other jobs than wall time. The wall time per "
        "seed includes the first trace of the training step.",
        "* **Q is exact here, not learned.** `b` is the cost's last stochastic ancestor, so "
        "`critic` and `critic_cv` use the cost itself, re-evaluated with `b` forced to 0 and to "
        "1, as Q (`scg_summary` shows `exact[cost]`); no critic network exists and the critic "
        "optimizer is unused. These are the critic estimators at their best, not a test of "
        "critic learning.",
        "",
    ]
    for t in s["targets"]:
        var_rows, runs, speed = grouped(results, t)
        lines += [
            f"### t = {t}",
            "",
            f"Exact gradient at theta = 0: {exact_gradient(t, 0.0):.4g}; cost gap "
            f"c(1) - c(0) = 1 - 2t = {1 - 2 * t:.3g}.",
            "",
            "Per-draw gradient, batch of one row:",
            "",
            *variance_table(var_rows),
            "",
            f"Training from theta = 0 to p(b=1) < {s['threshold']:g} (budget {max_steps} steps):",
            "",
            *training_table(runs, speed, max_steps),
            "",
        ]
    if results.get("estimate_scaling"):
        lines += [
            "### Cost of `estimate_gradients` against num_draws",
            "",
            f"One call each, `reinforce`, t = {s['targets'][0]}, theta = 0, batch of one row, "
            "trace included (each call traces afresh):",
            "",
            "| num_draws | seconds |",
            "|---|---|",
            *[f"| {r['num_draws']} | {r['seconds']:.2f} |" for r in results["estimate_scaling"]],
            "",
        ]
    lines += ["### Reading", ""]
    lines += reading(results)
    for plot in results.get("plots", []):
        lines += ["", f"![p(b=1) during training, every seed]({os.path.basename(plot)})"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def reading(results):
    """The measured ranking per t; the interpretation is written in NOTES below."""
    s = results["settings"]
    out = [
        "The ranking lines are computed by the script; the notes after them were written "
        "from the default run (`python benchmarks/toy.py`) and quote its numbers.",
        "",
    ]
    for t in s["targets"]:
        _, runs, _ = grouped(results, t)
        medians = {config: median_steps(r) for config, r in runs.items()}
        order = sorted(medians, key=lambda c: medians[c])
        ranking = "; ".join(f"{c} {steps_text(medians[c], s['max_steps'])}" for c in order)
        out.append(f"* Median steps to p(b=1) < {s['threshold']:g} at **t = {t}**: {ranking}.")
    return out + NOTES[:-1] + cost_notes(results) + NOTES[-1:]


def cost_notes(results):
    """The timing notes, computed from this run's numbers."""
    s = results["settings"]
    speed = results.get("throughput", {})
    parts = []
    ratios = []
    for t in s["targets"]:
        base = speed.get(f"{t}/reinforce")
        for config in ("critic", "critic_cv"):
            other = speed.get(f"{t}/{config}")
            if base and other:
                ratios.append(
                    other["cpu_microseconds_per_step"] / base["cpu_microseconds_per_step"]
                )
    if ratios:
        rates = [v["steps_per_second"] for v in speed.values()]
        text = (
            "* **Cost per step.** The critic estimators re-run the forward pass with b forced to "
            f"both outcomes. In this run a step of `critic` or `critic_cv` took "
            f"{min(ratios):.2f}-{max(ratios):.2f} times the CPU time of a `reinforce` step "
            f"(batch {s['batch_size']}, `steps_per_execution={s['steps_per_execution']}`); wall "
            f"clock, all estimators ran at {min(rates):,.0f}-{max(rates):,.0f} steps/s. CPU "
            "time to the threshold, median steps x CPU us/step:"
        )
        for t in s["targets"]:
            _, runs, _ = grouped(results, t)
            items = []
            for config, config_runs in runs.items():
                key = f"{t}/{package_name(config)}"
                steps = median_steps(config_runs)
                if key in speed and math.isfinite(steps):
                    cpu = steps * speed[key]["cpu_microseconds_per_step"] * 1e-6
                    items.append(f"{config} {cpu:.2f} s")
                elif key in speed:
                    items.append(f"{config} not reached")
            text += f" t = {t}: " + ", ".join(items) + ";"
        parts.append(text.rstrip(";") + " (the references at `reinforce`'s cost per step).")
    times = [r["estimate_seconds"] for r in results["variance"]]
    if times:
        text = (
            f"* **estimate_gradients.** One vectorised call of {s['num_draws']} draws took "
            f"{min(times):.2f}-{max(times):.2f} s wall time, for every estimator, trace included."
        )
        scaling = results.get("estimate_scaling") or []
        if len(scaling) >= 3:
            (n1, t1), (n2, t2) = [(r["num_draws"], r["seconds"]) for r in scaling[-2:]]
            exponent = math.log(t2 / t1) / math.log(n2 / n1)
            text += (
                f" In the scaling table {scaling[0]['num_draws']} draws cost "
                f"{scaling[0]['seconds']:.2f} s (mostly tracing), and from {n1} to {n2} draws "
                f"the time grew like num_draws^{exponent:.1f}."
            )
        parts.append(text)
    return parts


def package_name(config):
    """The package estimator whose steps/s a training configuration shares."""
    return "reinforce" if config in REFERENCES else config


NOTES = [
    "* **Variance.** `critic_cv` with the exact Q returns the exact gradient on every draw: "
    "its residual `c - Q(b)` is identically zero and the local expectation over both outcomes "
    "is analytic, so its variance is 0 at every theta and t and its training path is the "
    "same for every seed. `critic` (the advantage `Q(b) - V`, V the exact expectation) gives "
    "(1-p)^2 (c1-c0) when b = 1 and p^2 (c1-c0) when b = 0: the same distribution as reinforce "
    "with the exact mean as baseline, zero variance at theta = 0 only, and never the wrong "
    "sign. Measured variances agree with these closed forms within sampling error (a few "
    "per cent at 2000 draws), and every mean is within 4 standard errors of the exact "
    "gradient.",
    "* **t = 0.499.** The signal is (1 - 2t) p (1-p) = 5e-4 at theta = 0, against a per-draw "
    "std of 0.125 for reinforce without a baseline: a true SNR of 0.004 (0.2 at t = 0.45). "
    "The measured SNR of that row is mostly sampling noise: 2000 draws cannot resolve the "
    "mean (standard error 0.0028, more than five times the signal), so read the closed-form "
    "column there. Single estimates are almost pure noise, and "
    "`reinforce_no_baseline` does not reach the threshold within the budget at t = 0.499 "
    "(it needs several times more steps than the baselined estimators even at t = 0.45). "
    "Every baselined estimator here removes the part of the noise that does not scale with "
    "the cost gap, after which the problem is the same at both t.",
    "* **Adam hides the gradient's scale.** For `critic_cv`, `critic` and "
    "`reinforce_warm_baseline` every per-step gradient is exactly (1 - 2t) times a function "
    "of theta and the draws (c = t^2 + b (1 - 2t), and the baselines move with it). Adam "
    "divides by the running RMS of the gradient, so for a given seed it follows the same "
    "path at both t (up to its epsilon and float32 rounding): the per-seed step counts are "
    "identical at t = 0.45 and t = 0.499 although the gradient is 50 times smaller. What "
    "matters is the SNR, not the magnitude.",
    "* **Why package `reinforce` is slower at t = 0.499.** On the first step its EMA baseline "
    "is still empty and reads 0, so that step's gradient is (b - p) c with c about 0.25: some "
    "250 times the later, baselined per-step gradients (about (b - p)(c1 - c0)/2). Adam's "
    "second-moment estimate (beta_2 = 0.999) remembers that one step for thousands of steps, "
    "so the effective step size stays small; `reinforce_warm_baseline`, identical except for "
    "the preset baseline, takes the same steps at both t. At t = 0.45 the first step is only "
    "a few times larger than the rest and the effect is small.",
    "* **Ranking.** `critic_cv` wins: with an exact Q its gradient is exact, and it is the "
    "fastest for every seed at both t. `critic` and warm-baselined `reinforce` come next and "
    "are close: both are unbiased with a state-dependent baseline. (The variance-optimal "
    "constant baseline for one binary node is (1-p) c1 + p c0, which would even give zero "
    "variance; as p falls the EMA baseline lags above the current mean E[c], towards that "
    "value, which plausibly explains why warm `reinforce` can match or beat `critic`, whose "
    "V is exactly E[c].) `reinforce_no_baseline` is last by far.",
    "* **Caveat.** This toy is the best case for the critic estimators: Q is the exact cost, "
    "not a learned network. It checks the estimators' algebra and their variance when Q is "
    "right; it says nothing about how fast a learned critic becomes right.",
]


def print_report(results):
    s = results["settings"]
    for t in s["targets"]:
        var_rows, runs, speed = grouped(results, t)
        print(f"\n=== t = {t}  (exact gradient at theta=0: {exact_gradient(t, 0.0):.4g}) ===")
        print(f"{'estimator':32s} {'theta':>6s} {'mean':>11s} {'std':>10s} {'var':>10s} "
              f"{'var(cf)':>10s} {'exact':>11s} {'SNR':>9s} {'z':>6s} {'4SE':>4s} {'time':>6s}")
        for r in var_rows:
            snr = "inf" if r["snr"] is None else f"{r['snr']:.3g}"
            z = "-" if r["z"] is None else f"{r['z']:.2f}"
            print(f"{row_name(r):32s} {r['theta']:6g} {r['mean']:11.4e} {r['std']:10.3e} "
                  f"{r['variance']:10.3e} {fmt(r['variance_closed_form']):>10s} {r['exact']:11.4e} "
                  f"{snr:>9s} {z:>6s} {'ok' if r['within_4_se'] else 'NO':>4s} "
                  f"{r['estimate_seconds']:6.2f}")
        print(f"\n{'training':24s} {'median':>22s}  steps per seed | final p | steps/s")
        for config, config_runs in runs.items():
            per_seed = [r["steps"] if r["reached"] else f">{r['steps_run']}" for r in config_runs]
            finals = [round(r["final_p"], 3) for r in config_runs]
            print(f"{config:24s} {steps_text(median_steps(config_runs), s['max_steps']):>22s}  "
                  f"{per_seed} | {finals} | {speed_text(speed, config)}")


def main(argv):
    del argv
    start_all = time.perf_counter()
    seeds = [int(x) for x in FLAGS.seeds]
    targets = [float(x) for x in FLAGS.targets]
    thetas = [float(x) for x in FLAGS.thetas]
    k = FLAGS.check_every
    configs = list(FLAGS.estimators)
    if FLAGS.reinforce_references:
        configs += list(REFERENCES)
    settings = {
        "seeds": seeds,
        "targets": targets,
        "thetas": thetas,
        "estimators": list(FLAGS.estimators),
        "configs": configs,
        "references": REFERENCES if FLAGS.reinforce_references else {},
        "num_draws": FLAGS.num_draws,
        "max_steps": int(math.ceil(FLAGS.max_steps / k) * k),
        "learning_rate": FLAGS.learning_rate,
        "optimizer": "keras.optimizers.Adam (defaults besides the learning rate)",
        "batch_size": FLAGS.batch_size,
        "check_every": k,
        "steps_per_execution": k,
        "threshold": FLAGS.threshold,
        "throughput_steps": FLAGS.throughput_steps,
        "throughput_repeats": FLAGS.throughput_repeats,
        "variance_seed": FLAGS.variance_seed,
        "reinforce_baseline_decay": estimators_lib.Reinforce().decay,
    }
    results = {
        "benchmark": "REBAR toy",
        "command": shlex.join(["python"] + sys.argv),
        "machine": machine_info(),
        "versions": versions(),
        "import_seconds": IMPORT_SECONDS,
        "settings": settings,
        "variance": [],
        "training": [],
        "throughput": {},
        "scg_summary": {},
    }
    args = {
        "check_every": k,
        "max_steps": settings["max_steps"],
        "learning_rate": FLAGS.learning_rate,
        "batch_size": FLAGS.batch_size,
        "threshold": FLAGS.threshold,
    }
    timed = {}
    for t in targets:
        for config in configs:
            if config not in REFERENCES:
                rows, summary = measure_variance(t, config, thetas, FLAGS.num_draws, FLAGS.variance_seed)
                results["variance"] += rows
                results["scg_summary"][config] = summary
            for seed in seeds:
                run, model, data = train(t, config, seed, args)
                results["training"].append(run)
                status = (
                    f"{run['steps']} steps" if run["reached"]
                    else f"not reached, p={run['final_p']:.3f}"
                )
                print(f"t={t} {config:24s} seed {seed}: {status} ({run['seconds']:.1f}s)", flush=True)
                if seed == seeds[0] and config not in REFERENCES:
                    timed[f"{t}/{config}"] = (model, data)
    if FLAGS.throughput_steps > 0 and FLAGS.throughput_repeats > 0:
        results["throughput"] = throughput(
            timed, FLAGS.throughput_steps, k, FLAGS.throughput_repeats
        )
    del timed
    scaling_draws = [int(n) for n in FLAGS.scaling_draws]
    if scaling_draws:
        results["estimate_scaling"] = measure_scaling(targets[0], scaling_draws, FLAGS.variance_seed)
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    if FLAGS.plots:
        results["plots"] = make_plots(results, FLAGS.out_dir)
    results["total_seconds"] = time.perf_counter() - start_all
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print_report(results)
    with open(os.path.join(FLAGS.out_dir, "toy.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_markdown(results, os.path.join(FLAGS.out_dir, "toy.md"))
    print(f"\nwrote {FLAGS.out_dir}/toy.json and toy.md in {results['total_seconds']:.0f}s "
          f"(+{IMPORT_SECONDS:.0f}s imports)")


if __name__ == "__main__":
    app.run(main)
