"""Encoder gradient variance of the two-layer SBN (examples/sbn.py) on digits.

The claim under test: on the sigmoid belief net of `examples/sbn.py`, the
`critic_cv` estimator with learned per-node critics (the default before
common-noise heads) gives
encoder gradients of much lower variance than `reinforce` (score function with
an EMA baseline), at a bounded cost per step, while the pure-advantage
`critic` estimator is biased wherever its critic is learned.

Protocol:

1. Train one model with the default estimator for --steps steps (batch
   --batch_size, Adam --learning_rate, --steps_per_execution), on scikit-learn
   digits dynamically binarised by the example's own pipeline.
2. At every step count in --checkpoints, on one fixed binarised batch of
   --batch_size training images, draw --num_draws independent gradient
   estimates of the ENCODER variables (q_z1, q_z2 kernels and biases) with
   `keras_bpq.diagnostics.estimate_gradients`, for three estimators at the SAME
   weights:
   * `critic_cv`: the trained model itself (its current critics);
   * `reinforce`: a second model with the actor weights copied by position;
     its EMA baselines (zero when built) are first warmed up on
     --baseline_warmup_steps training batches by `fit` with `SGD(0.0)`, which
     runs the baseline update but leaves the weights unchanged (checked);
   * `critic`: a third model with the actor weights AND every critic weight
     (online and target copies, `model.training_state.weights` by position) copied.
   Draws are taken in chunks of --chunk (see "memory" below) and concatenated.
3. Per checkpoint and estimator: total variance (sum over encoder entries of
   the per-entry variance across draws, `diagnostics.gradient_variance`), its
   log10 ratio to reinforce with a bootstrap 95% interval, and the squared
   distance of the mean estimate to the critic_cv mean, next to the value that
   Monte-Carlo noise alone gives two unbiased estimators, (V_a + V_cv) / N.
4. Speed: training steps/s of each estimator (fresh models, `fit` of
   --timing_steps steps after a compile/warm-up fit, --timing_repeats repeats
   interleaved across estimators, median reported); the time per gradient
   estimate is 1 / (steps/s) of that fit (one step = one estimate for a batch,
   plus the critic update where there is one). The wall time of the
   `estimate_gradients` calls is recorded too (secondary: it includes a
   retrace per call).

Memory: `estimate_gradients` forms a Jacobian over the draws with pfor, whose
intermediates grow with num_draws^2 (every draw's backward pass is vectorised
over the whole tiled batch). At 500 draws in one call the critic_cv SBN asks
for >1.5 GB single buffers and crashed a 23 GB machine, hence --chunk.

    python benchmarks/sbn_variance.py   # writes benchmarks/results/sbn_variance.{json,md}
    python benchmarks/sbn_variance.py --steps=200 --checkpoints=0,200 --num_draws=100 \
        --timing_steps=100 --out_dir=/tmp/sbn_variance
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import common  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import render  # noqa: E402

from keras_bpq import diagnostics  # noqa: E402

_ROOT = common.ROOT
binarised = common.example("sbn").binarised  # examples/sbn.py's
build_sbn = common.example("sbn").build_sbn
load_digits = common.example("sbn").load_digits

FLAGS = flags.FLAGS
# examples/sbn.py's flags (define_flags), which this script reuses: --steps
# (default lowered to 3000 here), --batch_size, --learning_rate,
# --steps_per_execution, --z1, --z2, --seed and --jit_compile. Its --estimator
# is not used: this script compares the estimators itself.
common.example("sbn").define_flags()
FLAGS.set_default("steps", 3000)
flags.DEFINE_list("checkpoints", ["0", "1000", "3000"], "Step counts at which variance is measured.")
flags.DEFINE_integer("num_draws", 500, "Gradient draws per estimator and checkpoint.")
flags.DEFINE_integer("chunk", 50, "Draws per estimate_gradients call (memory grows as chunk^2).")
flags.DEFINE_integer("baseline_warmup_steps", 50, "Batches that warm up reinforce's EMA baseline.")
flags.DEFINE_integer("timing_steps", 1000, "Training steps per timed fit.")
flags.DEFINE_integer("timing_repeats", 8, "Timed fits per estimator (best and median reported).")
flags.DEFINE_integer("bootstrap", 200, "Bootstrap resamples for the variance-ratio intervals.")
flags.DEFINE_string("out_dir", os.path.join(_ROOT, "benchmarks", "results"), "Output directory.")

ESTIMATORS = ("critic_cv", "reinforce", "critic")
GROUPS = ("q_z1", "q_z2")


def log(message):
    print(message, flush=True)


def new_model(estimator, optimizer=None):
    """A fresh SBN compiled like the example, with its machinery created."""
    model = build_sbn(64, FLAGS.z1, FLAGS.z2)
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(FLAGS.learning_rate),
        estimator=estimator,
        steps_per_execution=FLAGS.steps_per_execution,
        jit_compile=FLAGS.jit_compile,
    )
    model.scg_summary(print_fn=lambda s: None)  # creates estimator state and critics
    return model


def encoder_indices(model):
    """Positions in `model.actor_variables` of the encoder (q_z1, q_z2) variables."""
    return [i for i, v in enumerate(model.actor_variables) if v.path.split("/")[0] in GROUPS]


def copy_by_position(dst, src, what):
    if len(dst) != len(src):
        raise ValueError(f"{what}: {len(dst)} variables vs {len(src)}")
    for a, b in zip(dst, src):
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"{what}: {a.path} {a.shape} vs {b.path} {b.shape}")
        a.assign(b)


def draw_encoder_gradients(model, x, num_draws):
    """`[num_draws, entries]` encoder gradients, in chunks; and the seconds spent."""
    index = encoder_indices(model)
    chunks = []

    def draw():
        left = num_draws
        while left > 0:
            n = min(FLAGS.chunk, left)
            grads = diagnostics.estimate_gradients(model, x, num_draws=n)
            chunks.append(np.concatenate([grads[i].reshape(n, -1) for i in index], axis=1))
            left -= n

    seconds = common.seconds_of(draw)
    return np.concatenate(chunks, axis=0), seconds


def group_slices(model):
    """`{group: slice}` of the flattened encoder vector."""
    slices, offset = {}, 0
    for i in encoder_indices(model):
        v = model.actor_variables[i]
        size = int(np.prod(v.shape))
        group = v.path.split("/")[0]
        lo = slices[group].start if group in slices else offset
        slices[group] = slice(lo, offset + size)
        offset += size
    return slices


def total_variance(draws):
    return diagnostics.gradient_variance([draws])


def bootstrap_log_ratio(a, b, rng, resamples):
    """95% interval of log10(V(a) / V(b)), resampling the draws of each."""
    if resamples <= 0:
        return None
    values = []
    for _ in range(resamples):
        ia = rng.integers(0, len(a), len(a))
        ib = rng.integers(0, len(b), len(b))
        values.append(np.log10(np.var(a[ia], 0, ddof=1).sum() / np.var(b[ib], 0, ddof=1).sum()))
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def mean_distance(a, ref):
    """Squared distance of the means, the same expected from noise alone if both
    are unbiased, and how many entries differ by more than 4 standard errors."""
    n_a, n_r = len(a), len(ref)
    diff = a.mean(0) - ref.mean(0)
    se2 = np.var(a, 0, ddof=1) / n_a + np.var(ref, 0, ddof=1) / n_r
    sq = float(np.sum(diff**2))
    floor = float(np.sum(se2))
    z = np.abs(diff) / np.sqrt(se2 + 1e-30)
    return {
        "sq_dist_to_cv_mean": sq,
        "noise_floor": floor,
        "ratio_to_floor": sq / floor if floor > 0 else float("nan"),
        "entries_beyond_4se": int(np.sum(z > 4)),
        "entries": int(diff.size),
    }


def reinforce_at(model, train, checkpoint):
    """A reinforce model at `model`'s actor weights, EMA baselines warmed up."""
    rf = new_model("reinforce", optimizer=keras.optimizers.SGD(0.0))
    copy_by_position(rf.actor_variables, model.actor_variables, "actor")
    before = [v.numpy().copy() for v in rf.actor_variables]
    warm = FLAGS.baseline_warmup_steps
    if warm > 0:
        data = binarised(train, FLAGS.batch_size, FLAGS.seed + 10_000 + checkpoint, repeat=True)
        rf.fit(data, epochs=1, steps_per_epoch=warm, verbose=0)
    for old, v in zip(before, rf.actor_variables):
        if not np.array_equal(old, v.numpy()):
            raise RuntimeError(f"SGD(0.0) warm-up changed {v.path}")
    baselines = {
        w.path.split("/")[-1]: float(w.numpy())
        for w in rf.training_state.weights
        if w.path.endswith("_baseline") or w.path.endswith("_baseline_steps")
    }
    decay = 0.99
    corrected = {
        node: baselines[f"{node}_baseline"] / (1 - decay ** baselines[f"{node}_baseline_steps"])
        for node in ("z1", "z2")
        if baselines.get(f"{node}_baseline_steps", 0) > 0
    }
    return rf, {"raw": baselines, "bias_corrected": corrected}


