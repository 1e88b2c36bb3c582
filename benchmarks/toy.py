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

toy.md is rendered from toy.json alone (`render.toy`; `python
benchmarks/render.py benchmarks/results/toy.json` rewrites it without
TensorFlow), and this script holds no measured number: the notes that
interpret a run (the "Reading" section) are written by hand into toy.json's
"notes" (a list of markdown bullets) after the run, and --from_json keeps
them. A new run writes toy.json without notes.
"""

import json
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_IMPORT_START = time.perf_counter()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import common  # noqa: E402
import keras  # noqa: E402
import render  # noqa: E402
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
# toy.md and its plots are rendered from toy.json by render.toy; the console
# summary uses its helpers.
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


def gumbel_settle_points(results):
    """Per t, the p(b=1) at which each biased configuration's expected gradient
    vanishes (`gumbel_stationary_p`, quadrature): where training with it settles."""
    s = results["settings"]
    return {str(t): {c: gumbel_stationary_p(as_float32(t), c) for c in s["configs"] if c in BIASED}
            for t in s["targets"]}


def print_report(results):
    s = results["settings"]
    for t in s["targets"]:
        var_rows, runs, speed = render.toy_grouped(results, t)
        print(f"\n=== t = {t}  (exact gradient at theta=0: {exact_gradient(t, 0.0):.4g}) ===")
        print(f"{'estimator':36s} {'theta':>6s} {'mean':>11s} {'std':>10s} {'var':>10s} "
              f"{'var(cf)':>10s} {'exact':>11s} {'SNR':>9s} {'z':>6s} {'4SE':>4s} {'time':>6s}")
        for r in var_rows:
            snr = "inf" if r["snr"] is None else f"{r['snr']:.3g}"
            z = "-" if r["z"] is None else f"{r['z']:.2f}"
            print(f"{render.toy_row_name(r):36s} {r['theta']:6g} {r['mean']:11.4e} {r['std']:10.3e} "
                  f"{r['variance']:10.3e} {render.toy_fmt(r['variance_closed_form']):>10s} {r['exact']:11.4e} "
                  f"{snr:>9s} {z:>6s} {'ok' if r['within_4_se'] else 'NO':>4s} "
                  f"{r['estimate_seconds']:6.2f}")
        print(f"\n{'training':24s} {'median':>22s}  steps per seed | final p | steps/s")
        for config, config_runs in runs.items():
            if not config_runs:
                continue
            per_seed = [r["steps"] if r["reached"] else f">{r['steps_run']}" for r in config_runs]
            finals = [round(r["final_p"], 3) for r in config_runs]
            median = render.toy_steps_text(render.toy_median_steps(config_runs), s["max_steps"])
            print(f"{config:24s} {median:>22s}  {per_seed} | {finals} | "
                  f"{render.toy_speed(results, speed, config)[0]}")


def write_outputs(results, out_dir):
    """The settle points of the biased estimators (once), the console summary,
    toy.md and its plots (`plots`: a PNG per t, drawn by `render.toy_training_plot`)
    and toy.json."""
    results["plots"] = [render.toy_plot(t) for t in results["settings"]["targets"]]
    if "gumbel_stationary_p" not in results:
        results["gumbel_stationary_p"] = gumbel_settle_points(results)
    print_report(results)
    render.write("toy", results, os.path.join(out_dir, "toy.md"))
    common.write_json(os.path.join(out_dir, "toy.json"), results)


def main(argv):
    del argv
    if FLAGS.from_json:
        with open(os.path.join(FLAGS.out_dir, "toy.json")) as f:
            results = json.load(f)
        write_outputs(results, FLAGS.out_dir)
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
        "command": common.command_line(),
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
                    print(f"t={t} {render.toy_row_name(r):32s} theta={r['theta']:g}: mean {r['mean']:.4e} "
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
    results["total_seconds"] = time.perf_counter() - start_all
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    common.write_json(os.path.join(FLAGS.out_dir, "toy.json"), results)
    write_outputs(results, FLAGS.out_dir)
    print(f"\nwrote {FLAGS.out_dir}/toy.json and toy.md in {results['total_seconds']:.0f}s "
          f"(+{IMPORT_SECONDS:.0f}s imports)")


if __name__ == "__main__":
    app.run(main)
