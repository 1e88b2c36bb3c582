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

Every estimator that can serve a Bernoulli node is measured (--estimators):
reinforce, critic, critic_cv, local_expectation, rloo (compile(num_samples=2):
every step holds 2 draws of b), disarm, relax (its control variate is the
same exact head evaluated on relaxed samples), gumbel and
gumbel_straight_through (keras_bpq.estimators.Gumbel at its default
temperature). Estimators that cannot serve the node (expected, pathwise,
reparam, rloo with num_samples=1) are compiled once and their compile-time
error is recorded. Per t and estimator:

1. Per-draw gradient statistics from `keras_bpq.diagnostics.estimate_gradients`
   with a batch of one row (one draw = the gradient of one training step; for
   rloo that step holds num_samples draws of b): mean, std, variance and its
   closed form (numerical quadrature for gumbel and relax), the exact gradient
   (closed form and by enumeration), SNR = |mean| / std, z and whether the
   mean is within 4 standard errors of the exact gradient; for gumbel, which
   is biased by design, the bias mean - exact with its standard error, the
   relative bias and the bias by quadrature. `reinforce` is measured twice:
   with its fresh state (EMA baseline 0) and with the baseline set to the exact
   E[cost], the value its EMA tracks.
2. Training with Adam from theta = 0 until p(b=1) < --threshold, checked every
   --check_every steps (also the compiled steps_per_execution), capped at
   --max_steps; several seeds; one PNG of p(b=1) per t. Two reinforce
   references are trained too (--reinforce_references): a preset ("warm") EMA
   baseline, and no baseline.
3. Speed: wall time of each `estimate_gradients` call (and its growth with
   num_draws, --scaling_draws), training steps/s and CPU time per step from
   interleaved timed runs of --throughput_steps steps after training, and the
   variance times the CPU time per step (variance at equal compute).

    python benchmarks/toy.py                 # writes benchmarks/results/toy.{json,md} and PNGs
    python benchmarks/toy.py --seeds=0,1 --max_steps=5000 --out_dir=/tmp/toy
    python benchmarks/toy.py --from_json     # re-renders toy.md and PNGs from toy.json