def critic_at(model):
    """A `critic`-estimator model at `model`'s actor and critic weights."""
    cr = new_model("critic")
    copy_by_position(cr.actor_variables, model.actor_variables, "actor")
    # machinery.weights holds the online critics, their target copies (which
    # the actor reads by default) and the step counters; critic_variables
    # holds the online copies only.
    copy_by_position(cr.training_state.weights, model.training_state.weights, "machinery")
    return cr


def negative_elbo(model, images):
    data = binarised(np.tile(images, (10, 1)), 500, FLAGS.seed + 1, repeat=False)
    return float(model.evaluate(data, verbose=0, return_dict=True)["loss"])


def measure_checkpoint(model, train, test, x, checkpoint, rng):
    log(f"[step {checkpoint}] measuring {FLAGS.num_draws} draws per estimator")
    models = {"critic_cv": model}
    models["reinforce"], baselines = reinforce_at(model, train, checkpoint)
    models["critic"] = critic_at(model)
    draws, seconds = {}, {}
    for name in ESTIMATORS:
        draws[name], seconds[name] = draw_encoder_gradients(models[name], x, FLAGS.num_draws)
    slices = group_slices(model)
    result = {
        "step": checkpoint,
        "test_negative_elbo": negative_elbo(model, test),
        "reinforce_baselines": baselines,
        "estimators": {},
    }
    ref = draws["critic_cv"]
    for name in ESTIMATORS:
        d = draws[name]
        entry = {
            "total_variance": total_variance(d),
            "variance_by_layer": {g: total_variance(d[:, s]) for g, s in slices.items()},
            "log10_ratio_to_reinforce": float(
                np.log10(total_variance(d) / total_variance(draws["reinforce"]))
            ),
            "log10_ratio_to_reinforce_by_layer": {
                g: float(np.log10(total_variance(d[:, s]) / total_variance(draws["reinforce"][:, s])))
                for g, s in slices.items()
            },
            "log10_ratio_ci95": None
            if name == "reinforce"
            else bootstrap_log_ratio(d, draws["reinforce"], rng, FLAGS.bootstrap),
            "mean_sq_norm": float(np.sum(d.mean(0) ** 2)),
            "estimate_gradients_seconds": seconds[name],
            "estimate_gradients_ms_per_draw": 1000 * seconds[name] / FLAGS.num_draws,
        }
        if name != "critic_cv":
            entry["vs_critic_cv_mean"] = mean_distance(d, ref)
            entry["vs_critic_cv_mean_by_layer"] = {
                g: mean_distance(d[:, s], ref[:, s]) for g, s in slices.items()
            }
        result["estimators"][name] = entry
        log(
            f"  {name:10s} var {entry['total_variance']:.4g}  log10/reinforce "
            f"{entry['log10_ratio_to_reinforce']:+.2f}  ({seconds[name]:.1f}s)"
        )
    for name in ("reinforce", "critic"):
        m = result["estimators"][name]["vs_critic_cv_mean_by_layer"]
        log(f"  {name} vs cv mean: " + ", ".join(
            f"{g} {v['sq_dist_to_cv_mean']:.3g} (noise {v['noise_floor']:.3g}, >4se {v['entries_beyond_4se']})"
            for g, v in m.items()))
    return result


