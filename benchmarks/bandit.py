"""Learning from logged bandit feedback on real data: the supervised-to-bandit protocol.

Dudik et al. (2011), Swaminathan and Joachims (2015), BanditNet (Joachims et
al., 2018): a classification data set becomes a contextual bandit. The
actions are the classes; the reward is 1 when the action names the image's
class, 0 otherwise (cost = -reward). A deliberately weak logging policy (a
softmax classifier trained on a small subset of the training images, its
logits divided by a temperature) draws one action per training image and logs
`(image, action, propensity, cost)`; the labels are then forgotten.

The temperature is per data set (`--temperature`, default `TEMPERATURE`):
a linear classifier's logits on Fashion-MNIST's 784 pixels spread about four
times as far as on digits' 64, so one temperature makes a weak logging policy
on digits and an almost deterministic one on Fashion-MNIST, which almost
never tries most wrong classes (`mu(a | x) < SUPPORT_FLOOR` for about half
the pairs `(x, a)` at temperature 2). Off-policy
estimation needs `mu > 0` wherever the learned policy acts (Dudik et al.
2011); where the log lacks that support no estimator can see the cost of the
untried actions, and the direct method and doubly robust credit them with the
critic's extrapolation (Sachdeva, Su and Joachims 2020, "Off-policy bandits
with deficient support"). Each run records that support: the logging policy's
share of test pairs `(x, a)` with `mu(a | x) < SUPPORT_FLOOR`, and each
learned policy's probability mass on such pairs. The default temperatures
make both logging policies about equally weak (expected accuracy about a
third, almost no pair below `SUPPORT_FLOOR`; chosen from the logging policy's
own accuracy and support, not from any learner's result); a run with another
`--temperature` gets its own section. Policies
learned from that log with `keras_bpq.logged.LoggedModel` are scored on the
full-information test set: expected accuracy `mean_x pi(y | x)` and greedy
accuracy (the most likely action). The full-information supervised classifier
(cross-entropy on every training label) is the ceiling.

Every policy is the same linear softmax model (a `Categorical` node on a
`Dense` layer of the pixels); the critic of the direct method and of doubly
robust is an `AllOutcomes` MLP scoring every class from the pixels.

The schedule (`--epochs=30`, `--critic_warmup_steps=100`, `--critic_steps=4`)
was chosen on a validation split, never the test set: 20% of the logged rows
of seed 0 held out, the policies learned from the other 80%, and each scored
by its IPS estimate of the expected reward on the held-out logged rows
(unbiased there: the policy never saw them; what a practitioner without
labels can compute). Compared: 10 against 30 epochs, a critic warm-up of 0
against 100 steps, 1 against 4 critic updates per policy update; 30 epochs
won for every estimator, and warm-up with 4 critic updates won for the
direct method and tied for doubly robust. docs/logged.md gives the
validation values and the critic's fit under the old schedule.

    python benchmarks/bandit.py                              # digits, full train split
    python benchmarks/bandit.py --dataset=fashion_mnist --sizes=10000,60000
    python benchmarks/bandit.py --dataset=fashion_mnist --sizes=10000 --temperature=2  # deficient support

Each run replaces its data set's (and temperature's) section of
benchmarks/results/bandit.json, keeping the sizes and seeds it did not run
when the rest of the protocol is the same (`merged`), and renders bandit.md
from the JSON (`render.bandit`; both written atomically). A long run can be
split by seed, each written elsewhere and merged in after:

    python benchmarks/bandit.py --dataset=fashion_mnist --sizes=60000 --seeds=1 --out_dir=/tmp/s1
    python benchmarks/bandit.py --dataset=fashion_mnist --merge_from=/tmp/s0/bandit.json,/tmp/s1/bandit.json
"""

import gzip
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import common  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import render  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_bpq import critics  # noqa: E402
from keras_bpq import logged  # noqa: E402
import keras_bpq  # noqa: E402

sbn = common.sbn_benchmark()  # its flags too: --dataset, --seeds, --out_dir, --batch_size, --merge_from

