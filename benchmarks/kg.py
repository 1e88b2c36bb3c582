"""Knowledge-graph reasoning (UMLS, Kinship): estimators side by side.

Drives `examples/kg_reasoning.py`'s model-building and training functions for
three estimators of the same agent, same data, batch, rollouts, optimizer,
objective and seeds. The objective is the miss cost plus MINERVA's entropy
bonus (`--entropy_beta`, 0.05 decayed x0.9 every 200 steps), a regularisation
loss on every hop's logits that every estimator gets, differentiated directly:

* `minerva`: MINERVA's own estimator, REINFORCE with a moving-average baseline
  (`keras_bpq.estimators.Reinforce(decay=0.95, normalize=True)`: the advantage
  standardised over the batch);
* `rloo`: leave-one-out over the rollouts of each query;
* `auto`: the package's default (critic_cv for categorical nodes), with a
  KG-aware critic network for the first hop that scores all its actions per
  query in one pass (`kg_reasoning.critics_for`, `keras_bpq.critics.AllOutcomes`);
  the last hop's Q is exact, evaluated only downstream of the hop
  (`keras_bpq.outcomes.DownstreamEvaluator`).

Every run evaluates dev (beam search, filtered, ranked as --beam_pool and
--beam_unique say) every --eval_every steps and test at the end; the trained
agent's test split is then ranked under every beam option (paths or distinct
entities at the last hop, x max or sum pooling), with the distinct entities
ranked per query, so the options compare on the same agents. Results go to `<out_dir>/kg.json` after every run (a cut-off
benchmark keeps what it finished), then `kg.md` and `kg_<dataset>.png` (dev
Hits@1 against steps and against training wall-clock).

    python benchmarks/kg.py                       # the full benchmark
    python benchmarks/kg.py --from_json           # re-renders kg.md / PNGs from kg.json
"""

import json
import os
import pathlib
import shlex
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import common  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(common.ROOT)
kg_reasoning = common.example("kg_reasoning")

# Shared with the example (defined there): --steps, --batch_size, --rollouts,
# --eval_every, --beam, --beam_pool, --beam_unique, --learning_rate,
# --steps_per_execution, --entropy_beta.
FLAGS = flags.FLAGS
flags.DEFINE_list("datasets", ["umls", "kinship"], "Datasets.")
flags.DEFINE_list("estimators", ["minerva", "rloo", "auto"], "Estimators (kg_reasoning --estimator values).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds for UMLS.")
flags.DEFINE_list("kinship_seeds", ["0", "1", "2"], "Seeds for Kinship.")
flags.DEFINE_string("out_dir", str(ROOT / "benchmarks" / "results"), "Where kg.json, kg.md and PNGs go.")
flags.DEFINE_bool("from_json", False, "Only re-render the report from <out_dir>/kg.json.")
flags.DEFINE_list("merge", [], "kg.json files of runs made in separate processes (e.g. one per dataset): "
                  "merged into <out_dir>/kg.json, then rendered.")

# Published test results, filtered, tail only, on the same UMLS / Kinship splits.
PUBLISHED = {
    "MINERVA (Das et al. 2018)": {
        "umls": {"hits@1": 0.728, "hits@3": 0.900, "hits@10": 0.968, "mrr": 0.825},
        "kinship": {"hits@1": 0.605, "hits@3": 0.812, "hits@10": 0.924, "mrr": 0.720},
    },
    "MultiHopKG, ConvE reward shaping (Lin et al. 2018)": {
        "umls": {"hits@1": 0.902, "hits@10": 0.992, "mrr": 0.94},
        "kinship": {"hits@1": 0.811, "hits@10": 0.982, "mrr": 0.878},
    },
}
METRICS = ("hits@1", "hits@3", "hits@10", "mrr")

LABELS = {
    "minerva": "MINERVA's estimator (reinforce + EMA 0.95, std. advantage)",
    "rloo": "rloo",
    "auto": "Backprop-Q default (critic_cv)",
}