toy.md is rendered from toy.json alone, and this script holds no measured
number: the notes that interpret a run (the "Reading" section) are written by
hand into toy.json's "notes" (a list of markdown bullets) after the run, and
--from_json keeps them. A new run writes toy.json without notes.
"""

import json
import math
import os
import shlex
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_IMPORT_START = time.perf_counter()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import common  # noqa: E402
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
flags.DEFINE_list(
    "estimators",
    [
        "reinforce", "critic", "critic_cv", "local_expectation", "rloo", "disarm", "relax",
        "gumbel", "gumbel_straight_through",
    ],
    "Estimators to compare (see CONFIGS).",
)
flags.DEFINE_integer("rloo_samples", 2, "compile(num_samples=K) for rloo: draws of b per step.")
flags.DEFINE_list(
    "not_applicable", ["expected", "pathwise", "reparam", "rloo@1"],
    "Estimators compiled once to record why they cannot serve the node (name@num_samples).",
)
flags.DEFINE_bool("from_json", False, "Only re-render toy.md and the plots from out_dir/toy.json.")
flags.DEFINE_bool(
    "reinforce_references", True,
    "Also train two reinforce references: 'reinforce_warm_baseline' (EMA baseline state "
    "preset to E[cost] at theta = 0) and 'reinforce_no_baseline' (baseline always 0).",
)
flags.DEFINE_integer("num_draws", 10000, "Draws per gradient-variance measurement (batch of 1 row).")
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


def closed_form_draws(estimator, t, theta, baseline=0.0, num_samples=2):
    """The per-step gradient's distribution for batch size 1: (probability, value) pairs.

    reinforce: (b - p) (c(b) - B); critic: the per-unit advantage with the exact
    Q, (b - p) (1 - p(b)) (c(b) - c(1 - b)); critic_cv and local_expectation:
    p (1 - p) (c1 - c0) for every draw (critic_cv's residual c - Q(b) is zero with
    the exact Q); rloo with K = 2 draws: the mean of (b_k - p)(c_k - c_other),
    (c1 - c0) / 2 when the two draws differ (probability 2 p (1 - p)), else 0;
    disarm: (c1 - c0) sigmoid(|theta|) / 2 when b and its antithetic partner
    differ (probability 2 min(p, 1 - p)), else 0. None for gumbel and relax (see
    `quadrature_moments`) and for rloo with K > 2.
    """
    p = sigmoid(theta)
    c1, c0 = (1.0 - t) ** 2, t**2
    if estimator in ("reinforce", "reinforce_warm_baseline", "reinforce_no_baseline"):
        return [(p, (1.0 - p) * (c1 - baseline)), (1.0 - p, -p * (c0 - baseline))]
    if estimator == "critic":
        return [(p, (1.0 - p) ** 2 * (c1 - c0)), (1.0 - p, p**2 * (c1 - c0))]
    if estimator in ("critic_cv", "local_expectation"):
        return [(1.0, p * (1.0 - p) * (c1 - c0))]
    if estimator == "rloo" and num_samples == 2:
        differ = 2.0 * p * (1.0 - p)
        return [(differ, 0.5 * (c1 - c0)), (1.0 - differ, 0.0)]
    if estimator == "disarm":
        differ = 2.0 * min(p, 1.0 - p)
        return [(differ, 0.5 * (c1 - c0) * max(p, 1.0 - p)), (1.0 - differ, 0.0)]
    return None


def quadrature_moments(estimator, t, theta, temperature=0.5, n=2_000_000, n2=1500):
    """Mean and variance of the per-draw gradient of gumbel / relax on this toy, by
    midpoint quadrature over their uniform noise (float64).

    gumbel: v = sigmoid((theta + logit u) / T), the exact head Q(v) = (v - t)^2, so
    g = 2 (v - t) v (1 - v) / T; straight-through evaluates Q at h = 1[v > 1/2]:
    g = 2 (h - t) v (1 - v) / T. relax: with b = 1[u > 1 - p], z = theta + logit u,
    z~ = theta + logit u~ (u~ ~ U(0, 1) given b, reparameterised through p) and the
    control variate c(z) = (sigmoid(z / T) - t)^2: g = (c(b) - c(z~)) (b - p) +
    dc(z)/dtheta - dc(z~)/dtheta, a 2-D integral per value of b.
    """
    def sig(x):
        return 1.0 / (1.0 + np.exp(-x))

    if estimator in ("gumbel", "gumbel_straight_through"):
        u = (np.arange(n) + 0.5) / n
        v = sig((theta + np.log(u) - np.log1p(-u)) / temperature)
        value = (v > 0.5).astype(np.float64) if estimator == "gumbel_straight_through" else v
        g = 2.0 * (value - t) * v * (1.0 - v) / temperature
        mean = float(g.mean())
        return mean, max(0.0, float((g * g).mean()) - mean**2)
    if estimator == "relax":
        p = sigmoid(theta)
        a = (np.arange(n2) + 0.5) / n2
        first, second = np.meshgrid(a, a, indexing="ij")
        m1 = m2 = 0.0
        for b, prob in ((1.0, p), (0.0, 1.0 - p)):
            def given_b(r):
                return b * (1.0 - p + r * p) + (1.0 - b) * r * (1.0 - p)

            u, uc = given_b(first), given_b(second)
            z = theta + np.log(u) - np.log1p(-u)
            zc = theta + np.log(uc) - np.log1p(-uc)
            dzc = 1.0 + p * (1.0 - p) * (b * (second - 1.0) - (1.0 - b) * second) / (uc * (1.0 - uc))
            s, sc = sig(z / temperature), sig(zc / temperature)
            g = (
                ((b - t) ** 2 - (sc - t) ** 2) * (b - p)
                + 2.0 * (s - t) * s * (1.0 - s) / temperature
                - 2.0 * (sc - t) * sc * (1.0 - sc) / temperature * dzc
            )
            m1 += prob * float(g.mean())
            m2 += prob * float((g * g).mean())
        return m1, max(0.0, m2 - m1**2)
    return None


def closed_form_moments(estimator, t, theta, baseline=0.0, num_samples=2, temperature=0.5):
    """(mean, variance, how): closed form where there is one, else quadrature, else None."""
    draws = closed_form_draws(estimator, t, theta, baseline, num_samples)
    if draws is not None:
        mean = sum(q * g for q, g in draws)
        return mean, max(0.0, sum(q * g**2 for q, g in draws) - mean**2), "closed form"
    moments = quadrature_moments(estimator, t, theta, temperature)
    if moments is not None:
        return moments[0], moments[1], "quadrature"
    return None, None, None


def gumbel_stationary_p(t, config, temperature=0.5):
    """p(b=1) at which gumbel's expected gradient (quadrature) vanishes, by bisection
    on theta in [-6, 6]: where training with it settles. None if no sign change."""
    def mean(theta):
        return quadrature_moments(config, t, theta, temperature, n=400_000)[0]

    lo, hi = -6.0, 6.0
    if mean(lo) * mean(hi) > 0:
        return None
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if mean(mid) * mean(hi) > 0:
            hi = mid
        else:
            lo = mid
    return sigmoid(0.5 * (lo + hi))


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

# Configurations that are not a plain estimator name.
CONFIGS = {
    "gumbel": "keras_bpq.estimators.Gumbel() (temperature 0.5, no annealing, relaxed value into Q)",
    "gumbel_straight_through": "keras_bpq.estimators.Gumbel(straight_through=True) (temperature 0.5)",
}
BIASED = ("gumbel", "gumbel_straight_through")  # biased by design (docs/estimators.md)


def package_estimator(config):
    if config == "reinforce_no_baseline":
        return ReinforceNoBaseline()
    if config == "reinforce_warm_baseline":
        return "reinforce"
    if config == "gumbel":
        return estimators_lib.Gumbel()
    if config == "gumbel_straight_through":
        return estimators_lib.Gumbel(straight_through=True)
    return config


def config_samples(config):
    """compile(num_samples=...) of a configuration: draws of b per example and step."""
    return FLAGS.rloo_samples if config == "rloo" else 1


def build_model(t, config, seed, learning_rate, steps_per_execution, num_samples=None):
    keras.utils.set_random_seed(seed)
    x = keras.Input((1,), name="x")
    b = keras_bpq.Bernoulli(name="b")(Logit(name="logit")(x))
    cost = keras.ops.square(b[:, 0] - t)
    model = keras_bpq.BackpropQModel(inputs=x, outputs=b, costs={"cost": cost}, name="toy")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        estimator=package_estimator(config),
        steps_per_execution=steps_per_execution,
        num_samples=config_samples(config) if num_samples is None else num_samples,
    )
    model.build_training_state()  # creates the estimator state (and critics, none here)
    if config == "reinforce_warm_baseline":
        set_baseline(model, expected_cost(as_float32(t), 0.0))
    return model


def not_applicable(t, specs):
    """Compiles each `name@num_samples` once and records its error (or its success)."""
    out = []
    for spec in specs:
        name, _, samples = spec.partition("@")
        samples = int(samples or 1)
        try:
            build_model(t, name, 0, 0.01, 1, num_samples=samples)
            error = None
        except Exception as e:  # noqa: BLE001 - the message is the result
            error = f"{type(e).__name__}: {e}"
        out.append({"estimator": name, "num_samples": samples, "error": error})
        print(f"{spec:12s} {error or 'compiles'}", flush=True)
    auto = build_model(t, "auto", 0, 0.01, 1)
    out.append({"estimator": "auto", "num_samples": 1, "error": None,
                "resolves_to": auto.node_estimators["b"].name})
    return out


def set_baseline(model, value):
    """Presets reinforce's EMA baseline so that it reads `value` (bias correction ~1)."""
    state = model.training_state.node_state["b"]
    state.baseline.assign(value)
    state.baseline_steps.assign(1e4)  # 1 - 0.99^1e4 = 1