FLAGS = flags.FLAGS
FLAGS.set_default("seeds", ["0", "1", "2"])
FLAGS.set_default("batch_size", 128)
flags.DEFINE_list("sizes", [], "Logged sample sizes (default: the full train split).")
flags.DEFINE_float("logging_fraction", 0.02, "Fraction of the train split the logging policy is trained on.")
flags.DEFINE_float("temperature", None, "The logging policy's logits are divided by this (default: TEMPERATURE).")
flags.DEFINE_integer("logging_epochs", 100, "Epochs of the logging policy over its subset.")
flags.DEFINE_integer("epochs", 30, "Epochs over the log (and of the supervised ceiling).")
flags.DEFINE_float("lr", 0.01, "Adam learning rate of the policies.")
flags.DEFINE_float("critic_lr", 0.003, "Adam learning rate of the critics.")
flags.DEFINE_integer("critic_units", 64, "Hidden units of the critic.")
flags.DEFINE_integer("critic_steps", 4, "Critic updates per policy update (LoggedModel.compile).")
flags.DEFINE_integer("critic_warmup_steps", 100, "Steps that train only the critic (LoggedModel.compile).")
flags.DEFINE_bool("render_only", False, "Only rewrite bandit.md from bandit.json.")

# The logging policy's temperature per data set (the module docstring).
TEMPERATURE = {"digits": 2.0, "fashion_mnist": 8.0}
# A pair (x, a) with mu(a | x) below this is outside the log's support: 10000
# logged rows hold such an action fewer than 10 times in expectation even were
# every context alike.
SUPPORT_FLOOR = 1e-3

SHIFTED = "doubly robust, constant critic (IPS on shifted costs)"
ARMS = ("logging policy", "IPS", "SNIPS", "direct method", "doubly robust", SHIFTED, "supervised (ceiling)")
ESTIMATORS = {
    "IPS": logged.IPS,
    "SNIPS": logged.SNIPS,
    "direct method": logged.DirectMethod,
    "doubly robust": logged.DoublyRobust,
    SHIFTED: logged.DoublyRobust,
}


class ConstantCritic(critics.Critic):
    """`Q(x, a) = value` everywhere: doubly robust with it is IPS on the costs
    `c - value` plus the constant `value` (an ablation: how the IPS term of
    doubly robust reacts to shifted costs)."""

    heads = ("cost",)

    def __init__(self, value):
        self.value = float(value)

    def q(self, context, values, target=True):
        return tf.fill([tf.shape(values)[0], 1], self.value)


def log(message):
    print(message, flush=True)


def _read_labels(path):
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)


def load(dataset, seed):
    """`(x_train, y_train, x_test, y_test)`, pixels in [0, 1]."""
    if dataset == "digits":
        from sklearn.datasets import load_digits

        data = load_digits()
        order = np.random.RandomState(seed).permutation(len(data.target))
        x, y = data.data.astype("float32")[order] / 16.0, data.target[order]
        return x[:1500], y[:1500], x[1500:], y[1500:]
    x_train, x_test = common.load_data("fashion_mnist", seed)
    labels = [_read_labels(os.path.join(common.FASHION_DIR, f"{s}-labels-idx1-ubyte.gz")) for s in ("train", "t10k")]
    return x_train, labels[0], x_test, labels[1]


def linear_policy(features, classes, seed):
    x = keras.Input((features,), name="x")
    logits = keras.layers.Dense(classes, name="logits", kernel_initializer=keras.initializers.Zeros())(x)
    action = keras_bpq.Categorical(name="action", seed=seed)(logits)
    return keras_bpq.BackpropQModel(inputs=x, outputs=action, name="policy")


def in_memory(arrays, batch_size, seed):
    ds = tf.data.Dataset.from_tensor_slices(arrays).shuffle(len(arrays[0]), seed=seed).batch(batch_size)
    return common.without_autotuning(ds)


