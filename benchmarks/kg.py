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
ranked per query, so the options compare on the same agents. Results go to
`<out_dir>/kg.json` after every run (a cut-off benchmark keeps what it
finished), then, with kg.json's `plots` naming `kg_<dataset>.png`, `kg.md`
and those PNGs (dev Hits@1 against steps and against training wall-clock),
both rendered from the JSON by `render.write` (the notes written by hand into
kg.json's "notes").

    python benchmarks/kg.py                       # the full benchmark
    python benchmarks/kg.py --from_json           # re-renders kg.md / PNGs from kg.json
"""

import json
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import common  # noqa: E402
import keras  # noqa: E402
import render  # noqa: E402

ROOT = pathlib.Path(common.ROOT)
kg_reasoning = common.example("kg_reasoning")

# Shared with the example (defined there): --steps, --batch_size, --rollouts,
# --eval_every, --beam, --beam_pool, --beam_unique, --learning_rate,
# --steps_per_execution, --entropy_beta, --action_dropout, --dim, --hidden,
# --entity_embeddings.
FLAGS = flags.FLAGS
flags.DEFINE_list("datasets", ["umls", "kinship"], "Datasets.")
flags.DEFINE_list("estimators", ["minerva", "rloo", "auto"], "Estimators (kg_reasoning --estimator values).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds for UMLS.")
flags.DEFINE_list("kinship_seeds", ["0", "1", "2"], "Seeds for Kinship.")
flags.DEFINE_string("out_dir", str(ROOT / "benchmarks" / "results"), "Where kg.json, kg.md and PNGs go.")
flags.DEFINE_bool("from_json", False, "Only re-render the report from <out_dir>/kg.json.")
flags.DEFINE_list("merge", [], "kg.json files of runs made in separate processes (e.g. one per dataset): "
                  "merged into <out_dir>/kg.json, then rendered.")

# Published test results, filtered, tail only, on the same UMLS / Kinship
# splits, from results/published_kg.json (which cites the papers): kg.json's
# "published", which its page sets beside the runs.
_PUBLISHED_SOURCES = json.loads((ROOT / "benchmarks" / "results" / "published_kg.json").read_text())["sources"]
PUBLISHED = {source: published["scores"] for source, published in _PUBLISHED_SOURCES.items()}


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
    settings = {k: FLAGS[k].value for k in ("steps", "batch_size", "rollouts", "eval_every", "beam", "beam_pool",
                                            "beam_unique", "learning_rate", "steps_per_execution", "entropy_beta",
                                            "action_dropout", "dim", "hidden", "entity_embeddings",
                                            "critic_dim", "critic_hidden")}
    command, machine = common.command_line(), common.machine_info()
    if path.exists():  # a cut-off or earlier run: resumed, every run's command kept
        results = common.resumed(json.loads(path.read_text()), settings, command, machine)
    else:
        results = {"command": command, "machine": machine, "settings": settings, "runs": []}
    results["published"] = PUBLISHED
    done = {(r["dataset"], r["seed"], r["estimator"]) for r in results["runs"]}
    for dataset, seed, estimator in schedule():
        if (dataset, seed, estimator) in done:
            continue
        keras.backend.clear_session()
        print(f"== {dataset} seed {seed} {estimator}", flush=True)
        agent, result = kg_reasoning.run(
            dataset, estimator, FLAGS.steps, FLAGS.batch_size, FLAGS.rollouts, beam=FLAGS.beam, seed=seed,
            learning_rate=FLAGS.learning_rate, dim=FLAGS.dim, hidden=FLAGS.hidden, eval_every=FLAGS.eval_every,
            steps_per_execution=FLAGS.steps_per_execution, entropy_beta=FLAGS.entropy_beta, verbose=2,
            pool=FLAGS.beam_pool, unique=FLAGS.beam_unique, action_dropout=FLAGS.action_dropout,
            entity_embeddings=FLAGS.entity_embeddings, critic_dim=FLAGS.critic_dim, critic_hidden=FLAGS.critic_hidden,
        )
        result["test_rankings"] = {
            ranking_name(pool, unique): kg_reasoning.evaluate(agent, "test", FLAGS.beam, pool=pool, unique=unique)
            for unique in (False, True) for pool in kg_reasoning.POOLS
        }
        print(f"   test {result['test']}  {result['steps_per_second']:.2f} steps/s", flush=True)
        results["runs"].append(result)
        common.write_json(str(path), results)
    return results


def ranking_name(pool, unique):
    """'paths/max', 'entities/sum', ...: what the last hop keeps, how an entity is scored."""
    return f"{'entities' if unique else 'paths'}/{pool}"


def merge(paths):
    """One results dict from several kg.json files (runs concatenated)."""
    parts = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    first = parts[0]["settings"]
    for path, part in zip(paths[1:], parts[1:]):
        changed = common.changed_settings(first, part["settings"])
        if changed:
            raise ValueError(
                f"--merge: {path} was run with other settings than {paths[0]} ({', '.join(changed)}: "
                f"{[part['settings'].get(k) for k in changed]} against {[first.get(k) for k in changed]}); "
                "merge runs made with the same flags.")
    return {"commands": [c for p in parts for c in common.commands(p)],
            "machine": [m for p in parts for m in common.listed(p["machine"])],
            "settings": first, "published": PUBLISHED, "runs": [r for p in parts for r in p["runs"]]}


def main(argv):
    del argv
    out_dir = pathlib.Path(FLAGS.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "kg.json"
    if FLAGS.merge:
        results = merge(FLAGS.merge)
    else:
        results = json.loads(path.read_text()) if FLAGS.from_json else run_all(path)
    results["plots"] = {dataset: f"kg_{dataset}.png"
                        for dataset in dict.fromkeys(r["dataset"] for r in results["runs"])}
    common.write_json(str(path), results)
    render.write("kg", results, str(out_dir / "kg.md"))
    print((out_dir / "kg.md").read_text())


if __name__ == "__main__":
    app.run(main)