def theta_variable(model):
    return model.get_layer("logit").theta


def summary_text(model):
    return model.scg_summary(print_fn=lambda s: None)


# -- 1. gradient variance ------------------------------------------------------
def measure_variance(t, estimator, thetas, num_draws, seed):
    model = build_model(t, estimator, seed, 0.01, 1)
    num_samples = config_samples(estimator)
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
            # One draw = the gradient of one training step: estimate_gradients tiles
            # x once per draw and run_forward repeats each row num_samples times, so
            # with rloo every draw averages the surrogate over its num_samples rows.
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
            mean_cf, variance_cf, how = closed_form_moments(
                estimator, t32, theta, baseline, num_samples
            )
            biased = estimator in BIASED
            rows.append(
                {
                    "t": t,
                    "estimator": estimator,
                    "variant": label,
                    "num_samples": num_samples,
                    "theta": theta,
                    "p": sigmoid(theta),
                    "baseline": baseline,
                    "num_draws": num_draws,
                    "mean": mean,
                    "std": std,
                    "variance": std**2,
                    "mean_closed_form": mean_cf,
                    "variance_closed_form": variance_cf,
                    "closed_form_kind": how,
                    "gradient_variance_diagnostic": diagnostics.gradient_variance([draws]),
                    "exact": exact,
                    "exact_decimal_t": exact_gradient(t, theta),
                    "exact_enumeration": enumerated,
                    "standard_error": se,
                    "z": None if zero_variance else abs(mean - exact) / se,
                    "abs_error": abs(mean - exact),
                    "within_4_se": bool(abs(mean - exact) <= 4.0 * se + rounding),
                    "biased_by_design": biased,
                    "bias": mean - exact,
                    "bias_standard_error": se,
                    "relative_bias": (mean - exact) / exact,
                    "bias_closed_form": None if mean_cf is None else mean_cf - exact,
                    "relative_bias_closed_form": None if mean_cf is None else (mean_cf - exact) / exact,
                    "z_vs_closed_form_mean": (
                        None if mean_cf is None or zero_variance else abs(mean - mean_cf) / se
                    ),
                    "zero_variance": bool(zero_variance),
                    "snr": None if zero_variance else abs(mean) / std,
                    "snr_closed_form": (
                        None if variance_cf is None or variance_cf <= (1e-6 * abs(exact)) ** 2
                        else abs(mean_cf) / math.sqrt(variance_cf)
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
        "rows_per_step": args["batch_size"] * config_samples(config),
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
    name = row["estimator"]
    if row.get("num_samples", 1) > 1:
        name += f" (K={row['num_samples']})"
    if row["variant"] == "fresh":
        return name + (" (fresh: baseline 0)" if row["estimator"] == "reinforce" else "")
    return f"{name} ({row['variant']})"


def within_text(r):
    if r["within_4_se"]:
        return "yes"
    return "NO (biased by design)" if r.get("biased_by_design") else "**NO**"


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
        var_cf = fmt(r["variance_closed_form"])
        if r.get("closed_form_kind") == "quadrature":
            var_cf += " (quadrature)"
        z = "-" if r["z"] is None else f"{r['z']:.2f}"
        lines.append(
            f"| {row_name(r)} | {r['theta']:g} | {r['p']:.3f} | {fmt(r['mean'], 4)} | {fmt(r['std'])} "
            f"| {fmt(r['variance'])} | {var_cf} | {fmt(r['exact'], 4)} | {snr} "
            f"| {snr_cf} | {z} | {within_text(r)} | {r['estimate_seconds']:.2f} |"
        )
    return lines


def bias_table(rows):
    rows = [r for r in rows if r.get("biased_by_design")]
    if not rows:
        return []
    lines = [
        "| estimator | theta | mean ± SE | exact | bias = mean - exact ± SE | relative bias "
        "| bias (quadrature) | relative bias (quadrature) | expected gradient (quadrature) "
        "| its sign |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sign = "right" if r["mean_closed_form"] * r["exact"] > 0 else "**wrong**"
        lines.append(
            f"| {row_name(r)} | {r['theta']:g} | {fmt(r['mean'], 4)} ± {fmt(r['standard_error'], 2)} "
            f"| {fmt(r['exact'], 4)} | {fmt(r['bias'], 4)} ± {fmt(r['bias_standard_error'], 2)} "
            f"| {r['relative_bias']:+.2f} | {fmt(r['bias_closed_form'], 4)} "
            f"| {r['relative_bias_closed_form']:+.3f} | {fmt(r['mean_closed_form'], 4)} | {sign} |"
        )
    return lines


def speed_of(speed, config):
    return speed.get(package_name(config))


def speed_text(speed, config):
    v = speed_of(speed, config)
    if v is None:
        return "-"
    text = f"{v['steps_per_second']:.0f}"
    return text if config not in REFERENCES else f"({text}, as reinforce)"


def cpu_text(speed, config):
    v = speed_of(speed, config)
    if v is None:
        return "-"
    text = f"{v['cpu_microseconds_per_step']:.0f}"
    return text if config not in REFERENCES else f"({text})"


def cpu_to_threshold(runs, speed, config):
    v = speed_of(speed, config)
    steps = median_steps(runs)
    if v is None or not math.isfinite(steps):
        return None
    return steps * v["cpu_microseconds_per_step"] * 1e-6


def training_table(runs_by_config, speed, max_steps):
    lines = [
        "| estimator | rows per step | median steps | steps per seed | final p(b=1) per seed "
        "| steps/s | CPU us/step | median CPU s to threshold | wall time per seed (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for config, runs in runs_by_config.items():
        if not runs:
            continue
        per_seed = ", ".join(str(r["steps"]) if r["reached"] else f">{r['steps_run']}" for r in runs)
        finals = ", ".join(f"{r['final_p']:.3f}" for r in runs)
        times = ", ".join(f"{r['seconds']:.1f}" for r in runs)
        name = config if config not in REFERENCES else f"{config} (reference)"
        cpu_total = cpu_to_threshold(runs, speed, config)
        lines.append(
            f"| {name} | {runs[0].get('rows_per_step', 1)} | {steps_text(median_steps(runs), max_steps)} "
            f"| {per_seed} | {finals} | {speed_text(speed, config)} | {cpu_text(speed, config)} "
            f"| {'-' if cpu_total is None else f'{cpu_total:.2f}'} | {times} |"
        )
    return lines


def cost_table(var_rows, speed):
    """Variance at equal compute: variance x (CPU time per step / reinforce's)."""
    base = speed.get("reinforce")
    if not base:
        return []
    thetas = sorted({r["theta"] for r in var_rows}, reverse=True)
    header = " | ".join(f"variance, theta = {th:g} | x CPU ratio" for th in thetas)
    lines = [
        f"| estimator | rows per step | CPU us/step | CPU ratio to reinforce | {header} |",
        "|---|---|---|---|" + "---|---|" * len(thetas),
    ]
    seen = []
    for r in var_rows:
        key = (r["estimator"], r["variant"])
        if key not in seen:
            seen.append(key)
    for estimator, variant in seen:
        v = speed.get(estimator)
        if v is None:
            continue
        ratio = v["cpu_microseconds_per_step"] / base["cpu_microseconds_per_step"]
        cells = []
        for th in thetas:
            row = next(
                (r for r in var_rows if (r["estimator"], r["variant"], r["theta"]) == (estimator, variant, th)),
                None,
            )
            if row is None:
                cells += ["-", "-"]
                continue
            var = 0.0 if row["zero_variance"] else row["variance"]
            cells += [fmt(var), fmt(var * ratio)]
        name = row_name({"estimator": estimator, "variant": variant,
                         "num_samples": next(r for r in var_rows if r["estimator"] == estimator)["num_samples"]})
        lines.append(
            f"| {name} | {next(r for r in var_rows if r['estimator'] == estimator)['num_samples']} "
            f"| {v['cpu_microseconds_per_step']:.0f} | {ratio:.2f} | " + " | ".join(cells) + " |"
        )
    return lines


def versions():
    """The library versions and the commit toy.md names, from `common.machine_info()`."""
    info = common.machine_info()
    out = {k: info[k] for k in ("tensorflow", "keras", "tensorflow_probability", "keras_bpq", "numpy")}
    if info.get("git_commit"):
        dirty = "keras_bpq_diff_sha1" in info
        out["git_commit"] = info["git_commit"] + (" + uncommitted keras_bpq changes" if dirty else "")
        if dirty:
            out["keras_bpq_diff_sha1"] = info["keras_bpq_diff_sha1"]
    return out


COLORS = {
    "reinforce": "tab:red",
    "critic": "tab:blue",
    "critic_cv": "tab:green",
    "local_expectation": "tab:olive",
    "rloo": "tab:purple",
    "disarm": "tab:brown",
    "relax": "tab:cyan",
    "gumbel": "tab:pink",
    "gumbel_straight_through": "magenta",
    "reinforce_warm_baseline": "tab:orange",
    "reinforce_no_baseline": "tab:gray",
}


def plot_name(t):
    return f"toy_training_t{t:g}.png"


def make_plots(results, out_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping plots.")
        return []
    k = results["settings"]["check_every"]
    paths = []
    for t in results["settings"]["targets"]:
        fig, ax = plt.subplots(figsize=(9, 5.5))
        seen = set()
        for run in results["training"]:
            if run["t"] != t:
                continue
            config = run["estimator"]
            steps = k * (np.arange(len(run["curve_p"])) + 1)
            label = None
            if config not in seen:
                _, runs, _ = grouped(results, t)
                label = f"{config}: median {steps_text(median_steps(runs[config]), results['settings']['max_steps'])}"
            ax.plot(
                steps, run["curve_p"], color=COLORS.get(config), alpha=0.65, lw=1,
                ls="--" if config in REFERENCES else (":" if config in BIASED else "-"),
                label=label,
            )
            seen.add(config)
        ax.axhline(results["settings"]["threshold"], color="k", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel("training step")
        ax.set_ylabel("p(b=1) = sigmoid(theta)")
        ax.set_title(
            f"REBAR toy, t = {t}: p(b=1) during training, one line per seed "
            f"(Adam {results['settings']['learning_rate']:g}, batch {results['settings']['batch_size']})",
            fontsize=10,
        )
        ax.legend(fontsize=7, loc="upper right", ncol=2)
        fig.tight_layout()
        path = os.path.join(out_dir, plot_name(t))
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


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


def load_text(m):
    if "load_average_at_start" not in m:
        return ""
    start_load, end_load = m["load_average_at_start"][0], m.get("load_average_at_end", [0])[0]
    text = (
        f" 1-minute load average {start_load:g} at the start and {end_load:g} at the end on "
        f"{m['cpu_count']} cores"
    )
    if max(start_load, end_load) > 0.75 * (m["cpu_count"] or 1):
        return text + (
            ": the machine was shared with other jobs, so wall times and steps/s are noisy "
            "(the best of the repeated throughput runs is shown)."
        )
    return text + "."


def write_markdown(results, path):
    s = results["settings"]
    max_steps = s["max_steps"]
    m = results["machine"]
    v = results["versions"]
    enum_error = max(
        (abs(r["exact"] - r["exact_enumeration"]) / abs(r["exact"]) for r in results["variance"]),
        default=0.0,
    )
    k_rloo = s.get("rloo_samples", 2)
    lines = [
        "## REBAR toy",
        "",
        "One Bernoulli node `b ~ Bernoulli(sigmoid(theta))` with a single learnable logit "
        "`theta` (a one-weight layer broadcast to the batch), cost `(b - t)^2` per example, "
        "functional `BackpropQModel(inputs=x, outputs=b, costs={\"cost\": cost})`. "
        "Exact gradient `(1 - 2t) sigmoid(theta) (1 - sigmoid(theta))`; the optimum is "
        "p(b=1) -> 0. Every estimator of `keras_bpq` that can serve a Bernoulli node is measured.",
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
        f"{results['import_seconds']:.0f} s of imports)." + load_text(m),
        "",
        "Settings:",
        "* Estimators: " + ", ".join(f"`{e}`" for e in s["estimators"]) + ". `rloo` is compiled "
        f"with `num_samples={k_rloo}`: every training step (and every gradient draw) holds "
        f"{k_rloo} draws of b for the one example, so its batch has {k_rloo} rows; all others "
        "have 1. `gumbel` is `keras_bpq.estimators.Gumbel()` (temperature 0.5, anneal_rate 1: "
        "constant), `gumbel_straight_through` is `Gumbel(straight_through=True)`; `relax` is the "
        "package's RELAX at its default temperature 0.5.",
        f"* Gradient variance: `keras_bpq.diagnostics.estimate_gradients(model, x, "
        f"num_draws={s['num_draws']})` with `x` a single row (batch size 1), at theta in "
        f"{{{', '.join(f'{x:g}' for x in s['thetas'])}}}. One draw is the gradient of one training "
        "step: `estimate_gradients` tiles `x` once per draw, and the model's forward pass repeats "
        "each row `num_samples` times, so an `rloo` draw averages the leave-one-out surrogate over "
        f"its {k_rloo} rows, exactly as a training step does. SNR = |mean| / std of the per-draw "
        "gradient; SNR (closed form) = |closed-form mean| / closed-form std; z = |mean - exact| / "
        "standard error; \"within 4 SE\" also allows 1e-5 relative + 1e-7 absolute for float32 "
        "rounding, and an estimator whose std is below that is reported as zero variance. The "
        "exact gradient is the closed form for the float32 value of t that the graph holds "
        "(0.499 is stored as 0.49900001, which moves the exact gradient by 1.3e-5 relative); "
        f"`diagnostics.exact_gradients` (enumeration, float32) agrees with it to {enum_error:.1e} "
        "relative or better in every row. Closed-form moments: from the per-draw values given "
        "b (reinforce, critic, critic_cv, local_expectation, rloo with K = 2, disarm); for "
        "gumbel and relax, midpoint quadrature over their uniform noise in float64 (2e6 points; "
        "relax: a 1500 x 1500 grid per value of b), which also gives gumbel's exact bias. "
        "Estimate time: one `estimate_gradients` call of all draws; the first theta of each "
        "estimator includes the trace of its tf.function (cached per model afterwards).",
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
        "Bernoulli and relaxation noise).",
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
        "seed includes the first trace of the training step. \"Variance x CPU ratio\" is the "
        "per-step variance times the CPU time per step relative to `reinforce`: the variance "
        "at equal compute (averaging n draws divides the variance by n and multiplies the cost "
        "by n), lower is better.",
        "* **Q is exact here, not learned.** `b` is the cost's last stochastic ancestor, so "
        "every estimator with a critic (`critic`, `critic_cv`, `local_expectation`, `relax`, "
        "`gumbel`) uses the cost itself, re-evaluated with `b` forced to other values, as Q "
        "(`scg_summary` shows `exact[cost]`); no critic network exists and the critic "
        "optimizer is unused. For `critic`, `critic_cv` and `local_expectation` that is the "
        "exact Q at b = 0 and b = 1: these are the critic estimators at their best, not a test "
        "of critic learning. `relax`'s control variate is the same head evaluated at relaxed "
        "samples, c(z) = (sigmoid(z / 0.5) - t)^2 (nothing tunes it towards low variance), and "
        "`gumbel` differentiates that same relaxed cost. `disarm` re-runs the cost at the "
        "antithetic sample.",
        "",
    ]
    na = results.get("not_applicable") or []
    if na:
        lines += [
            "### Estimators that cannot serve this node",
            "",
            "Each compiled once on this model; the error is raised by `compile()`:",
            "",
            "| estimator | num_samples | result |",
            "|---|---|---|",
        ]
        for r in na:
            if r.get("resolves_to"):
                result = f"compiles; resolves to `{r['resolves_to']}` (the default)"
            else:
                result = "compiles" if r["error"] is None else f"`{r['error']}`"
            lines.append(f"| {r['estimator']} | {r['num_samples']} | {result} |")
        lines.append("")
    for t in s["targets"]:
        var_rows, runs, speed = grouped(results, t)
        lines += [
            f"### t = {t}",
            "",
            f"Exact gradient at theta = 0: {exact_gradient(t, 0.0):.4g}; cost gap "
            f"c(1) - c(0) = 1 - 2t = {1 - 2 * t:.3g}.",
            "",
            "Per-step gradient draws, batch of one example:",
            "",
            *variance_table(var_rows),
            "",
        ]
        bias = bias_table(var_rows)
        if bias:
            lines += [
                "Bias of the biased-by-design estimators (measured, and by quadrature):",
                "",
                *bias,
                "",
            ]
        cost = cost_table(var_rows, speed)
        if cost:
            lines += [
                "Variance at equal compute (per-step variance x CPU time per step relative to "
                "`reinforce`; zero-variance rows stay 0):",
                "",
                *cost,
                "",
            ]
        lines += [
            f"Training from theta = 0 to p(b=1) < {s['threshold']:g} (budget {max_steps} steps):",
            "",
            *training_table(runs, speed, max_steps),
            "",
        ]
        for plot in results.get("plots", []):
            if os.path.basename(plot) == plot_name(t):
                lines += [f"![p(b=1) during training at t = {t}, every estimator and seed]"
                          f"({os.path.basename(plot)})", ""]
    if results.get("estimate_scaling"):
        lines += [
            "### Cost of `estimate_gradients` against num_draws",
            "",
            f"One call each on one `reinforce` model, t = {s['targets'][0]}, theta = 0, batch "
            "of one row; `estimate_gradients` caches its tf.function per model, so only the "
            "first call includes the trace:",
            "",
            "| num_draws | seconds |",
            "|---|---|",
            *[f"| {r['num_draws']} | {r['seconds']:.2f} |" for r in results["estimate_scaling"]],
            "",
        ]
    lines += ["### Reading", ""]
    lines += reading(results)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def reading(results):
    """The measured ranking per t and the unbiasedness check (computed), then
    the interpretation: `results["notes"]`, written by hand into toy.json for
    the run it holds (a new run starts without notes), the cost lines
    (computed) and `CAVEAT`."""
    s = results["settings"]
    notes = results.get("notes") or []
    out = [
        "The ranking, unbiasedness and cost lines are computed by the script"
        + (
            "; the notes after them were written from the default run (`python benchmarks/toy.py`) "
            "and quote its numbers."
            if notes else "."
        ),
        "",
    ]
    for t in s["targets"]:
        _, runs, _ = grouped(results, t)
        medians = {config: median_steps(r) for config, r in runs.items() if r}
        order = sorted(medians, key=lambda c: medians[c])
        ranking = "; ".join(f"{c} {steps_text(medians[c], s['max_steps'])}" for c in order)
        out.append(f"* Median steps to p(b=1) < {s['threshold']:g} at **t = {t}**: {ranking}.")
    unbiased = [r for r in results["variance"] if not r.get("biased_by_design")]
    failures = [r for r in unbiased if not r["within_4_se"]]
    text = (
        f"* **Unbiasedness.** {len(unbiased) - len(failures)} of {len(unbiased)} rows of the "
        "estimators docs/estimators.md marks unbiased (with the exact Q here) have their mean within 4 "
        "standard errors of the exact gradient"
    )
    if failures:
        text += "; outside: " + ", ".join(
            f"{row_name(r)} at t = {r['t']}, theta = {r['theta']:g} (z = {r['z']:.1f})" for r in failures
        )
    cf = [r for r in results["variance"] if r.get("variance_closed_form") and not r["zero_variance"]]
    if cf:
        worst = max(cf, key=lambda r: abs(r["variance"] / r["variance_closed_form"] - 1))
        text += (
            f". Measured variances match the closed forms / quadrature to within "
            f"{100 * abs(worst['variance'] / worst['variance_closed_form'] - 1):.0f}% "
            f"(worst: {row_name(worst)}, t = {worst['t']}, theta = {worst['theta']:g})"
        )
    out.append(text + ".")
    biased = [c for c in s["configs"] if c in BIASED]
    if biased:
        items = []
        for t in s["targets"]:
            _, runs, _ = grouped(results, t)
            for config in biased:
                stationary = gumbel_stationary_p(as_float32(t), config)
                finals = [r["final_p"] for r in runs.get(config, [])]
                items.append(
                    f"{config} at t = {t}: p = {fmt(stationary)}"
                    + (f" (final p of training {min(finals):.3f}-{max(finals):.3f})" if finals else "")
                )
        out.append(
            "* **Where gumbel settles.** The p(b=1) at which its expected gradient (quadrature) "
            "is zero: " + "; ".join(items) + "."
        )
    return out + notes + cost_notes(results) + [CAVEAT]


def cost_notes(results):
    """The timing notes, computed from this run's numbers."""
    s = results["settings"]
    speed = results.get("throughput", {})
    parts = []
    for t in s["targets"]:
        base = speed.get(f"{t}/reinforce")
        if not base:
            continue
        _, runs, _ = grouped(results, t)
        items = []
        for config in runs:
            if config in REFERENCES or f"{t}/{config}" not in speed:
                continue
            ratio = speed[f"{t}/{config}"]["cpu_microseconds_per_step"] / base["cpu_microseconds_per_step"]
            items.append(f"{config} {ratio:.2f}")
        parts.append(
            f"* **Cost per step, t = {t}** (CPU time per step relative to `reinforce`, batch "
            f"{s['batch_size']}, `steps_per_execution={s['steps_per_execution']}`): "
            + ", ".join(items) + "."
        )
    times = [r["estimate_seconds"] for r in results["variance"]]
    if times:
        text = (
            f"* **estimate_gradients.** One vectorised call of {s['num_draws']} draws took "
            f"{min(times):.2f}-{max(times):.2f} s wall time across estimators (the first theta "
            "of each includes the trace)."
        )
        scaling = results.get("estimate_scaling") or []
        if len(scaling) >= 3:
            (n1, t1), (n2, t2) = [(r["num_draws"], r["seconds"]) for r in scaling[-2:]]
            exponent = math.log(t2 / t1) / math.log(n2 / n1)
            text += (
                f" In the scaling table {scaling[0]['num_draws']} draws cost "
                f"{scaling[0]['seconds']:.2f} s (the trace), and from {n1} to {n2} draws "
                f"the time grew like num_draws^{exponent:.1f}."
            )
        parts.append(text)
    return parts


def package_name(config):
    """The package estimator whose steps/s a training configuration shares."""
    return "reinforce" if config in REFERENCES else config


# The closing caveat of the reading: true of the method on this toy, whatever a run measured.
CAVEAT = (
    "* **Caveat.** This toy is the best case for the critic estimators: Q is the exact cost, "
    "not a learned network. It checks the estimators' algebra and their variance when Q is "
    "right; it says nothing about how fast a learned critic becomes right."
)


def print_report(results):
    s = results["settings"]
    for t in s["targets"]:
        var_rows, runs, speed = grouped(results, t)
        print(f"\n=== t = {t}  (exact gradient at theta=0: {exact_gradient(t, 0.0):.4g}) ===")
        print(f"{'estimator':36s} {'theta':>6s} {'mean':>11s} {'std':>10s} {'var':>10s} "
              f"{'var(cf)':>10s} {'exact':>11s} {'SNR':>9s} {'z':>6s} {'4SE':>4s} {'time':>6s}")
        for r in var_rows:
            snr = "inf" if r["snr"] is None else f"{r['snr']:.3g}"
            z = "-" if r["z"] is None else f"{r['z']:.2f}"
            print(f"{row_name(r):36s} {r['theta']:6g} {r['mean']:11.4e} {r['std']:10.3e} "
                  f"{r['variance']:10.3e} {fmt(r['variance_closed_form']):>10s} {r['exact']:11.4e} "
                  f"{snr:>9s} {z:>6s} {'ok' if r['within_4_se'] else 'NO':>4s} "
                  f"{r['estimate_seconds']:6.2f}")
        print(f"\n{'training':24s} {'median':>22s}  steps per seed | final p | steps/s")
        for config, config_runs in runs.items():
            if not config_runs:
                continue
            per_seed = [r["steps"] if r["reached"] else f">{r['steps_run']}" for r in config_runs]
            finals = [round(r["final_p"], 3) for r in config_runs]
            print(f"{config:24s} {steps_text(median_steps(config_runs), s['max_steps']):>22s}  "
                  f"{per_seed} | {finals} | {speed_text(speed, config)}")


def render(results, out_dir):
    if FLAGS.plots:
        results["plots"] = make_plots(results, out_dir)
    print_report(results)
    write_markdown(results, os.path.join(out_dir, "toy.md"))


def main(argv):
    del argv
    if FLAGS.from_json:
        with open(os.path.join(FLAGS.out_dir, "toy.json")) as f:
            results = json.load(f)
        render(results, FLAGS.out_dir)
        with open(os.path.join(FLAGS.out_dir, "toy.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(f"re-rendered {FLAGS.out_dir}/toy.md from toy.json")
        return
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
        "config_descriptions": {c: CONFIGS[c] for c in configs if c in CONFIGS},
        "rloo_samples": FLAGS.rloo_samples,
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
        "machine": common.machine_info(),
        "versions": versions(),
        "import_seconds": IMPORT_SECONDS,
        "settings": settings,
        "not_applicable": not_applicable(targets[0], FLAGS.not_applicable),
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
                for r in rows:
                    print(f"t={t} {row_name(r):32s} theta={r['theta']:g}: mean {r['mean']:.4e} "
                          f"std {r['std']:.3e} exact {r['exact']:.4e} "
                          f"{'ok' if r['within_4_se'] else 'NOT within 4 SE'} "
                          f"({r['estimate_seconds']:.1f}s)", flush=True)
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
    results["total_seconds"] = time.perf_counter() - start_all
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    with open(os.path.join(FLAGS.out_dir, "toy.json"), "w") as f:
        json.dump(results, f, indent=1)
    render(results, FLAGS.out_dir)
    with open(os.path.join(FLAGS.out_dir, "toy.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {FLAGS.out_dir}/toy.json and toy.md in {results['total_seconds']:.0f}s "
          f"(+{IMPORT_SECONDS:.0f}s imports)")


if __name__ == "__main__":
    app.run(main)