def supervised_logits(x, y, classes, seed, epochs):
    """A linear softmax classifier trained with cross-entropy; returns its `Dense` layer."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((x.shape[1],))
    layer = keras.layers.Dense(classes)
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer=keras.optimizers.Adam(FLAGS.lr), jit_compile=True,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(in_memory((x, y), FLAGS.batch_size, seed), epochs=epochs, verbose=0)
    return layer


def scores(logits_fn, x, y):
    """Expected accuracy `mean pi(y | x)` and greedy accuracy on the test set."""
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(logits_fn(x)))
    return {
        "expected_accuracy": float(np.mean(probs[np.arange(len(y)), y])),
        "greedy_accuracy": float(np.mean(np.argmax(probs, axis=1) == y)),
    }


def mean_ratio(layer, x, targets):
    """`mean_i pi(a_i | x_i) / mu_i` on the log: 1 in expectation for any policy
    that does not depend on the log; far from 1 for one that overfits its
    propensities (Swaminathan and Joachims 2015, BanditNet's diagnostic)."""
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(layer(x)))
    return float(np.mean(np.sum(probs * targets["action"], axis=1) / targets["propensity"]))


def temperature():
    """The logging policy's temperature: `--temperature`, else `TEMPERATURE[--dataset]`."""
    return FLAGS.temperature if FLAGS.temperature is not None else TEMPERATURE[FLAGS.dataset]


def section_key():
    """The JSON's section of this run: the data set, and the temperature where not the default."""
    if temperature() != TEMPERATURE[FLAGS.dataset]:
        return f"{FLAGS.dataset}, temperature {temperature():g}"
    return FLAGS.dataset


def logging_probs(layer, x):
    """`mu(. | x)`, `[n, classes]`: the tempered softmax of the logging classifier."""
    return keras.ops.convert_to_numpy(keras.ops.softmax(layer(x) / temperature())).astype(np.float64)


def off_support_mass(logits_fn, x, mu):
    """`mean_x sum_a pi(a | x) [mu(a | x) < SUPPORT_FLOOR]`: the policy's probability
    on actions the log (almost) never tries in those contexts, where its costs
    are not observed and only extrapolated."""
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(logits_fn(x)))
    return float(np.mean(np.sum(probs * (mu < SUPPORT_FLOOR), axis=1)))


def make_log(layer, x, y, classes, rng):
    """One action per image from the tempered logging policy; its propensity and cost."""
    probs = logging_probs(layer, x)
    probs /= probs.sum(axis=1, keepdims=True)
    action = (probs.cumsum(axis=1) > rng.random((len(x), 1))).argmax(axis=1)
    return {
        "action": np.eye(classes, dtype=np.float32)[action],
        "propensity": probs[np.arange(len(x)), action].astype(np.float32),
        "cost": -(action == y).astype(np.float32),
    }


def learn(name, x, targets, classes, seed):
    keras.utils.set_random_seed(seed)
    policy = linear_policy(x.shape[1], classes, seed)
    estimator = ESTIMATORS[name]()
    critic = None
    if name == SHIFTED:
        critic = ConstantCritic(np.mean(targets["cost"]))
    elif estimator.uses_critic:
        network = keras.Sequential([keras.layers.Dense(FLAGS.critic_units, activation="relu"),
                                    keras.layers.Dense(classes)])
        critic = critics.AllOutcomes(network, classes)
    learner = logged.LoggedModel(policy, node="action", estimator=estimator, critic=critic)
    schedule = {}
    if critic is not None and not isinstance(critic, ConstantCritic):
        schedule = {"critic_steps": FLAGS.critic_steps, "critic_warmup_steps": FLAGS.critic_warmup_steps}
    learner.compile(optimizer=keras.optimizers.Adam(FLAGS.lr),
                    critic_optimizer=keras.optimizers.Adam(FLAGS.critic_lr), jit_compile=True, **schedule)
    start = time.perf_counter()
    history = learner.fit(in_memory((x, targets), FLAGS.batch_size, seed), epochs=FLAGS.epochs, verbose=0)
    return policy.get_layer("logits"), time.perf_counter() - start, history.history