def time_training(train):
    """Training steps/s per estimator: fresh models, warm-up fit, timed fits."""
    names = {"auto (critic_cv)": "auto", "reinforce": "reinforce", "critic": "critic"}
    models, runs, cpu_ms, short = {}, {k: [] for k in names}, {k: [] for k in names}, {k: [] for k in names}
    short_steps = FLAGS.steps_per_execution
    for label, est in names.items():
        keras.utils.set_random_seed(FLAGS.seed)
        models[label] = new_model(est)
        data = binarised(train, FLAGS.batch_size, FLAGS.seed, repeat=True)
        models[label].fit(data, epochs=1, steps_per_epoch=2 * FLAGS.steps_per_execution, verbose=0)
    for r in range(FLAGS.timing_repeats):
        for label in names:
            data = binarised(train, FLAGS.batch_size, FLAGS.seed + 100 + r, repeat=True)
            start, cpu = time.perf_counter(), time.process_time()
            models[label].fit(data, epochs=1, steps_per_epoch=FLAGS.timing_steps, verbose=0)
            runs[label].append(FLAGS.timing_steps / (time.perf_counter() - start))
            cpu_ms[label].append(1000 * (time.process_time() - cpu) / FLAGS.timing_steps)
            # A one-execution fit: its time is mostly the per-fit overhead.
            short[label].append(
                common.seconds_of(lambda: models[label].fit(data, epochs=1, steps_per_epoch=short_steps, verbose=0)))
    out = {}
    for label, rates in runs.items():
        median, best = float(np.median(rates)), float(np.max(rates))
        out[label] = {
            "steps_per_s": rates,
            "median_steps_per_s": median,
            "best_steps_per_s": best,
            "ms_per_step": 1000 / best,
            "ms_per_step_median": 1000 / median,
            "cpu_ms_per_step": cpu_ms[label],
            "cpu_ms_per_step_median": float(np.median(cpu_ms[label])),
            "short_fit_steps": short_steps,
            "short_fit_s": short[label],
            # (best long fit - best short fit) / extra steps: the per-fit overhead removed.
            "marginal_ms_per_step": 1000 * (FLAGS.timing_steps / best - min(short[label]))
            / (FLAGS.timing_steps - short_steps),
        }
        log(f"  {label:16s} best {best:.1f} steps/s ({1000 / best:.2f} ms/step), median "
            f"{median:.1f}, CPU {np.median(cpu_ms[label]):.2f} ms/step  runs {np.round(rates, 1)}")
    return out