def schedule():
    """(dataset, seed, estimator) runs, ordered so that a cut-off benchmark
    still has every estimator on every dataset for the first seed."""
    runs = []
    first = {"umls": FLAGS.seeds[:1], "kinship": FLAGS.kinship_seeds[:1]}
    rest = {"umls": FLAGS.seeds[1:], "kinship": FLAGS.kinship_seeds[1:]}
    for seeds in (first, rest):
        for dataset in FLAGS.datasets:
            for seed in seeds[dataset]:
                runs += [(dataset, int(seed), e) for e in FLAGS.estimators]
    return runs


def run_all(path):
    """Trains every scheduled run (skipping those already in the json)."""
    results = json.loads(path.read_text()) if path.exists() else {"runs": []}
    results.update(command=" ".join(shlex.quote(a) for a in sys.argv), machine=common.machine_info(),
                   settings={k: FLAGS[k].value for k in ("steps", "batch_size", "rollouts", "eval_every", "beam",
                                                        "beam_pool", "beam_unique", "learning_rate",
                                                        "steps_per_execution", "entropy_beta")})
    done = {(r["dataset"], r["seed"], r["estimator"]) for r in results["runs"]}
    for dataset, seed, estimator in schedule():
        if (dataset, seed, estimator) in done:
            continue
        keras.backend.clear_session()
        print(f"== {dataset} seed {seed} {estimator}", flush=True)
        agent, result = kg_reasoning.run(
            dataset, estimator, FLAGS.steps, FLAGS.batch_size, FLAGS.rollouts, beam=FLAGS.beam, seed=seed,
            learning_rate=FLAGS.learning_rate, eval_every=FLAGS.eval_every,
            steps_per_execution=FLAGS.steps_per_execution, entropy_beta=FLAGS.entropy_beta, verbose=2,
            pool=FLAGS.beam_pool, unique=FLAGS.beam_unique,
        )
        result["test_rankings"] = {
            ranking_name(pool, unique): kg_reasoning.evaluate(agent, "test", FLAGS.beam, pool=pool, unique=unique)
            for unique in (False, True) for pool in kg_reasoning.POOLS
        }
        print(f"   test {result['test']}  {result['steps_per_second']:.2f} steps/s", flush=True)
        results["runs"].append(result)
        path.write_text(json.dumps(results, indent=1))
    return results


def ranking_name(pool, unique):
    """'paths/max', 'entities/sum', ...: what the last hop keeps, how an entity is scored."""
    return f"{'entities' if unique else 'paths'}/{pool}"


def steps_to_reach(curve, level):
    """First evaluated step whose dev Hits@1 >= level (None if never)."""
    return next((p["step"] for p in curve if p["hits@1"] >= level - 1e-12), None)


def summarise(results, dataset):
    """Per-estimator medians over seeds, and per-seed comparisons to MINERVA."""
    runs = [r for r in results["runs"] if r["dataset"] == dataset]
    minerva = {r["seed"]: r for r in runs if r["estimator"] == "minerva"}
    rows = {}
    for estimator in dict.fromkeys(r["estimator"] for r in runs):
        mine = [r for r in runs if r["estimator"] == estimator]
        reach = []
        for r in mine:
            if r["seed"] in minerva:
                target = minerva[r["seed"]]["curve"][-1]["hits@1"]
                reach.append(steps_to_reach(r["curve"], target))
        med = lambda xs: float(np.median(xs))  # noqa: E731
        rows[estimator] = {
            "seeds": sorted(r["seed"] for r in mine),
            "steps": mine[0]["steps"],
            **{k: med([r["test"][k] for r in mine]) for k in ("hits@1", "hits@3", "hits@10", "mrr")},
            "dev_hits@1": med([r["curve"][-1]["hits@1"] for r in mine]),
            "steps_per_second": med([r["steps_per_second"] for r in mine]),
            "train_seconds": med([r["train_seconds"] for r in mine]),
            "wall_seconds": med([r["wall_seconds"] for r in mine]),
            "entities": med([r["test"].get("entities", np.nan) for r in mine]),
            "rankings": {
                name: {k: med([r["test_rankings"][name][k] for r in mine]) for k in (*METRICS, "entities")}
                for name in mine[0].get("test_rankings", {})
            },
            "steps_to_minerva_final_dev": reach,
        }
    return rows