def run(dataset, size, seed):
    x_train, y_train, x_test, y_test = load(dataset, seed)
    classes = int(y_train.max()) + 1
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x_train))
    x_train, y_train = x_train[order], y_train[order]
    small = max(classes, int(FLAGS.logging_fraction * len(x_train)))
    logging_layer = supervised_logits(x_train[:small], y_train[:small], classes, seed, FLAGS.logging_epochs)
    x_log, y_log = x_train[:size], y_train[:size]
    targets = make_log(logging_layer, x_log, y_log, classes, rng)
    mu_test = logging_probs(logging_layer, x_test)
    result = {
        "logging policy": scores(lambda v: logging_layer(v) / temperature(), x_test, y_test),
        "logged_reward": float(-targets["cost"].mean()),
        "min_propensity": float(targets["propensity"].min()),
        "off_support_pairs": float(np.mean(mu_test < SUPPORT_FLOOR)),
        "seconds": {},
    }
    result["logging policy"]["off_support_mass"] = off_support_mass(
        lambda v: logging_layer(v) / temperature(), x_test, mu_test)
    for name in ESTIMATORS:
        layer, seconds, history = learn(name, x_log, targets, classes, seed)
        result[name] = scores(layer, x_test, y_test)
        result[name]["final_loss"] = history["loss"][-1]
        result[name]["mean_ratio"] = mean_ratio(layer, x_log, targets)
        result[name]["off_support_mass"] = off_support_mass(layer, x_test, mu_test)
        result["seconds"][name] = seconds
        log(f"  {name}: {result[name]} ({seconds:.1f}s)")
    start = time.perf_counter()
    ceiling = supervised_logits(x_log, y_log, classes, seed, FLAGS.epochs)
    result["supervised (ceiling)"] = scores(ceiling, x_test, y_test)
    result["supervised (ceiling)"]["off_support_mass"] = off_support_mass(ceiling, x_test, mu_test)
    result["seconds"]["supervised (ceiling)"] = time.perf_counter() - start
    log(f"  logging: {result['logging policy']}, supervised: {result['supervised (ceiling)']}")
    return result


def median_table(runs):
    table = {}
    for arm in ARMS:
        table[arm] = {
            key: float(np.median([r[arm][key] for r in runs])) for key in ("expected_accuracy", "greedy_accuracy")
        }
    return table


def verdicts(table):
    dr = table["doubly robust"]["expected_accuracy"]
    lines = []
    for other in ("logging policy", "IPS"):
        value = table[other]["expected_accuracy"]
        word = "above" if dr > value else "not above"
        lines.append(f"doubly robust ({dr:.3f}) is {word} the {other} ({value:.3f}) in expected accuracy")
    return lines


def _protocol(section):
    """A section's `config` but for its seeds: runs that agree on it can share a table."""
    return {k: v for k, v in section["config"].items() if k != "seeds"}


def _seeded_runs(block, section):
    """`[(seed, run)]` of a size's block: its `seeds`, else its section's."""
    return list(zip(block.get("seeds", section["config"]["seeds"]), block["runs"]))


def _block(pairs):
    pairs = sorted(pairs, key=lambda pair: pair[0])
    runs = [run for _, run in pairs]
    table = median_table(runs)
    return {"seeds": [seed for seed, _ in pairs], "runs": runs, "median": table, "verdicts": verdicts(table)}