def fold(log10_ratio):
    """`-1.3` -> "20x lower", `+0.4` -> "2.5x higher"."""
    factor = 10 ** abs(log10_ratio)
    text = f"{factor:.0f}x" if factor >= 10 else f"{factor:.1f}x"
    return f"{text} {'lower' if log10_ratio < 0 else 'higher'}"


def reading(report):
    """A short reading of the numbers, computed from them (not assumed)."""
    cps, timing = report["checkpoints"], report["timing"]
    out = []
    ratios = [cp["estimators"]["critic_cv"]["log10_ratio_to_reinforce"] for cp in cps]
    parts = []
    for cp, r in zip(cps, ratios):
        by = cp["estimators"]["critic_cv"]["log10_ratio_to_reinforce_by_layer"]
        parts.append(
            f"step {cp['step']}: {fold(r)} (log10 {r:+.2f}; q_z1 {by['q_z1']:+.2f}, "
            f"q_z2 {by['q_z2']:+.2f})"
        )
    out.append(
        "Variance: the default (critic_cv) encoder gradient variance relative to "
        "reinforce's at the same weights: " + "; ".join(parts) + ". q_z2's gradient comes "
        "from z2's critic, which is exact (cost re-evaluation) from step 0; q_z1's uses z1's "
        "learned kl1/kl2 heads, so the q_z1 column shows what the learned critic adds (an "
        "untrained critic used as a control variate can add variance)."
    )
    t_cv = timing["auto (critic_cv)"]["ms_per_step"]
    t_rf = timing["reinforce"]["ms_per_step"]
    t_cr = timing["critic"]["ms_per_step"]
    med = timing["auto (critic_cv)"]["ms_per_step_median"] / timing["reinforce"]["ms_per_step_median"]
    cpu = timing["auto (critic_cv)"]["cpu_ms_per_step_median"] / timing["reinforce"]["cpu_ms_per_step_median"]
    marg = timing["auto (critic_cv)"]["marginal_ms_per_step"] / timing["reinforce"]["marginal_ms_per_step"]
    work = [r + np.log10(t_cv / t_rf) for r in ratios]
    per_repeat = [
        b / a
        for a, b in zip(
            timing["auto (critic_cv)"]["steps_per_s"], timing["reinforce"]["steps_per_s"]
        )
    ]
    out.append(
        f"Time: a default training step costs {t_cv:.2f} ms vs {t_rf:.2f} ms for reinforce "
        f"(best runs: {t_cv / t_rf:.1f}x; medians: {med:.1f}x; CPU time: {cpu:.1f}x; marginal: "
        f"{marg:.1f}x; `critic` "
        f"{t_cr / t_rf:.1f}x). "
        "Variance x time per estimate (best runs) "
        "(equal-compute comparison: reinforce could average that many more draws in the "
        "same time) for the default: "
        + ", ".join(f"step {cp['step']}: {fold(w)}" for cp, w in zip(cps, work))
        + f". The time ratio of the interleaved repeat pairs ranges from "
        f"{min(per_repeat):.1f}x to {max(per_repeat):.1f}x on this shared machine, so "
        "read the equal-compute figure as uncertain by about that spread."
    )
    crit = []
    for cp in cps:
        by = cp["estimators"]["critic"]["vs_critic_cv_mean_by_layer"]
        crit.append(
            f"step {cp['step']}: q_z1 {by['q_z1']['ratio_to_floor']:.1f}x the noise floor "
            f"({by['q_z1']['entries_beyond_4se']} entries > 4 SE), q_z2 "
            f"{by['q_z2']['ratio_to_floor']:.1f}x ({by['q_z2']['entries_beyond_4se']})"
        )
    rf = [cp["estimators"]["reinforce"]["vs_critic_cv_mean"]["ratio_to_floor"] for cp in cps]
    biased = [
        g for g in GROUPS
        if any(cp["estimators"]["critic"]["vs_critic_cv_mean_by_layer"][g]["entries_beyond_4se"] > 2
               for cp in cps)
    ]
    out.append(
        "Bias of `critic`: its mean sits away from the unbiased critic_cv mean by "
        + "; ".join(crit)
        + ". The control (reinforce vs critic_cv, both unbiased) gives "
        + ", ".join(f"{r:.1f}x" for r in rf)
        + ". Layers with more than 2 entries beyond 4 SE at some checkpoint: "
        + (", ".join(biased) if biased else "none")
        + ". In this SBN only z1's kl1/kl2 heads are learned (z1's recon head and all of "
        "z2's heads are exact re-evaluations of the cost with the node forced), so "
        "`critic` can only be biased through q_z1's gradient (q_z2's comes from an exact Q)."
    )
    cr = [cp["estimators"]["critic"]["log10_ratio_to_reinforce"] for cp in cps]
    out.append(
        "`critic` variance vs reinforce (log10): " + ", ".join(f"{r:+.2f}" for r in cr)
        + "; its low variance comes with the bias above."
    )
    return out