def plot(results, dataset, path):
    """Dev Hits@1 against steps and against training seconds, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"minerva": "tab:orange", "rloo": "tab:green", "auto": "tab:blue"}
    for r in results["runs"]:
        if r["dataset"] != dataset:
            continue
        steps = [0] + [p["step"] for p in r["curve"]]
        seconds = [0] + [p["seconds"] for p in r["curve"]]
        hits = [r["curve"][0].get("initial_hits@1", np.nan)] + [p["hits@1"] for p in r["curve"]]
        label = f"{r['estimator']} seed {r['seed']}"
        for ax, xs in zip(axes, (steps, seconds)):
            ax.plot(xs[1:], hits[1:], color=colors.get(r["estimator"]), alpha=0.8, label=label, marker=".")
    axes[0].set_xlabel("training steps")
    axes[1].set_xlabel("training wall-clock (s, evaluation excluded)")
    for ax in axes:
        ax.set_ylabel("dev Hits@1 (beam, filtered)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{dataset}: dev Hits@1")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def verdict(rows):
    """Lines answering the issue's questions, from the numbers."""
    if "auto" not in rows or "minerva" not in rows:
        return ["(auto or minerva missing: no comparison)"]
    a, m = rows["auto"], rows["minerva"]
    yes = lambda b: "**yes**" if b else "**no**"  # noqa: E731
    reach = a["steps_to_minerva_final_dev"]
    return [
        f"- Backprop-Q test Hits@1 >= MINERVA's at equal steps: {yes(a['hits@1'] >= m['hits@1'])} "
        f"({a['hits@1']:.3f} vs {m['hits@1']:.3f}, medians)",
        f"- Backprop-Q test MRR >= MINERVA's at equal steps: {yes(a['mrr'] >= m['mrr'])} "
        f"({a['mrr']:.3f} vs {m['mrr']:.3f})",
        f"- First evaluated step at which Backprop-Q's dev Hits@1 reaches MINERVA's final one, per seed: {reach} "
        f"(evaluated every {a.get('eval_every', '?')} steps; None = never; MINERVA ran {m['steps']})",
        f"- Speed: Backprop-Q {a['steps_per_second']:.2f} steps/s against MINERVA's "
        f"{m['steps_per_second']:.2f} ({m['steps_per_second'] / max(a['steps_per_second'], 1e-9):.1f}x)",
    ]


def fmt(value):
    return "-" if value is None or not np.isfinite(value) else f"{value:.3f}"