def merged(previous, section):
    """`section`, with what `previous` (the same key's old section) ran that it
    did not, when both ran the same protocol (`config` but for the seeds): the
    sizes it did not run, and at a size both ran, the runs of the seeds it did
    not (its medians recomputed; a block then names its `seeds`, the section's
    `config` the seeds of all). Their commands and machines then become lists,
    and their run times add up. A run per seed (`--seeds=0`, `--seeds=1`, ...)
    thus builds the same table as one run of all seeds."""
    if previous is None or _protocol(previous) != _protocol(section):
        return section
    sizes, kept_any = {}, False
    for size in set(previous["sizes"]) | set(section["sizes"]):
        old, new = previous["sizes"].get(size), section["sizes"].get(size)
        if new is None:
            sizes[size], kept_any = dict(old, seeds=[s for s, _ in _seeded_runs(old, previous)]), True
            continue
        new_pairs = _seeded_runs(new, section)
        ran = {seed for seed, _ in new_pairs}
        kept = [] if old is None else [(s, r) for s, r in _seeded_runs(old, previous) if s not in ran]
        kept_any = kept_any or bool(kept)
        sizes[size] = _block(kept + new_pairs) if kept else dict(new, seeds=[s for s, _ in new_pairs])
    if not kept_any:
        return section

    def as_list(value, single):
        return [value] if isinstance(value, single) else list(value)

    seeds = sorted({s for block in sizes.values() for s in block["seeds"]})
    if all(block["seeds"] == seeds for block in sizes.values()):  # the section's seeds say it
        sizes = {size: {k: v for k, v in block.items() if k != "seeds"} for size, block in sizes.items()}
    return dict(
        section,
        config=dict(section["config"], seeds=seeds),
        sizes=dict(sorted(sizes.items(), key=lambda item: int(item[0]))),
        command=as_list(previous["command"], str) + as_list(section["command"], str),
        machine=as_list(previous["machine"], dict) + as_list(section["machine"], dict),
        runtime_s=previous["runtime_s"] + section["runtime_s"],
    )


def main(argv):
    del argv
    path = os.path.join(FLAGS.out_dir, "bandit.json")
    report = {}
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
    if FLAGS.merge_from:
        for other in FLAGS.merge_from:
            with open(other) as f:
                section = json.load(f)[section_key()]
            report[section_key()] = merged(report.get(section_key()), section)
        common.write_json(path, report)
    if FLAGS.render_only or FLAGS.merge_from:
        render.write("bandit", report, os.path.join(FLAGS.out_dir, "bandit.md"))
        return
    start = time.perf_counter()
    machine = common.machine_info()
    seeds = [int(s) for s in FLAGS.seeds]
    sizes = [int(s) for s in FLAGS.sizes] or [len(load(FLAGS.dataset, 0)[0])]
    section = {"sizes": {}}
    key = section_key()
    for size in sizes:
        runs = []
        for seed in seeds:
            log(f"{FLAGS.dataset}, {size} logged rows, seed {seed}")
            runs.append(run(FLAGS.dataset, size, seed))
        table = median_table(runs)
        section["sizes"][str(size)] = {"runs": runs, "median": table, "verdicts": verdicts(table)}
        log("; ".join(section["sizes"][str(size)]["verdicts"]))
    config = {"seeds": seeds, "logging_fraction": FLAGS.logging_fraction, "temperature": temperature(),
              "support_floor": SUPPORT_FLOOR, "logging_epochs": FLAGS.logging_epochs,
              "epochs": FLAGS.epochs, "batch_size": FLAGS.batch_size, "lr": FLAGS.lr,
              "critic_lr": FLAGS.critic_lr, "critic_units": FLAGS.critic_units,
              "critic_steps": FLAGS.critic_steps, "critic_warmup_steps": FLAGS.critic_warmup_steps,
              "cost": "-reward", "tf_data_autotune": False, "jit_compile": True}
    section.update(
        title={"digits": "digits (scikit-learn, 1500 train / 297 test)",
               "fashion_mnist": "Fashion-MNIST (60000 train / 10000 test)"}[FLAGS.dataset]
        + f", logging temperature {temperature():g}",
        command=common.command_line(),
        machine=machine,
        config=config,
        runtime_s=time.perf_counter() - start,
    )
    report[key] = merged(report.get(key), section)
    common.write_json(path, report)
    render.write("bandit", report, os.path.join(FLAGS.out_dir, "bandit.md"))
    log(f"wrote {path} and bandit.md in {section['runtime_s']:.0f}s")


if __name__ == "__main__":
    app.run(main)