def main(argv):
    del argv
    start_all = time.perf_counter()
    machine = common.machine_info()  # at the start: the sources this run imported
    if FLAGS.estimator != "auto":
        raise app.UsageError("--estimator (from examples/sbn.py) is not used: the model is "
                             "trained with 'auto' and compared with reinforce and critic.")
    checkpoints = sorted({int(c) for c in FLAGS.checkpoints})
    if checkpoints[-1] > FLAGS.steps:
        raise app.UsageError(f"checkpoint {checkpoints[-1]} > --steps={FLAGS.steps}")
    keras.utils.set_random_seed(FLAGS.seed)
    rng = np.random.default_rng(FLAGS.seed)
    train, test = load_digits(FLAGS.seed)
    # One fixed binarisation of the first batch of training images.
    probs = train[: FLAGS.batch_size]
    x = (np.random.RandomState(FLAGS.seed + 1).uniform(size=probs.shape) < probs).astype("float32")

    model = new_model("auto")
    summary = model.scg_summary(print_fn=lambda s: None)
    log(summary)

    results, done, train_seconds = [], 0, 0.0
    for index, checkpoint in enumerate(checkpoints):
        if checkpoint > done:
            data = binarised(train, FLAGS.batch_size, FLAGS.seed + index, repeat=True)
            train_seconds += common.seconds_of(
                lambda: model.fit(data, epochs=1, steps_per_epoch=checkpoint - done, verbose=0))
            done = checkpoint
            log(f"[step {done}] trained ({train_seconds:.0f}s so far)")
        results.append(measure_checkpoint(model, train, test, x, checkpoint, rng))
    if done < FLAGS.steps:
        data = binarised(train, FLAGS.batch_size, FLAGS.seed + len(checkpoints), repeat=True)
        model.fit(data, epochs=1, steps_per_epoch=FLAGS.steps - done, verbose=0)

    log("timing training steps")
    load_before = common.load_average()
    timing = time_training(train)
    load_after = common.load_average()

    report = {
        "title": "SBN encoder gradient variance (digits)",
        "command": common.command_line(),
        "machine": machine,
        "config": {
            "steps": FLAGS.steps,
            "checkpoints": checkpoints,
            "num_draws": FLAGS.num_draws,
            "chunk": FLAGS.chunk,
            "batch_size": FLAGS.batch_size,
            "learning_rate": FLAGS.learning_rate,
            "steps_per_execution": FLAGS.steps_per_execution,
            "z1": FLAGS.z1,
            "z2": FLAGS.z2,
            "baseline_warmup_steps": FLAGS.baseline_warmup_steps,
            "timing_steps": FLAGS.timing_steps,
            "timing_repeats": FLAGS.timing_repeats,
            "bootstrap": FLAGS.bootstrap,
            "seed": FLAGS.seed,
            "jit_compile": FLAGS.jit_compile,
        },
        "scg_summary": summary,
        "encoder_variables": [model.actor_variables[i].path for i in encoder_indices(model)],
        "encoder_entries": int(
            sum(np.prod(model.actor_variables[i].shape) for i in encoder_indices(model))
        ),
        "train_seconds_default_model": train_seconds,
        "checkpoints": results,
        "timing": timing,
        "load_average_1_5_15min": {"before_timing": load_before, "after_timing": load_after},
    }
    report["reading"] = reading(report)
    report["runtime_s"] = time.perf_counter() - start_all
    common.write_json(os.path.join(FLAGS.out_dir, "sbn_variance.json"), report, indent=2)
    render.write("sbn_variance", report, os.path.join(FLAGS.out_dir, "sbn_variance.md"))
    log("\n".join(report["reading"]))
    log(f"wrote {FLAGS.out_dir}/sbn_variance.{{json,md}} in {report['runtime_s']:.0f}s")


if __name__ == "__main__":
    app.run(main)