def write_markdown(results, out_dir):
    """kg.md: settings, command, machine, a table per dataset (with the published
    results), the beam options on the same agents, and the verdicts."""
    s = results["settings"]
    commands = results.get("commands") or [results["command"]]
    lines = [
        "# Knowledge-graph reasoning: estimators side by side",
        "",
        "Agent, data and protocol: `examples/kg_reasoning.py` (T = 2 hops, masked Categorical per hop, "
        "GRU path state, query edge and its inverse hidden, inverse edges and a NO_OP self-loop in the graph). "
        "At the last hop a training query's other true tails are masked from the *training* triples only "
        "(MINERVA's training batcher); dev and test are filtered over every split, tail only. "
        f"Beam {s['beam']}, last hop {'de-duplicated by entity' if s.get('beam_unique') else 'of paths'}, "
        f"entity score: {s.get('beam_pool', 'max')} over its paths. Generated by `benchmarks/kg.py` from `kg.json`.",
        "",
        *[f"- Command: `{c}`" for c in commands],
        f"- Machine: {json.dumps(results['machine'])}",
        f"- Settings: {json.dumps(s)} (every estimator the same: Adam, clipnorm 5)",
        f"- Budget per run: {s['steps']} steps x {s['batch_size']} queries x {s['rollouts']} rollouts; "
        "training wall-clock per run in the tables (evaluation excluded).",
        "",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in results["runs"]):
        rows = summarise(results, dataset)
        for row in rows.values():
            row["eval_every"] = s["eval_every"]
        lines += [f"## {dataset}", "", f"![dev Hits@1](kg_{dataset}.png)", "",
                  "| estimator | seeds | steps | test Hits@1 | Hits@3 | Hits@10 | MRR | final dev Hits@1 | "
                  "entities ranked | steps/s | train s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, row in rows.items():
            lines.append(
                f"| {LABELS.get(name, name)} | {row['seeds']} | {row['steps']} | "
                + " | ".join(fmt(row[k]) for k in (*METRICS, "dev_hits@1"))
                + f" | {row['entities']:.1f} | {row['steps_per_second']:.2f} | {row['train_seconds']:.0f} |"
            )
        for source, table in PUBLISHED.items():
            lines.append(f"| published: {source} | | | " + " | ".join(fmt(table[dataset].get(k)) for k in METRICS)
                         + " | | | | |")
        if "auto" in rows:
            minerva_paper = next(iter(PUBLISHED.values()))[dataset]
            gap = ", ".join(f"{k} {rows['auto'][k] - minerva_paper[k]:+.3f}" for k in METRICS)
            lines += ["", f"Default minus MINERVA's published table: {gap}."]
        lines += ["", "Medians over the seeds listed. Test ranked under each beam option (the same trained agents; "
                  "'paths': the last hop keeps the beam's best paths, MINERVA's beam; 'entities': it keeps the "
                  "beam's best distinct entities, MultiHopKG's; 'max' / 'sum': an entity's score is its best "
                  "path's log-probability / the log-sum-exp over its paths), with the mean distinct entities "
                  "ranked per query:", "",
                  "| estimator | beam option | Hits@1 | Hits@3 | Hits@10 | MRR | entities ranked |",
                  "|---|---|---|---|---|---|---|"]
        for name, row in rows.items():
            for option, m in row["rankings"].items():
                lines.append(f"| {name} | {option} | " + " | ".join(fmt(m[k]) for k in METRICS)
                             + f" | {m['entities']:.1f} |")
        lines += ["", "Per run:", "",
                  "| estimator | seed | test Hits@1 | Hits@3 | Hits@10 | MRR | final dev Hits@1 | steps/s | "
                  "train s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in results["runs"]:
            if r["dataset"] == dataset:
                lines.append(f"| {r['estimator']} | {r['seed']} | " + " | ".join(fmt(r["test"][k]) for k in METRICS)
                             + f" | {fmt(r['curve'][-1]['hits@1'])} | {r['steps_per_second']:.2f} | "
                             f"{r['train_seconds']:.0f} |")
        lines += ["", *verdict(rows), ""]
    (out_dir / "kg.md").write_text("\n".join(lines) + "\n")


def merge(paths):
    """One results dict from several kg.json files (runs concatenated)."""
    parts = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    settings = [p["settings"] for p in parts]
    if any(x != settings[0] for x in settings):
        raise ValueError(f"--merge: the files were run with different settings: {settings}")
    return {"commands": [p["command"] for p in parts], "machine": [p["machine"] for p in parts],
            "settings": settings[0], "runs": [r for p in parts for r in p["runs"]]}


def main(argv):
    del argv
    out_dir = pathlib.Path(FLAGS.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "kg.json"
    if FLAGS.merge:
        results = merge(FLAGS.merge)
        path.write_text(json.dumps(results, indent=1))
    else:
        results = json.loads(path.read_text()) if FLAGS.from_json else run_all(path)
    for dataset in dict.fromkeys(r["dataset"] for r in results["runs"]):
        plot(results, dataset, out_dir / f"kg_{dataset}.png")
    write_markdown(results, out_dir)
    print((out_dir / "kg.md").read_text())


if __name__ == "__main__":
    app.run(main)
