"""Every benchmark page and plot, rendered from its results JSON alone.

    python benchmarks/render.py                                  # every page and plot of benchmarks/results/
                                                                 # and RESULTS.md's headline table
    python benchmarks/render.py benchmarks/results/kg.json       # one page: kg.md (and its plots) next to kg.json
    python benchmarks/render.py --check                          # exit 1 if a page differs from its JSON's, or
                                                                 # a plot is missing or named by no JSON

A layout per benchmark turns its JSON into a `pages.Page`; the scripts write
their JSON, then their page and its plots with `write(layout, report, path)`,
and this entry point rewrites any page and plot from the JSON without running
anything (no TensorFlow is imported). `<name>.json` is rendered by the layout
`<name>`, else by the longest layout name it starts with before an underscore
(`overhead_threads1` -> `overhead`). `benchmarks/RESULTS.md` is hand-written
but for its headline table, between the markers HEADLINE_START and
HEADLINE_END: `headline` renders it from equal_time.json, overhead.json and
kg.json, and a run without JSON arguments rewrites (or, with `--check`,
compares) what lies between them.

Plots: a JSON names its PNGs (kg's `plots`, a file per dataset; each sbn
section's `plot`; toy's `plots`), and the layout's entry in FIGURES draws each
from the JSON's curves with matplotlib, next to the JSON; that includes the
plots of superseded runs kept without a page (`kg_200steps.json`). matplotlib
is the `examples` extra: without it the pages are written and the plots are
not. `--check` compares the plots by name, not by pixel: every PNG a JSON
names exists, and every PNG of benchmarks/results/ is named by a JSON.

Measured numbers live in the JSON only: a layout formats them, computes
medians and ratios from them, and adds prose that holds no measured figure.
Text that interprets a run (its "Reading" or "Notes") is written by hand into
the JSON's `notes` (per section where the JSON has sections) and rendered as
it is. In a JSON of sections keyed by tag, keys that start with `_` are not
sections (sbn.json's `_appendix`, hand-written markdown that ends its page).
"""

import argparse
import functools
import json
import math
import os
import sys

import numpy as np

import common
import equal_time_sections
import pages
from pages import number
from pages import numbers


def times(ratio):
    """A ratio as `1.23x`."""
    return f"{ratio:.2f}x"


def sections(report):
    """The sections of a JSON keyed by tag: its items whose key has no leading `_`."""
    return {tag: entry for tag, entry in report.items() if not tag.startswith("_")}


# ----------------------------------------------------------------------------- bandit
def bandit(report):
    page = pages.Page("Learning from logged bandit feedback (supervised-to-bandit)")
    page.text(
        "Written by `benchmarks/bandit.py` from `bandit.json`; the protocol is in the script's docstring "
        "(Dudik et al. 2011; Swaminathan and Joachims 2015; BanditNet 2018). Reward 1 when the action names "
        "the class (cost = -reward); one logged action per training image from a tempered softmax logging "
        "policy trained on a small subset (how weak it is shows in its row); every learned policy is a linear "
        "softmax `Categorical` node trained with `keras_bpq.logged.LoggedModel` (no clipping); the critic of "
        "the direct method and doubly robust is an `AllOutcomes` MLP. The constant-critic row is doubly robust "
        "with `Q` fixed at the mean logged cost: IPS on the costs shifted by it (BanditNet's translation), the "
        "part of doubly robust a critic that has learned nothing leaves. The schedule (epochs, critic warm-up, "
        "critic updates per policy update) was chosen on a validation split of the logged rows, never the test "
        "set (the script's docstring). Scores on the full-information test set, **median of the seeds**: "
        "expected accuracy `mean pi(y|x)` (the policy's value) and greedy accuracy (argmax); a learned "
        "policy's own estimate is minus its estimator's loss in the last epoch (the expected reward the "
        "estimator credits it with on the log it was fitted to; above the expected accuracy where it overrates "
        "it); the mean ratio `mean_i pi(a_i|x_i) / mu_i` of each learned policy on its own log is 1 in "
        "expectation for a policy that does not depend on the log, and far below 1 for one that has learned to "
        "avoid the logged actions (propensity overfitting, Swaminathan and Joachims 2015; BanditNet's "
        "diagnostic); the test mass where `mu` is below the support floor is each policy's expected "
        "probability, on the test images, of actions the logging policy (almost) never tries there.")
    for section in sections(report).values():
        c = section["config"]
        page.heading(section["title"]).command(section["command"]).text(
            f"Seeds {c['seeds']}; logging policy trained on {c['logging_fraction']:.0%} of the train split for "
            f"{c['logging_epochs']} epochs, temperature {c['temperature']}; {c['epochs']} epochs, batch "
            f"{c['batch_size']}, Adam {c['lr']} (critic {c['critic_lr']}, {c['critic_units']} hidden units, "
            f"{c['critic_steps']} critic updates per policy update after {c['critic_warmup_steps']} critic-only "
            f"steps), XLA on, data in memory, tf.data autotuning off; {section['runtime_s']:.0f} s in all.")
        page.machine(section["machine"])
        for size, block in section["sizes"].items():
            runs, rows = block["runs"], []
            for arm, scores in block["median"].items():
                final_loss = common.median([r[arm].get("final_loss") for r in runs])
                rows.append([arm, scores["expected_accuracy"], scores["greedy_accuracy"],
                             None if final_loss is None else -final_loss,
                             common.median([r[arm].get("mean_ratio") for r in runs]),
                             common.median([r[arm].get("off_support_mass") for r in runs]),
                             common.median([r["seconds"].get(arm) for r in runs])])
            floor = c.get("support_floor")
            seeds = f" (seeds {block['seeds']})" if "seeds" in block else ""  # where not the section's
            page.heading(f"{size} logged rows{seeds}", 3).table(
                ["policy", "expected accuracy", "greedy accuracy", "own estimate of its reward",
                 "mean ratio pi/mu on the log", f"test mass where mu < {floor:g}" if floor else "test mass off support",
                 "fit seconds (median)"],
                rows, "lrrrrrr", [None, ".3f", ".3f", ".3f", ".2f", ".3f", ".1f"])
            logged_reward = np.median([r["logged_reward"] for r in runs])
            support = ""
            if floor:
                support = (f" Test pairs `(x, a)` with `mu(a|x) < {floor:g}` (outside the log's support): "
                           f"{common.median([r['off_support_pairs'] for r in runs]):.2%}; smallest logged "
                           f"propensity {common.median([r['min_propensity'] for r in runs]):.2g} (medians).")
            page.text(f"Logged reward (median over seeds): {logged_reward:.3f}.{support}",
                      "**" + "; ".join(block["verdicts"]) + ".**")
        page.bullets(section.get("notes"), "Reading (written by hand after the runs):")
    measured = []
    for section in sections(report).values():
        floor = section["config"].get("support_floor")
        for size, block in section["sizes"].items():
            median, runs = block["median"], block["runs"]
            dr, ips, mu = (median[arm]["expected_accuracy"] for arm in ("doubly robust", "IPS", "logging policy"))
            seeds = f" (seeds {block['seeds']})" if "seeds" in block else ""
            line = (f"{section['title']}, {size} logged rows{seeds}: doubly robust {dr:.3f} is "
                    f"{'above' if dr > ips else 'not above'} IPS ({ips:.3f}) and "
                    f"{'above' if dr > mu else 'not above'} the logging policy ({mu:.3f}); it beat IPS on "
                    f"{sum(r['doubly robust']['expected_accuracy'] > r['IPS']['expected_accuracy'] for r in runs)} "
                    f"of {len(runs)} seeds")
            if floor:
                mass = {arm: common.median([r[arm].get("off_support_mass") for r in runs])
                        for arm in ("doubly robust", "IPS")}
                line += (f"; its test probability where `mu < {floor:g}` is {mass['doubly robust']:.3f} "
                         f"(IPS: {mass['IPS']:.3f}), on a log whose test pairs lie there "
                         f"{common.median([r['off_support_pairs'] for r in runs]):.2%} of the time")
            measured.append(line + ".")
    page.heading("Reading").bullets(measured, "Measured (medians of the seeds):").text(
        "Off-policy estimation sees the cost of an action in a context only if the logging policy tries it "
        "there. Where it does not (`U(x) = {a : mu(a|x) = 0}`), the expectation over the log of IPS is "
        "`V(pi)` with the untried actions' costs replaced by 0, and that of doubly robust with them replaced "
        "by the critic's `Q` (keras_bpq/logged.py's docstring; tests/test_logged.py checks both by exact "
        "enumeration). With costs -reward <= 0, 0 is the worst cost: IPS is pessimistic about untried "
        "actions, while the direct method and doubly robust take the critic's extrapolation, which nothing in "
        "the log corrects, and a policy optimised on that estimate moves there (Sachdeva, Su and Joachims "
        "2020, deficient support). The column `test mass where mu < ...` measures it: each policy's "
        "probability on test pairs the logging policy (almost) never tries; the mean ratio `pi/mu` on the log "
        "falls well below 1 where that mass is large. The default temperatures make weak logging policies "
        "that leave almost no such pairs; the Fashion-MNIST section at temperature 2 keeps the earlier, "
        "almost deterministic logging policy, whose log lacks support for about half the test pairs, and "
        "there the direct method and doubly robust fail for that reason (docs/logged.md measures the critic "
        "there). Where doubly robust loses to IPS on a log with support, its policy keeps to the support; "
        "what was measured about why is in that section's reading. The constant-critic row is doubly robust "
        "with `Q` fixed at the mean logged cost: IPS on costs shifted by it (BanditNet's translation), which "
        "credits untried actions with that mean instead of 0. The numbers are as measured.")
    return page


# ----------------------------------------------------------------------------- equal_time
def equal_time(report):
    page = pages.Page("Test objective at equal training wall-clock")
    page.text("Generated by `benchmarks/equal_time.py` from `equal_time.json` (protocol in the script's "
              "docstring: arms interleaved in turns, each arm's clock its own `fit` time with its XLA compile "
              "included; medians over seeds). Lower -ELBO is better.")
    for tag, entry in sections(report).items():
        arms = list(entry["runs"][0])
        page.heading(tag).command(entry.get("command"))
        page.text(f"Seeds {entry['seeds']}; {entry['chunk_steps']} steps per turn; jit_compile={entry['jit']}.")
        page.machine(entry["machine"], load_end=entry.get("load_end"))
        page.table(["budget", *arms, "best critic-free", "winner"],
                   [[f"{row['budget']} s", *(row["values"][a] for a in arms), row["best_critic_free"],
                     f"**{row['winner']}**"] for row in entry["summary"]],
                   "l" + "r" * len(arms) + "ll", [None] + [".2f"] * len(arms) + [None, None])
        rows = [[a, common.median([r[a]["compile_seconds"] for r in entry["runs"]]),
                 common.median([r[a]["ms_per_step"] for r in entry["runs"]]),
                 common.median([r[a]["curve"][-1]["step"] for r in entry["runs"]])] for a in arms]
        page.table(["arm", "XLA compile (s, median)", "ms per step (median)", "steps at the largest budget"],
                   rows, "lrrr", [None, ".1f", ".2f", ".0f"])
        page.bullets(entry.get("notes"), "Reading:")
    return page


# ----------------------------------------------------------------------------- kg
KG_METRICS = ("hits@1", "hits@3", "hits@10", "mrr")
KG_LABELS = {
    "minerva": "MINERVA's estimator (reinforce + EMA 0.95, std. advantage)",
    "rloo": "rloo",
    "auto": "Backprop-Q default (critic_cv)",
    "critic_cv_nodev": "critic_cv without the last hop's deviation (ablation)",
}


def kg_steps_to_reach(curve, level):
    """First evaluated step whose dev Hits@1 >= level (None if never)."""
    return next((p["step"] for p in curve if p["hits@1"] >= level - 1e-12), None)


def kg_summary(results, dataset):
    """Per-estimator medians over seeds, and per-seed comparisons to MINERVA."""
    runs = [r for r in results["runs"] if r["dataset"] == dataset]
    minerva = {r["seed"]: r for r in runs if r["estimator"] == "minerva"}
    rows = {}
    for estimator in dict.fromkeys(r["estimator"] for r in runs):
        mine = [r for r in runs if r["estimator"] == estimator]
        reach = [kg_steps_to_reach(r["curve"], minerva[r["seed"]]["curve"][-1]["hits@1"])
                 for r in mine if r["seed"] in minerva]
        rows[estimator] = {
            "seeds": sorted(r["seed"] for r in mine),
            "steps": mine[0]["steps"],
            **{k: common.median([r["test"][k] for r in mine]) for k in KG_METRICS},
            "dev_hits@1": common.median([r["curve"][-1]["hits@1"] for r in mine]),
            "steps_per_second": common.median([r["steps_per_second"] for r in mine]),
            "train_seconds": common.median([r["train_seconds"] for r in mine]),
            "entities": common.median([r["test"].get("entities", np.nan) for r in mine]),
            "rankings": {
                name: {k: common.median([r["test_rankings"][name][k] for r in mine]) for k in (*KG_METRICS, "entities")}
                for name in mine[0].get("test_rankings", {})
            },
            "steps_to_minerva_final_dev": reach,
        }
    return rows


def kg_verdict(rows, eval_every):
    """Lines answering the benchmark's questions, from the numbers."""
    if "auto" not in rows or "minerva" not in rows:
        return ["(auto or minerva missing: no comparison)"]
    a, m = rows["auto"], rows["minerva"]

    def yes(b):
        return "**yes**" if b else "**no**"

    return [
        f"Backprop-Q test Hits@1 >= MINERVA's at equal steps: {yes(a['hits@1'] >= m['hits@1'])} "
        f"({a['hits@1']:.3f} vs {m['hits@1']:.3f}, medians)",
        f"Backprop-Q test MRR >= MINERVA's at equal steps: {yes(a['mrr'] >= m['mrr'])} "
        f"({a['mrr']:.3f} vs {m['mrr']:.3f})",
        "First evaluated step at which Backprop-Q's dev Hits@1 reaches MINERVA's final one, per seed: "
        f"{a['steps_to_minerva_final_dev']} (evaluated every {eval_every} steps; None = never; MINERVA ran "
        f"{m['steps']})",
        f"Speed: Backprop-Q {a['steps_per_second']:.2f} steps/s against MINERVA's "
        f"{m['steps_per_second']:.2f} ({m['steps_per_second'] / max(a['steps_per_second'], 1e-9):.1f}x)",
    ]


def kg(results):
    s = results["settings"]
    page = pages.Page("Knowledge-graph reasoning: estimators side by side")
    page.text(
        "Agent, data and protocol: `examples/kg_reasoning.py` (T = 2 hops, masked Categorical per hop, GRU path "
        "state, query edge and its inverse hidden, inverse edges and a NO_OP self-loop in the graph). At the "
        "last hop a training query's other true tails are masked from the *training* triples only (MINERVA's "
        "training batcher); dev and test are filtered over every split, tail only. "
        f"Beam {s['beam']}, last hop {'de-duplicated by entity' if s.get('beam_unique') else 'of paths'}, "
        f"entity score: {s.get('beam_pool', 'max')} over its paths. Generated by `benchmarks/kg.py` from "
        "`kg.json`.")
    page.command(common.commands(results)).machine(results["machine"])
    page.text(f"Settings: {json.dumps(s)} (every estimator the same: Adam, clipnorm 5).",
              f"Budget per run: {s['steps']} steps x {s['batch_size']} queries x {s['rollouts']} rollouts; "
              "training wall-clock per run in the tables (evaluation excluded).")
    published = results.get("published", {})
    metrics = [".3f"] * len(KG_METRICS)
    for dataset in dict.fromkeys(r["dataset"] for r in results["runs"]):
        rows = kg_summary(results, dataset)
        page.heading(dataset)
        if dataset in results.get("plots", {}):
            page.image(results["plots"][dataset], "dev Hits@1")
        table_rows = [[KG_LABELS.get(name, name), row["seeds"], row["steps"], *(row[k] for k in KG_METRICS),
                       row["dev_hits@1"], row["entities"], row["steps_per_second"], row["train_seconds"]]
                      for name, row in rows.items()]
        table_rows += [[f"published: {source}", "", "", *(scores[dataset].get(k) for k in KG_METRICS),
                        "", "", "", ""] for source, scores in published.items()]
        page.table(["estimator", "seeds", "steps", "test Hits@1", "Hits@3", "Hits@10", "MRR", "final dev Hits@1",
                    "entities ranked", "steps/s", "train s"], table_rows, "lllrrrrrrrr",
                   [None, None, None, *metrics, ".3f", ".1f", ".2f", ".0f"], absent="-")
        if "auto" in rows and published:
            minerva_paper = next(iter(published.values()))[dataset]
            gap = ", ".join(f"{k} {rows['auto'][k] - minerva_paper[k]:+.3f}" for k in KG_METRICS)
            page.text(f"Default minus MINERVA's published table: {gap}.")
        page.table(
            ["estimator", "beam option", "Hits@1", "Hits@3", "Hits@10", "MRR", "entities ranked"],
            [[name, option, *(m[k] for k in KG_METRICS), m["entities"]]
             for name, row in rows.items() for option, m in row["rankings"].items()],
            "llrrrrr", [None, None, *metrics, ".1f"], absent="-",
            lead="Medians over the seeds listed. Test ranked under each beam option (the same trained agents; "
                 "'paths': the last hop keeps the beam's best paths, MINERVA's beam; 'entities': it keeps the "
                 "beam's best distinct entities, MultiHopKG's; 'max' / 'sum': an entity's score is its best "
                 "path's log-probability / the log-sum-exp over its paths), with the mean distinct entities "
                 "ranked per query:")
        page.table(
            ["estimator", "seed", "test Hits@1", "Hits@3", "Hits@10", "MRR", "final dev Hits@1", "steps/s",
             "train s"],
            [[r["estimator"], r["seed"], *(r["test"][k] for k in KG_METRICS), r["curve"][-1]["hits@1"],
              r["steps_per_second"], r["train_seconds"]] for r in results["runs"] if r["dataset"] == dataset],
            "lrrrrrrrr", [None, None, *metrics, ".3f", ".2f", ".0f"], absent="-", lead="Per run:")
        page.bullets(kg_verdict(rows, s["eval_every"]))
    if results.get("notes"):
        page.heading("Notes (written by hand after the run)").bullets(results["notes"])
    return page


def kg_equal_time(report):
    page = pages.Page("The knowledge-graph agent at equal training wall-clock")
    page.text("Generated by `benchmarks/kg_equal_time.py` from `kg_equal_time.json` (protocol in the script's "
              "docstring: arms interleaved in turns, each arm's clock its own `fit` time with its first compile "
              "included; each arm scored on test with its weights at the end of its last turn within the budget; "
              "medians over seeds). Test metrics filtered, tail only; higher is better. The same agents at equal "
              "steps: [kg.md](kg.md).")
    for dataset, entry in sections(report).items():
        arms = list(entry["runs"][0])
        page.heading(dataset).command(entry.get("command"))
        page.text(f"Seeds {entry['seeds']}; {entry['chunk_steps']} steps per turn; settings "
                  f"{json.dumps(entry['settings'])}.")
        page.machine(entry["machine"], load_end=entry.get("load_end"))
        every = entry["settings"].get("select_every")
        if every:
            page.text(f"Each arm scored at the checkpoint, of those every {every} s of its clock and at the "
                      "budget, with the best valid Hits@1 (`--select_every`): \"steps\" is that checkpoint's; "
                      "\"last Hits@1\" is the test Hits@1 of its last turn within the budget.")
        rows = []
        for row in entry["summary"]:
            budget = row["budget"]
            for a in arms:
                points = [r[a]["at_budget"][budget] for r in entry["runs"]]
                last = ([common.median([r[a]["at_budget_last"][budget]["hits@1"] for r in entry["runs"]])]
                        if every else [])
                rows.append([f"{budget} s", f"**{a}**" if a == row["winner"] else a,
                             common.median([p["step"] for p in points]),
                             *(common.median([p[k] for p in points]) for k in KG_METRICS), *last])
        last_column = ["last Hits@1"] if every else []
        page.table(["budget", "arm", "steps", *KG_METRICS, *last_column], rows,
                   "llr" + "r" * (len(KG_METRICS) + len(last_column)),
                   [None, None, ".0f"] + [".3f"] * (len(KG_METRICS) + len(last_column)))
        if every:
            kg_checkpoint_spans(page, entry, arms)
            if "auto" in arms:
                kg_selected_at_equal_steps(page, entry, arms)
        rows = [[a, common.median([r[a]["compile_seconds"] for r in entry["runs"]]),
                 common.median([r[a]["ms_per_step"] for r in entry["runs"]])] for a in arms]
        page.table(["arm", "compile (s, median)", "ms per step (median)"], rows, "lrr", [None, ".1f", ".1f"])
        page.bullets(entry.get("notes"), "Reading:")
    return page


def kg_checkpoint_spans(page, entry, arms):
    """The table of a `--select_every` section's checkpoints between budgets
    (`equal_time_sections.checkpoint_spans`), medians over its seeds."""
    spans = {a: [equal_time_sections.checkpoint_spans(r[a], entry["budgets"]) for r in entry["runs"]] for a in arms}
    rows = []
    for i, (before, budget) in enumerate(zip(entry["budgets"], entry["budgets"][1:])):
        for a in arms:
            values = [run[i] for run in spans[a]]
            rows.append([f"{before}-{budget} s", a,
                         *(common.median([v[k] for v in values]) for k in ("checkpoints", "mean_test", "sd_valid"))])
    page.table(["between budgets", "arm", "checkpoints", "mean test Hits@1", "sd of valid Hits@1"], rows, "llrrr",
               [None, None, ".0f", ".3f", ".3f"], absent="-",
               lead="The checkpoints between two budgets (after the last turn within the first, up to the last "
                    "within the second; medians over seeds of each run's figure): the mean of their test Hits@1, "
                    "what a checkpoint taken at a random time of that span scores, and the standard deviation of "
                    "their valid Hits@1, how much choosing one on the dev split is a draw.")


def kg_selected_at_equal_steps(page, entry, arms):
    """The table of a `--select_every` section's arms each scored at its best
    dev checkpoint within the default's steps at each budget
    (`equal_time_sections.selected_at_equal_steps`), medians over its seeds,
    and in how many seeds the default's test Hits@1 is at least the arm's."""
    rows = []
    for budget in entry["budgets"]:
        kept = [equal_time_sections.selected_at_equal_steps(r, budget) for r in entry["runs"]]
        limit = common.median([r["auto"]["at_budget_last"][budget]["step"] for r in entry["runs"]])
        for a in arms:
            pairs = [(k["auto"], k[a]) for k in kept if k[a] is not None]  # (the default's, the arm's) per seed
            ahead = sum(default["test_hits@1"] >= point["test_hits@1"] for default, point in pairs)
            medians = [common.median([point[key] for _, point in pairs]) if pairs else None
                       for key in ("step", "test_hits@1")]
            rows.append([f"{budget} s", limit, a, *medians, "-" if a == "auto" else f"{ahead} of {len(pairs)}"])
    page.table(["budget", "default's steps", "arm", "kept checkpoint's steps", "test Hits@1",
                "seeds the default scores at least as well"], rows, "lrlrrl", [None, ".0f", None, ".0f", ".3f", None],
               absent="-",
               lead="At equal steps: each arm scored at its checkpoint with the best valid Hits@1 of those at or "
                    "before the step of the default's last turn within the budget (the default's steps), medians "
                    "over seeds; an entropy bonus, decayed by the step count, is then the same for every arm. "
                    "Checkpoints fall every `--select_every` seconds of an arm's clock, so another arm's last one "
                    "within the default's steps may be up to an interval's steps short of them.")


KG_COLORS = {"minerva": "tab:orange", "rloo": "tab:green", "auto": "tab:blue"}


def kg_plot(results, dataset, plt):
    """Dev Hits@1 of every run on `dataset` against steps and against training
    wall-clock, one line per run."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results["runs"]:
        if r["dataset"] == dataset:
            hits = [p["hits@1"] for p in r["curve"]]
            for ax, key in zip(axes, ("step", "seconds")):
                ax.plot([p[key] for p in r["curve"]], hits, color=KG_COLORS.get(r["estimator"]), alpha=0.8,
                        label=f"{r['estimator']} seed {r['seed']}", marker=".")
    axes[0].set_xlabel("training steps")
    axes[1].set_xlabel("training wall-clock (s, evaluation excluded)")
    for ax in axes:
        ax.set_ylabel("dev Hits@1 (beam, filtered)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{dataset}: dev Hits@1")
    fig.tight_layout()
    return fig


def kg_figures(results):
    """The plots `results` names in `plots` (a file per dataset): `kg_plot` of each."""
    return {name: functools.partial(kg_plot, results, dataset) for dataset, name in results.get("plots", {}).items()}


# ----------------------------------------------------------------------------- overhead
def overhead(report):
    settings = report["settings"]
    page = pages.Page("Package step against a hand-written TF step (issue 16, target 3)")
    page.command(report["command"]).text(
        f"Fashion-MNIST SBNs, batch {settings['batch_size']}, Adam, `jit_compile=True`, steps_per_execution "
        f"{settings['steps_per_execution']}, data in memory (tf.data, autotuning off). Steady-state ms per "
        f"step, median of {settings['rounds']} interleaved rounds of {settings['executions'] - 1} timed "
        "executions; ratio = package / hand-written, median over rounds of the paired ratio (range in "
        "brackets); CPU-time ratio: of the medians of this process's CPU seconds per step (all threads), less "
        "sensitive to other processes. `hand_fit`: the hand-written step as a plain keras.Model's train_step, "
        "trained with fit. Target: ratio <= 1.15.")
    page.machine(report["machine"])

    def ratio(r):
        return f"{r['median_of_rounds']:.2f} ({r['min']:.2f}-{r['max']:.2f})"

    rows = []
    for r in report["results"]:
        p, h, f = r["arms"]["package"], r["arms"]["hand"], r["arms"].get("hand_fit")
        hr = h["package_ratio"]
        load = r["load_1min"]
        rows.append([
            r["arch"], r["estimator"] + (f" K={r['num_samples']}" if r["num_samples"] > 1 else ""),
            p["median_ms"], h["median_ms"], f"**{hr['median_of_rounds']:.2f}** ({hr['min']:.2f}-{hr['max']:.2f})",
            f"{p['median_cpu_ms']:.3f} / {h['median_cpu_ms']:.3f}", hr["cpu_of_medians"],
            f and f["median_ms"], ratio(f["package_ratio"]) if f else None,
            f"{p['compile_seconds']:.1f} / {h['compile_seconds']:.1f}",
            f"{load['median']:.1f} ({load['min']:.1f}-{load['max']:.1f})",
        ])
    page.table(["net", "estimator", "package ms", "hand ms", "ratio", "CPU ms (package / hand)", "CPU-time ratio",
                "hand_fit ms", "package / hand_fit", "compile s (package / hand)", "load (1 min)"],
               rows, formats=[None, None, ".3f", ".3f", None, None, ".2f", ".3f", None, None, None], absent="-")
    with_hlo = [r for r in report["results"] if r.get("hlo")]
    if with_hlo:
        keys = ("instructions", "fusions", "copied_bytes", "is_finite")
        page.table(["net", "estimator", "instructions", "fusions", "copied bytes", "is-finite"],
                   [[r["arch"], r["estimator"],
                     *(f"{r['hlo']['package'][k]:,} / {r['hlo']['hand'][k]:,}" for k in keys)] for r in with_hlo],
                   lead="Optimised XLA HLO of one step compiled alone (entry computation; package / "
                        "hand-written): instructions, fusions, bytes moved by `copy` instructions, is-finite "
                        "operations.")
    page.text(
        "Final mean training loss of the last timed run (the same estimator on the same data: package and "
        "hand-written should agree to within noise): "
        + "; ".join(f"{r['arch']} {r['estimator']}: "
                    + ", ".join(f"{n} {a['final_mean_loss']:.1f}" for n, a in r["arms"].items())
                    for r in report["results"]) + ".")
    page.bullets(report.get("notes"), "Reading:")
    return page


# ----------------------------------------------------------------------------- replay
def replay(report):
    settings = report["settings"]
    page = pages.Page("Critic learning with replay")
    page.text(
        "Generated by `benchmarks/replay.py` from `replay.json` (see the script's docstring for the method). The "
        "learned critics' relative MSE `mean((Q - Q*)^2) / var(Q*)` against the exact Q of the current policy "
        "(enumeration), averaged over the learned critics, with `compile(replay=...)` off and on: "
        f"`Replay(capacity={settings['capacity']}, updates_per_step={settings['updates_per_step']}, "
        f"correction=...)`. The actor learns too (Adam {settings['actor_lr']}; critics Adam "
        f"{settings['critic_lr']}), so replayed rows are off-policy. {settings['steps']} steps of "
        f"{settings['batch_size']} rows per arm, scored every {settings['chunk']} steps on "
        f"{settings['eval_rows']} fresh forward passes; medians over seeds {', '.join(settings['seeds'])}. Lower "
        "is better.")
    page.command(report["command"]).machine(report["machine"], load_end=report["load_average_at_end"])
    page.text(f"Total runtime {report['seconds']:.0f} s.")
    for graph, entry in report["graphs"].items():
        page.heading(graph).table(
            ["arm", "relative MSE at equal forward passes", "at equal seconds (`off`'s)", "ms per step",
             "trace (s)"],
            [[arm, s["final"], s.get("at_off_seconds"), 1e3 * s["seconds_per_step"], s["trace_seconds"]]
             for arm, s in entry["summary"].items()],
            "lrrrr", [None, ".3g", ".3g", ".2f", ".1f"], absent="-")
        curves = entry["curves"]
        arms = list(curves)
        seeds = sorted(curves[arms[0]])
        page.table(
            ["forward passes", *arms],
            [[passes, *(common.median([curves[a][s]["mse"][i] for s in seeds]) for a in arms)]
             for i, passes in enumerate(curves[arms[0]][seeds[0]]["passes"])],
            "r" * (1 + len(arms)), [None] + [".3g"] * len(arms),
            lead="Relative MSE after each chunk (median over seeds), by forward passes:")
    page.bullets(report.get("notes"), "Reading:")
    return page


# ----------------------------------------------------------------------------- sbn
SBN_PACKAGES = (*pages.DEFAULT_PACKAGES, "torch", "pyro", "storchastic")


def sbn_equal_time(page, entry, reference="keras_bpq auto (critic_cv)"):
    """Each method's test -ELBO at equal training wall-clock: the last evaluation
    at or before 1/4, 1/2 and all of the `reference` method's training time
    (median over seeds; the reference: the slowest method if absent)."""
    runs = {name: [r for r in rs if "curve" in r] for name, rs in entry["methods"].items()}
    runs = {name: rs for name, rs in runs.items() if rs}
    ends = {name: common.median([r["train_seconds"] for r in rs]) for name, rs in runs.items()}
    total = ends.get(reference, max(ends.values()))
    times = [total / 4, total / 2, total]

    def at(curve, t):
        done = [c["test_nelbo"] for c in curve if c["train_seconds"] <= t]
        return done[-1] if done else None

    page.table(["method", *(f"{t:.1f} s" for t in times)],
               [[name, *(common.median([at(r["curve"], t) for r in rs]) for t in times)] for name, rs in runs.items()],
               "l" + "r" * len(times), [None] + [".2f"] * len(times),
               lead="Test -ELBO at equal training wall-clock (the last evaluation at or before each time; median "
                    f"over seeds; {reference if reference in ends else 'the slowest method'} trained {total:.0f} s):")


def sbn_timing(page, entry):
    config = entry["config"]
    if config.get("timing_data") == "in_memory":
        data_note = (f"on {config['timing_batches']} batches binarised once and held in memory, tf.data "
                     "autotuning off: the training step, not the input pipeline")
    else:  # runs before the in-memory timing data
        data_note = ("the tf.data binarising pipeline included, autotuning on: fit times rounded up to "
                     "10 ms x (2^k - 1), see the notes")
    timing = entry["timing"]
    rows = []
    for name in next(iter(timing.values())):
        cells, ratios = [], []
        for key in ("jit_off", "jit_on"):
            r = timing.get(key, {}).get(name)
            autoencoder = timing.get(key, {}).get("autoencoder", {}).get("best_steps_per_s")
            if r is None or "error" in r:
                cells.append(r and f"error: `{r['error'][:200]}`")
                ratios.append("")
            else:
                cells.append(r["best_steps_per_s"])
                ratios.append(f"{autoencoder / r['best_steps_per_s']:.1f}x" if autoencoder else "")
        rows.append([name, *cells, " / ".join(ratios)])
    page.table(["model", "jit_compile off: steps/s", "jit_compile on: steps/s",
                "time/step vs autoencoder (off / on)"], rows, "lrrr", [None, ".0f", ".0f", None],
               lead=f"Throughput (fresh model, warm-up fit of 100 steps, then {config['timing_repeats']} fits of "
                    f"{config['timing_steps']} steps, best; steps_per_execution 50; {data_note}). `autoencoder`: "
                    "plain `keras.Model`, same layer sizes, sigmoid units, no sampling.")


def sbn(report):
    page = pages.Page("Sigmoid belief nets: keras_bpq vs Pyro vs Storchastic")
    page.text("Generated by `benchmarks/sbn.py` (see its docstring for the protocol). One section per comparison; "
              "numbers are medians over seeds. Test -ELBO: one latent draw per image on a fixed binarised test "
              "subset (the same array for every library); lower is better.")
    for tag, entry in sorted(sections(report).items()):
        config = entry["config"]
        page.heading(entry.get("title") or f"{entry['dataset']}, {entry['arch']}").command(entry["command"])
        page.machine(entry["machine"], SBN_PACKAGES)
        page.text(f"Batch {config['batch_size']}, Adam {config['learning_rate']}, seeds {config['seeds']}, "
                  f"runtime {entry['runtime_s']:.0f} s; the machine was shared with other jobs.")
        rows = []
        for name, row in entry["summary"].items():
            if "error" in row:
                rows.append([name, f"failed: `{row['error'][:300]}`", "", "", "", ""])
            else:
                rows.append([name, row["steps"], row["test_nelbo"], row["best_test_nelbo"], row["train_nelbo"],
                             row["steps_per_s"]])
        page.table(["method", "steps", "test -ELBO (final)", "best test -ELBO", "train -ELBO (final)",
                    "training steps/s (in the curve run)"], rows, "lrrrrr", [None, None, ".2f", ".2f", ".2f", ".1f"])
        curve_steps = sorted({c["step"] for runs in entry["methods"].values() for r in runs
                              for c in r.get("curve", [])})
        if curve_steps:
            rows = []
            for name, runs in entry["methods"].items():
                ok = [r for r in runs if "curve" in r]
                if ok:
                    rows.append([name, *(common.median([next((c["test_nelbo"] for c in r["curve"] if c["step"] == s),
                                                             None) for r in ok]) for s in curve_steps)])
            page.table(["method", *map(str, curve_steps)], rows, "l" + "r" * len(curve_steps),
                       [None] + [".2f"] * len(curve_steps), lead="Test -ELBO at each checkpoint (median over seeds):")
        if config.get("estimator_steps_override"):
            sbn_equal_time(page, entry)
        if entry.get("plot"):
            page.image(entry["plot"], "test -ELBO and encoder gradient variance")
        rows = []
        for name, runs in entry["methods"].items():
            for r in runs:
                for c in r.get("curve", []):
                    if "encoder_variance" in c:
                        same = c.get("reinforce_same_weights_variance")
                        rows.append([name, r.get("seed"), c["step"], c["encoder_variance"],
                                     same and math.log10(c["encoder_variance"] / same), same])
        if rows:
            page.table(["estimator", "seed", "step", "total variance", "log10 vs reinforce at the same weights",
                        "reinforce at the same weights"], rows, "lrrrrr", [None, None, None, ".4g", "+.2f", ".4g"],
                       lead=f"Encoder gradient variance ({config['num_draws']} draws of "
                            "`diagnostics.estimate_gradients` on one fixed binarised batch; total = sum of "
                            "per-entry variances over the q_* variables):")
        if entry.get("timing"):
            sbn_timing(page, entry)
        page.bullets([f"peer `{name}` seed {r.get('seed')}: `python {r['command']}`"
                      for name, runs in entry["methods"].items() for r in runs
                      if isinstance(r.get("command"), str)])
        page.bullets(entry.get("notes"), "Reading:")
    if report.get("_appendix"):
        page.block(report["_appendix"].strip("\n"))
    return page


def sbn_plot(entry, plt):
    """Test -ELBO against steps and training wall-clock, one colour per method
    (each seed thin, the median over seeds at each checkpoint bold), and the
    encoder gradient variance per checkpoint where the section measured it."""
    from matplotlib import ticker

    with_variance = any("encoder_variance" in c for runs in entry["methods"].values() for r in runs
                        for c in r.get("curve", []))
    if with_variance:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4), gridspec_kw={"width_ratios": [1, 1, 0.8]})
    else:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k, (name, runs) in enumerate(entry["methods"].items()):
        curves = [r["curve"] for r in runs if "curve" in r]
        if not curves:
            continue
        color = f"C{k % 10}"
        for curve in curves:
            nelbo = [c["test_nelbo"] for c in curve]
            axes[0].plot([c["step"] for c in curve], nelbo, color=color, alpha=0.3, linewidth=0.8)
            axes[1].plot([c["train_seconds"] for c in curve], nelbo, color=color, alpha=0.3, linewidth=0.8)
        points = min(len(c) for c in curves)
        median = [float(np.median([c[i]["test_nelbo"] for c in curves])) for i in range(points)]
        seconds = [float(np.median([c[i]["train_seconds"] for c in curves])) for i in range(points)]
        label = name if len(curves) == 1 else f"{name} (median of {len(curves)})"
        axes[0].plot([c["step"] for c in curves[0][:points]], median, color=color, linewidth=2, label=label)
        axes[1].plot(seconds, median, color=color, linewidth=2)
    if with_variance:
        sbn_variance_bars(axes[2], entry)
    for ax, xl in zip(axes, ("training steps", "training wall-clock (s)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("test negative ELBO (nats)")
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[1].xaxis.set_minor_formatter(ticker.NullFormatter())
    lo = min(c["test_nelbo"] for runs in entry["methods"].values() for r in runs if "curve" in r
             for c in r["curve"])
    first = [r["curve"][1]["test_nelbo"] for runs in entry["methods"].values() for r in runs
             if "curve" in r and len(r["curve"]) > 1]
    if first:
        for ax in axes[:2]:
            ax.set_ylim(lo - 2, max(first) + 5)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SBN {entry['dataset']} {entry['arch']}: test -ELBO"
                 + ("; encoder gradient variance" if with_variance else ""))
    fig.tight_layout()
    fig.set_dpi(90)  # laid out at matplotlib's default dpi, saved at 90
    return fig


def sbn_variance_bars(ax, entry):
    """Bars of the total encoder gradient variance at each checkpoint (median
    over seeds, log scale), per keras_bpq estimator, with `reinforce` at the
    same weights (hatched) where it was measured."""
    bars = []  # (label, colour, hatch, {step: [variances]})
    for k, (name, runs) in enumerate(entry["methods"].items()):
        own, same = {}, {}
        for r in runs:
            for c in r.get("curve", []):
                if "encoder_variance" in c:
                    own.setdefault(c["step"], []).append(c["encoder_variance"])
                if c.get("reinforce_same_weights_variance"):
                    same.setdefault(c["step"], []).append(c["reinforce_same_weights_variance"])
        if own:
            bars.append((name.replace("keras_bpq ", ""), f"C{k % 10}", None, own))
        if same:
            bars.append((f"reinforce at {name.replace('keras_bpq ', '')}'s weights", f"C{k % 10}", "//", same))
    steps = sorted({s for _, _, _, v in bars for s in v})
    width = 0.8 / len(bars)
    for i, (label, color, hatch, values) in enumerate(bars):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j, s in enumerate(steps) if s in values]
        ys = [float(np.median(values[s])) for s in steps if s in values]
        ax.bar(xs, ys, width, color="white" if hatch else color, edgecolor=color, hatch=hatch, label=label)
    ax.set_yscale("log")
    ax.set_xticks(range(len(steps)), [f"step {s}" for s in steps])
    ax.set_ylabel("encoder gradient variance (total, median of seeds)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)


def sbn_figures(report):
    """The plots sbn.json's sections name in `plot`: `sbn_plot` of each."""
    return {entry["plot"]: functools.partial(sbn_plot, entry) for entry in sections(report).values()
            if entry.get("plot")}


# ----------------------------------------------------------------------------- sbn_variance
def sbn_variance(report):
    cfg, checkpoints, timing = report["config"], report["checkpoints"], report["timing"]
    estimators = list(checkpoints[0]["estimators"])
    compared = [n for n in estimators if "vs_critic_cv_mean" in checkpoints[0]["estimators"][n]]
    page = pages.Page(report["title"])
    page.text("Generated by `benchmarks/sbn_variance.py`.").command(report["command"]).machine(report["machine"])
    page.text(f"Total runtime {report['runtime_s']:.0f} s.")
    page.heading("Setup").block([
        f"* Model: `examples/sbn.py` two-layer SBN, 64 -> z1[{cfg['z1']}] -> z2[{cfg['z2']}] Bernoulli, costs "
        "recon, kl1, kl2 (negative ELBO).",
        "* One model trained with `critic_cv` (the default when this ran; both nodes, learned critics, TD "
        f"targets, actor reads the Polyak target copies) for {cfg['steps']} steps: batch {cfg['batch_size']}, "
        f"Adam {cfg['learning_rate']}, steps_per_execution {cfg['steps_per_execution']}, seed {cfg['seed']}.",
        f"* At each checkpoint, {cfg['num_draws']} independent draws of the gradient of the encoder variables "
        f"(q_z1, q_z2 kernel and bias: {report['encoder_entries']} entries) on one fixed binarised batch of "
        f"{cfg['batch_size']} training images, by `diagnostics.estimate_gradients` (in chunks of {cfg['chunk']} "
        "draws), for three estimators at the same weights:",
        "  * `critic_cv`: the trained model itself, with its current critics;",
        "  * `reinforce`: a copy of the actor weights in a reinforce-compiled model whose EMA baselines were "
        f"warmed up on {cfg['baseline_warmup_steps']} training batches (fit with `SGD(0.0)`: baseline updated, "
        "weights unchanged, checked);",
        "  * `critic`: a copy of the actor weights and of every critic weight (online and target copies) in a "
        "`critic`-compiled model.",
        "* Total variance = sum over encoder entries of the per-entry variance across draws "
        "(`diagnostics.gradient_variance`). The interval is a bootstrap 95% interval "
        f"({cfg['bootstrap']} resamples of the draws).",
        "* Bias indication: squared distance between an estimator's mean over the draws and the critic_cv mean, "
        "next to the noise floor `(V_a + V_cv) / N` expected for two unbiased estimators (ratio ~1 = no "
        "detectable bias), and the number of encoder entries whose means differ by more than 4 standard errors "
        "(about 0.2 expected by chance over all entries). `critic_cv` is unbiased for any critic, so its mean is "
        "the reference; `reinforce`, also unbiased, is the control.",
    ])
    rows = []
    for cp in checkpoints:
        for name in estimators:
            e = cp["estimators"][name]
            by, ci = e["log10_ratio_to_reinforce_by_layer"], e["log10_ratio_ci95"]
            rows.append([cp["step"], cp["test_negative_elbo"], name, e["total_variance"],
                         f"{e['log10_ratio_to_reinforce']:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""),
                         by["q_z1"], by["q_z2"]])
    page.heading("Encoder gradient variance").table(
        ["step", "test -ELBO", "estimator", "total variance", "log10 ratio to reinforce [95%]", "q_z1 log10 ratio",
         "q_z2 log10 ratio"], rows, "rrlrrrr", [None, ".2f", None, ".4g", None, "+.2f", "+.2f"])
    page.text("Warmed-up reinforce baselines (bias-corrected EMA of the batch-mean downstream cost): "
              + "; ".join(f"step {cp['step']}: " + ", ".join(
                  f"{k} {v:.2f}" for k, v in cp["reinforce_baselines"]["bias_corrected"].items())
                          for cp in checkpoints) + ".")
    rows = []
    for cp in checkpoints:
        for name in compared:
            e = cp["estimators"][name]
            for layer, m in [("all", e["vs_critic_cv_mean"]), *e["vs_critic_cv_mean_by_layer"].items()]:
                rows.append([cp["step"], name, layer, m["sq_dist_to_cv_mean"], m["noise_floor"], m["ratio_to_floor"],
                             f"{m['entries_beyond_4se']}/{m['entries']}"])
    page.heading("Distance of the mean to the critic_cv mean (bias indication)").table(
        ["step", "estimator", "layer", "squared distance", "noise floor", "ratio", "entries > 4 SE"], rows,
        "rllrrrr", [None, None, None, ".4g", ".4g", ".1f", None])
    page.text("Squared norm of the critic_cv mean gradient (scale): " + ", ".join(
        f"step {cp['step']}: {cp['estimators']['critic_cv']['mean_sq_norm']:.4g}" for cp in checkpoints) + ".")
    load = report["load_average_1_5_15min"]
    page.heading("Time per gradient estimate").text(
        f"Training throughput, fresh models, batch {cfg['batch_size']}, steps_per_execution "
        f"{cfg['steps_per_execution']}: `fit` of {cfg['timing_steps']} steps after a warm-up fit that compiles "
        f"the step; {cfg['timing_repeats']} repeats interleaved across estimators. One step is one gradient "
        "estimate for the batch plus, for the critic estimators, one critic update. The binarising tf.data "
        "pipeline is included. The machine was shared with other jobs (1-min load average before / after the "
        f"timing: {load['before_timing'][0]:.2f} / {load['after_timing'][0]:.2f} on "
        f"{report['machine']['cpu_count']} cores), so the best repeat, the least disturbed, gives ms per step "
        "and the ratios; the median is shown too, and the process CPU time per step (all threads, less "
        "sensitive to other jobs than wall time). Marginal ms per step = (best "
        f"{cfg['timing_steps']}-step fit - best {cfg['steps_per_execution']}-step fit) / extra steps, which "
        "removes the per-fit overhead (iterator, callbacks) that weighs most on the fastest estimator.")
    ref = timing["reinforce"]
    page.table(
        ["estimator", "best steps/s", "ms per step (best)", "median steps/s", "all runs (steps/s)",
         "time vs reinforce (best)", "(median)", "CPU ms per step (median)", "CPU time vs reinforce",
         "marginal ms per step", "marginal vs reinforce"],
        [[label, t["best_steps_per_s"], t["ms_per_step"], t["median_steps_per_s"], numbers(t["steps_per_s"], ".0f"),
          t["ms_per_step"] / ref["ms_per_step"], t["ms_per_step_median"] / ref["ms_per_step_median"],
          t["cpu_ms_per_step_median"], t["cpu_ms_per_step_median"] / ref["cpu_ms_per_step_median"],
          t["marginal_ms_per_step"], t["marginal_ms_per_step"] / ref["marginal_ms_per_step"]]
         for label, t in timing.items()],
        "lrrrlrrrrrr", [None, ".1f", ".2f", ".1f", None, times, times, ".2f", times, ".2f", times])
    page.text("Secondary: wall time of the `estimate_gradients` calls (vectorised draws, one retrace per call), ms "
              "per draw: " + "; ".join(f"step {cp['step']}: " + ", ".join(
                  f"{n} {cp['estimators'][n]['estimate_gradients_ms_per_draw']:.1f}" for n in estimators)
                                       for cp in checkpoints) + ".")
    page.heading("Reading").bullets(report["reading"])
    return page


# ----------------------------------------------------------------------------- scaling
def scaling(report):
    config, machine = report["config"], report["machine"]
    page = pages.Page(report["title"])
    page.text("Generated by `benchmarks/scaling.py`.").command(report["command"]).machine(machine)
    page.text(
        f"Total runtime {report['runtime_s']:.0f} s.",
        f"The machine's {machine['cpu_count']} cores were shared with other jobs while this ran: the 1-minute "
        f"load average ranged from {report['load_range'][0]:.1f} to {report['load_range'][1]:.1f} during the "
        f"timed fits ({machine['cpu_count']:.1f} = every core busy), so absolute rates are low and noisy; the "
        "ratios within a row group are the point. CPU ms/step is the process CPU time (all threads).",
        f"Setup: `examples/sbn.py` two-layer SBN (64 -> z1[{config['z1']}] -> z2[{config['z2']}] Bernoulli, costs "
        "recon, kl1, kl2), digits with dynamic binarisation in the tf.data pipeline, global batch "
        f"{config['global_batch']}, Adam {config['learning_rate']:g}. Per combination: a warm-up fit of 2 x "
        f"steps_per_execution steps (tracing; `warm-up s`), then {config['repeats']} timed fits of "
        f"{config['timed_steps']} steps, median reported.")
    page.table(
        ["estimator", "setup", "replicas", "steps_per_execution", "steps/s (median)", "runs", "CPU ms/step",
         "warm-up s"],
        [[r["estimator"], config["setups"][r["setup"]], r["replicas"], r["steps_per_execution"], r["steps_per_s"],
          numbers(r["steps_per_s_runs"], ".0f"), r["cpu_ms_per_step"], r["warmup_s"]] for r in report["results"]],
        "llrrrlrr", [None, None, None, None, ".1f", None, ".2f", ".1f"])
    page.heading("Reading").bullets(report["reading"])
    return page


# ----------------------------------------------------------------------------- toy
def toy_plot(t):
    """The file name of the plot of p(b=1) during training at `t`."""
    return f"toy_training_t{t:g}.png"


def toy_median_steps(runs):
    """Median steps to the threshold over `runs` (inf where a run did not reach it)."""
    return float(np.median([r["steps"] if r["reached"] else math.inf for r in runs]))


def toy_steps_text(value, max_steps):
    if value is None or math.isinf(value):
        return f"not reached (>{max_steps})"
    return f"{value:.0f}"


def toy_fmt(x, digits=3):
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        return f"{x:.{digits}e}"
    return f"{x:.{digits + 1}g}"


def toy_row_name(row):
    name = row["estimator"]
    if row.get("num_samples", 1) > 1:
        name += f" (K={row['num_samples']})"
    if row["variant"] == "fresh":
        return name + (" (fresh: baseline 0)" if row["estimator"] == "reinforce" else "")
    return f"{name} ({row['variant']})"


def toy_grouped(results, t):
    """`(variance rows, training runs per configuration, throughput per configuration)` at `t`."""
    s = results["settings"]
    var_rows = [r for r in results["variance"] if r["t"] == t]
    runs = {config: [r for r in results["training"] if r["t"] == t and r["estimator"] == config]
            for config in s["configs"]}
    speed = {config: results["throughput"][f"{t}/{config}"] for config in s["configs"]
             if f"{t}/{config}" in results["throughput"]}
    return var_rows, runs, speed


def toy_speed(results, speed, config):
    """`(steps/s text, CPU us/step text, CPU us/step)` of a configuration: a
    reference shares the package `reinforce`'s (shown in brackets)."""
    reference = config in results["settings"]["references"]
    v = speed.get("reinforce" if reference else config)
    if v is None:
        return "-", "-", None
    steps, cpu = f"{v['steps_per_second']:.0f}", f"{v['cpu_microseconds_per_step']:.0f}"
    if reference:
        steps, cpu = f"({steps}, as reinforce)", f"({cpu})"
    return steps, cpu, v["cpu_microseconds_per_step"]


def toy_variance_table(page, rows):
    def within(r):
        if r["within_4_se"]:
            return "yes"
        return "NO (biased by design)" if r.get("biased_by_design") else "**NO**"

    cells = []
    for r in rows:
        snr_cf = toy_fmt(r["snr_closed_form"])
        if r["snr_closed_form"] is None and r["variance_closed_form"] is not None:
            snr_cf = "inf"
        var_cf = toy_fmt(r["variance_closed_form"])
        if r.get("closed_form_kind") == "quadrature":
            var_cf += " (quadrature)"
        cells.append([toy_row_name(r), r["theta"], r["p"], toy_fmt(r["mean"], 4), toy_fmt(r["std"]),
                      toy_fmt(r["variance"]), var_cf, toy_fmt(r["exact"], 4),
                      "inf (zero variance)" if r["snr"] is None else toy_fmt(r["snr"]), snr_cf,
                      number(r["z"], ".2f", "-"), within(r), r["estimate_seconds"]])
    page.table(["estimator", "theta", "p(b=1)", "mean", "std", "variance", "variance (closed form)", "exact", "SNR",
                "SNR (closed form)", "z", "within 4 SE", "estimate time (s)"], cells,
               formats=[None, "g", ".3f", None, None, None, None, None, None, None, None, None, ".2f"],
               lead="Per-step gradient draws, batch of one example:")


def toy_bias_table(page, rows):
    rows = [r for r in rows if r.get("biased_by_design")]
    if rows:
        page.table(
            ["estimator", "theta", "mean ± SE", "exact", "bias = mean - exact ± SE", "relative bias",
             "bias (quadrature)", "relative bias (quadrature)", "expected gradient (quadrature)", "its sign"],
            [[toy_row_name(r), r["theta"], f"{toy_fmt(r['mean'], 4)} ± {toy_fmt(r['standard_error'], 2)}",
              toy_fmt(r["exact"], 4), f"{toy_fmt(r['bias'], 4)} ± {toy_fmt(r['bias_standard_error'], 2)}",
              r["relative_bias"], toy_fmt(r["bias_closed_form"], 4), r["relative_bias_closed_form"],
              toy_fmt(r["mean_closed_form"], 4), "right" if r["mean_closed_form"] * r["exact"] > 0 else "**wrong**"]
             for r in rows],
            formats=[None, "g", None, None, None, "+.2f", None, "+.3f", None, None],
            lead="Bias of the biased-by-design estimators (measured, and by quadrature):")


def toy_cost_table(page, var_rows, speed):
    """Variance at equal compute: variance x (CPU time per step / reinforce's)."""
    base = speed.get("reinforce")
    if not base:
        return
    thetas = sorted({r["theta"] for r in var_rows}, reverse=True)
    rows = []
    for estimator, variant in dict.fromkeys((r["estimator"], r["variant"]) for r in var_rows):
        v = speed.get(estimator)
        if v is None:
            continue
        ratio = v["cpu_microseconds_per_step"] / base["cpu_microseconds_per_step"]
        samples = next(r for r in var_rows if r["estimator"] == estimator)["num_samples"]
        cells = []
        for theta in thetas:
            key = (estimator, variant, theta)
            row = next((r for r in var_rows if (r["estimator"], r["variant"], r["theta"]) == key), None)
            var = None if row is None else 0.0 if row["zero_variance"] else row["variance"]
            cells += ["-", "-"] if var is None else [toy_fmt(var), toy_fmt(var * ratio)]
        rows.append([toy_row_name({"estimator": estimator, "variant": variant, "num_samples": samples}), samples,
                     v["cpu_microseconds_per_step"], ratio, *cells])
    page.table(["estimator", "rows per step", "CPU us/step", "CPU ratio to reinforce",
                *(h for theta in thetas for h in (f"variance, theta = {theta:g}", "x CPU ratio"))],
               rows, formats=[None, None, ".0f", ".2f"] + [None] * 2 * len(thetas),
               lead="Variance at equal compute (per-step variance x CPU time per step relative to `reinforce`; "
                    "zero-variance rows stay 0):")


def toy_training_table(page, results, runs_by_config, speed):
    s = results["settings"]
    rows = []
    for config, runs in runs_by_config.items():
        if not runs:
            continue
        steps_per_s, cpu, cpu_us = toy_speed(results, speed, config)
        median = toy_median_steps(runs)
        rows.append([
            config if config not in s["references"] else f"{config} (reference)", runs[0].get("rows_per_step", 1),
            toy_steps_text(median, s["max_steps"]),
            ", ".join(str(r["steps"]) if r["reached"] else f">{r['steps_run']}" for r in runs),
            numbers([r["final_p"] for r in runs], ".3f"), steps_per_s, cpu,
            median * cpu_us * 1e-6 if cpu_us is not None and math.isfinite(median) else None,
            numbers([r["seconds"] for r in runs], ".1f"),
        ])
    page.table(["estimator", "rows per step", "median steps", "steps per seed", "final p(b=1) per seed", "steps/s",
                "CPU us/step", "median CPU s to threshold", "wall time per seed (s)"], rows,
               formats=[None] * 7 + [".2f", None], absent="-",
               lead=f"Training from theta = 0 to p(b=1) < {s['threshold']:g} (budget {s['max_steps']} steps):")


def toy_reading(results):
    """The measured ranking per t and the unbiasedness check (computed), then
    the interpretation written by hand into toy.json's `notes` for the run it
    holds, the cost lines (computed) and the caveat."""
    s = results["settings"]
    notes = results.get("notes") or []
    out = []
    for t in s["targets"]:
        _, runs, _ = toy_grouped(results, t)
        medians = {config: toy_median_steps(r) for config, r in runs.items() if r}
        ranking = "; ".join(f"{c} {toy_steps_text(medians[c], s['max_steps'])}"
                            for c in sorted(medians, key=lambda c: medians[c]))
        out.append(f"Median steps to p(b=1) < {s['threshold']:g} at **t = {t}**: {ranking}.")
    unbiased = [r for r in results["variance"] if not r.get("biased_by_design")]
    failures = [r for r in unbiased if not r["within_4_se"]]
    text = (f"**Unbiasedness.** {len(unbiased) - len(failures)} of {len(unbiased)} rows of the estimators "
            "docs/estimators.md marks unbiased (with the exact Q here) have their mean within 4 standard errors of "
            "the exact gradient")
    if failures:
        text += "; outside: " + ", ".join(
            f"{toy_row_name(r)} at t = {r['t']}, theta = {r['theta']:g} (z = {r['z']:.1f})" for r in failures)
    closed = [r for r in results["variance"] if r.get("variance_closed_form") and not r["zero_variance"]]
    if closed:
        worst = max(closed, key=lambda r: abs(r["variance"] / r["variance_closed_form"] - 1))
        text += (f". Measured variances match the closed forms / quadrature to within "
                 f"{100 * abs(worst['variance'] / worst['variance_closed_form'] - 1):.0f}% "
                 f"(worst: {toy_row_name(worst)}, t = {worst['t']}, theta = {worst['theta']:g})")
    out.append(text + ".")
    stationary = results.get("gumbel_stationary_p") or {}
    items = []
    for t in s["targets"]:
        _, runs, _ = toy_grouped(results, t)
        for config, p in stationary.get(str(t), {}).items():
            finals = [r["final_p"] for r in runs.get(config, [])]
            items.append(f"{config} at t = {t}: p = {toy_fmt(p)}"
                         + (f" (final p of training {min(finals):.3f}-{max(finals):.3f})" if finals else ""))
    if items:
        out.append("**Where gumbel settles.** The p(b=1) at which its expected gradient (quadrature) is zero: "
                   + "; ".join(items) + ".")
    return out + notes + toy_cost_notes(results) + [
        "**Caveat.** This toy is the best case for the critic estimators: Q is the exact cost, not a learned "
        "network. It checks the estimators' algebra and their variance when Q is right; it says nothing about how "
        "fast a learned critic becomes right."]


def toy_cost_notes(results):
    """The timing notes, computed from the run's numbers."""
    s = results["settings"]
    speed = results.get("throughput", {})
    parts = []
    for t in s["targets"]:
        base = speed.get(f"{t}/reinforce")
        if not base:
            continue
        _, runs, _ = toy_grouped(results, t)
        cpu = base["cpu_microseconds_per_step"]
        items = [f"{config} {speed[f'{t}/{config}']['cpu_microseconds_per_step'] / cpu:.2f}"
                 for config in runs if config not in s["references"] and f"{t}/{config}" in speed]
        parts.append(f"**Cost per step, t = {t}** (CPU time per step relative to `reinforce`, batch "
                     f"{s['batch_size']}, `steps_per_execution={s['steps_per_execution']}`): " + ", ".join(items) + ".")
    times = [r["estimate_seconds"] for r in results["variance"]]
    if times:
        text = (f"**estimate_gradients.** One vectorised call of {s['num_draws']} draws took "
                f"{min(times):.2f}-{max(times):.2f} s wall time across estimators (the first theta of each includes "
                "the trace).")
        scaling_rows = results.get("estimate_scaling") or []
        if len(scaling_rows) >= 3:
            (n1, t1), (n2, t2) = [(r["num_draws"], r["seconds"]) for r in scaling_rows[-2:]]
            text += (f" In the scaling table {scaling_rows[0]['num_draws']} draws cost "
                     f"{scaling_rows[0]['seconds']:.2f} s (the trace), and from {n1} to {n2} draws the time grew "
                     f"like num_draws^{math.log(t2 / t1) / math.log(n2 / n1):.1f}.")
        parts.append(text)
    return parts


def toy(results):
    s, m = results["settings"], results["machine"]
    enum_error = max((abs(r["exact"] - r["exact_enumeration"]) / abs(r["exact"]) for r in results["variance"]),
                     default=0.0)
    k = s.get("rloo_samples", 2)
    page = pages.Page("REBAR toy")
    page.text(
        "One Bernoulli node `b ~ Bernoulli(sigmoid(theta))` with a single learnable logit `theta` (a one-weight "
        "layer broadcast to the batch), cost `(b - t)^2` per example, functional `BackpropQModel(inputs=x, "
        "outputs=b, costs={\"cost\": cost})`. Exact gradient `(1 - 2t) sigmoid(theta) (1 - sigmoid(theta))`; the "
        "optimum is p(b=1) -> 0. Every estimator of `keras_bpq` that can serve a Bernoulli node is measured.")
    page.command(results["command"]).machine({**m, **results["versions"]})
    loads = [m[key][0] for key in ("load_average_at_start", "load_average_at_end") if m.get(key)]
    page.text(f"Total run time {results['total_seconds']:.0f} s (plus about {results['import_seconds']:.0f} s of "
              "imports)." + (" The machine was shared with other jobs, so wall times and steps/s are noisy (the "
                             "best of the repeated throughput runs is shown)."
                             if loads and max(loads) > 0.75 * (m["cpu_count"] or 1) else ""))
    page.bullets([
        "Estimators: " + ", ".join(f"`{e}`" for e in s["estimators"]) + f". `rloo` is compiled with "
        f"`num_samples={k}`: every training step (and every gradient draw) holds {k} draws of b for the one "
        f"example, so its batch has {k} rows; all others have 1. `gumbel` is `keras_bpq.estimators.Gumbel()` "
        "(temperature 0.5, anneal_rate 1: constant), `gumbel_straight_through` is "
        "`Gumbel(straight_through=True)`; `relax` is the package's RELAX at its default temperature 0.5.",
        "Gradient variance: `keras_bpq.diagnostics.estimate_gradients(model, x, "
        f"num_draws={s['num_draws']})` with `x` a single row (batch size 1), at theta in "
        f"{{{', '.join(f'{x:g}' for x in s['thetas'])}}}. One draw is the gradient of one training step: "
        "`estimate_gradients` tiles `x` once per draw, and the model's forward pass repeats each row "
        f"`num_samples` times, so an `rloo` draw averages the leave-one-out surrogate over its {k} rows, exactly "
        "as a training step does. SNR = |mean| / std of the per-draw gradient; SNR (closed form) = |closed-form "
        "mean| / closed-form std; z = |mean - exact| / standard error; \"within 4 SE\" also allows 1e-5 relative "
        "+ 1e-7 absolute for float32 rounding, and an estimator whose std is below that is reported as zero "
        "variance. The exact gradient is the closed form for the float32 value of t that the graph holds (0.499 "
        "is stored as 0.49900001, which moves the exact gradient by 1.3e-5 relative); "
        f"`diagnostics.exact_gradients` (enumeration, float32) agrees with it to {enum_error:.1e} relative or "
        "better in every row. Closed-form moments: from the per-draw values given b (reinforce, critic, "
        "critic_cv, local_expectation, rloo with K = 2, disarm); for gumbel and relax, midpoint quadrature over "
        "their uniform noise in float64 (2e6 points; relax: a 1500 x 1500 grid per value of b), which also gives "
        "gumbel's exact bias. Estimate time: one `estimate_gradients` call of all draws; the first theta of each "
        "estimator includes the trace of its tf.function (cached per model afterwards).",
        f"`reinforce` is the package's score function with an EMA baseline (decay {s['reinforce_baseline_decay']:g}, "
        "bias corrected; the baseline never sees the current batch, so step 1 uses baseline 0). A fresh model's "
        "baseline is 0, so the `reinforce (fresh)` rows have no baseline; the `baseline=E[c]` rows preset the "
        "baseline state to the exact expected cost, the value the EMA tracks.",
        f"Training: Adam (Keras defaults, learning rate {s['learning_rate']:g}), batch size {s['batch_size']}, "
        f"theta = 0 at the start, `steps_per_execution={s['check_every']}`; p(b=1) is checked every "
        f"{s['check_every']} steps (so step counts are multiples of {s['check_every']}) and training stops at "
        f"p(b=1) < {s['threshold']:g}, or at the budget of {s['max_steps']} steps (\"not reached\"); seeds "
        f"{s['seeds']} (the seed drives the Bernoulli and relaxation noise).",
        "Two reinforce references, not package estimators: `reinforce_warm_baseline` is `reinforce` with its EMA "
        "state preset to E[c] at theta = 0 (as if the baseline had been warmed up), `reinforce_no_baseline` holds "
        "the baseline at 0 (a subclass of `keras_bpq.estimators.Reinforce`).",
        f"Steps/s: after all training, {s['throughput_repeats']} interleaved rounds in which each estimator's "
        f"seed-0 model (one per t, already traced) runs a timed `fit` of {s['throughput_steps']} more steps; the "
        "best round is shown (callbacks included; every round is in `toy.json`). Interleaving spreads load from "
        "other jobs over all estimators alike. CPU us/step is the process CPU time (all threads) per step, the "
        "least of the rounds: less sensitive to other jobs than wall time. The wall time per seed includes the "
        "first trace of the training step. \"Variance x CPU ratio\" is the per-step variance times the CPU time "
        "per step relative to `reinforce`: the variance at equal compute (averaging n draws divides the variance "
        "by n and multiplies the cost by n), lower is better.",
        "**Q is exact here, not learned.** `b` is the cost's last stochastic ancestor, so every estimator with a "
        "critic (`critic`, `critic_cv`, `local_expectation`, `relax`, `gumbel`) uses the cost itself, "
        "re-evaluated with `b` forced to other values, as Q (`scg_summary` shows `exact[cost]`); no critic "
        "network exists and the critic optimizer is unused. For `critic`, `critic_cv` and `local_expectation` "
        "that is the exact Q at b = 0 and b = 1: these are the critic estimators at their best, not a test of "
        "critic learning. `relax`'s control variate is the same head evaluated at relaxed samples, c(z) = "
        "(sigmoid(z / 0.5) - t)^2 (nothing tunes it towards low variance), and `gumbel` differentiates that same "
        "relaxed cost. `disarm` re-runs the cost at the antithetic sample.",
    ], "Settings:")
    na = results.get("not_applicable") or []
    if na:
        rows = []
        for r in na:
            if r.get("resolves_to"):
                result = f"compiles; resolves to `{r['resolves_to']}` (the default)"
            else:
                result = "compiles" if r["error"] is None else f"`{r['error']}`"
            rows.append([r["estimator"], r["num_samples"], result])
        page.heading("Estimators that cannot serve this node").table(
            ["estimator", "num_samples", "result"], rows,
            lead="Each compiled once on this model; the error is raised by `compile()`:")
    plots = {os.path.basename(p) for p in results.get("plots", [])}
    for t in s["targets"]:
        var_rows, runs, speed = toy_grouped(results, t)
        page.heading(f"t = {t}").text(f"Exact gradient at theta = 0: {(1 - 2 * t) / 4:.4g}; cost gap c(1) - c(0) "
                                      f"= 1 - 2t = {1 - 2 * t:.3g}.")
        toy_variance_table(page, var_rows)
        toy_bias_table(page, var_rows)
        toy_cost_table(page, var_rows, speed)
        toy_training_table(page, results, runs, speed)
        plot = toy_plot(t)
        if plot in plots:
            page.image(plot, f"p(b=1) during training at t = {t}, every estimator and seed")
    if results.get("estimate_scaling"):
        page.heading("Cost of `estimate_gradients` against num_draws").table(
            ["num_draws", "seconds"], [[r["num_draws"], r["seconds"]] for r in results["estimate_scaling"]],
            formats=[None, ".2f"],
            lead=f"One call each on one `reinforce` model, t = {s['targets'][0]}, theta = 0, batch of one row; "
                 "`estimate_gradients` caches its tf.function per model, so only the first call includes the trace:")
    page.heading("Reading").text(
        "The ranking, unbiasedness and cost lines are computed from the results"
        + ("; the notes after them were written from the default run (`python benchmarks/toy.py`) and quote its "
           "numbers." if results.get("notes") else "."))
    return page.bullets(toy_reading(results))


TOY_COLORS = {
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


def toy_training_plot(results, t, plt):
    """p(b=1) during training at `t`, one line per estimator and seed (the
    references dashed, the estimators biased by design dotted), each estimator's
    median steps to the threshold in the legend."""
    s = results["settings"]
    biased = {r["estimator"] for r in results["variance"] if r.get("biased_by_design")}
    _, runs, _ = toy_grouped(results, t)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    seen = set()
    for run in results["training"]:
        if run["t"] != t:
            continue
        config = run["estimator"]
        label = None
        if config not in seen:
            label = f"{config}: median {toy_steps_text(toy_median_steps(runs[config]), s['max_steps'])}"
        ax.plot(s["check_every"] * (np.arange(len(run["curve_p"])) + 1), run["curve_p"],
                color=TOY_COLORS.get(config), alpha=0.65, lw=1,
                ls="--" if config in s["references"] else (":" if config in biased else "-"), label=label)
        seen.add(config)
    ax.axhline(s["threshold"], color="k", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("training step")
    ax.set_ylabel("p(b=1) = sigmoid(theta)")
    ax.set_title(f"REBAR toy, t = {t}: p(b=1) during training, one line per seed "
                 f"(Adam {s['learning_rate']:g}, batch {s['batch_size']})", fontsize=10)
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    return fig


def toy_figures(results):
    """The plots toy.json names in `plots` (`toy_plot(t)` for each t): `toy_training_plot` of each."""
    plots = {os.path.basename(p) for p in results.get("plots", [])}
    return {toy_plot(t): functools.partial(toy_training_plot, results, t) for t in results["settings"]["targets"]
            if toy_plot(t) in plots}


# ----------------------------------------------------------------------------- variance_per_second
def variance_per_second(report):
    page = pages.Page("Gradient variance per second of training")
    page.text(
        "Generated by `benchmarks/variance_per_second.py` from `variance_per_second.json` (see the script's "
        "docstring). Every arm is measured at the same trained weights: the encoder gradient's total variance "
        "over the draws on one fixed batch, and the whole training step (jit on, steps_per_execution 50, arms "
        "interleaved, best round). `var x step` relative to reinforce is the variance of the gradient averaged "
        "over one second of training, relative to reinforce's: below 1 is more signal per second. "
        "`critic_cv_linear<S>` is `CriticCV(units=S, linearize=True)` (a uniform draw of the S units); "
        "`critic_cv_islinear<S>` the same with the units drawn by importance (`unit_sampling=\"importance\"`, "
        "`auto`'s choice on wide Bernoulli nodes with S = 4 since it was added); `critic_cv_units<S>` is "
        "`CriticCV(units=S)`; `critic_cv` sums every unit's flip exactly.")
    for tag, entry in sections(report).items():
        page.heading(tag).command(entry.get("command"))
        page.text(f"Weights after {entry['train_steps']} `{entry['train_estimator']}` steps; {entry['num_draws']} "
                  "draws per arm." + (f" Note: {entry['note']}." if "note" in entry else ""))
        page.machine(entry["machine"], load_end=entry["load"])
        agreement = [r["mean_agreement"] for r in entry["arms"].values() if "mean_agreement" in r]
        page.table(["arm", "variance", "variance / reinforce's", "ms per step", "step / reinforce's",
                    "var x step / reinforce's"] + (["mean against the reference's"] if agreement else []),
                   [[name, r["variance"], r.get("variance_ratio"), r["step_ms"], r.get("step_ratio"),
                     r.get("signal_per_second_ratio") and 1 / r["signal_per_second_ratio"]]
                    + ([mean_agreement_text(r.get("mean_agreement"))] if agreement else [])
                    for name, r in entry["arms"].items()],
                   "lrrrrr" + ("l" if agreement else ""), [None, ".4g", ".2e", ".2f", ".2f", ".2e"]
                   + ([None] if agreement else []), absent="-")
        if agreement:
            page.text(
                f"Mean against the reference's (`{agreement[0]['reference']}`, every arm unbiased): per encoder "
                "coordinate `z` = the difference of the two means over its standard error; the share of "
                "coordinates with `|z| > 4` (about 6e-5 for Gaussian means), the largest `|z|`, and the "
                "difference's norm over the reference mean's.")
        page.bullets(entry.get("notes"), "Reading:")
    return page


def mean_agreement_text(agreement):
    """`variance_per_second.mean_agreement`'s numbers as a cell ('-': the reference itself)."""
    if agreement is None:
        return "-"
    return (f"{agreement['beyond_4_se']:.1e} beyond 4 SE, max {agreement['max_abs_z']:.1f}, "
            f"{agreement['relative_difference']:.2f} of its norm")


# ----------------------------------------------------------------------------- step_stages
def stage_rows(op_ms, whole_ms):
    """The rows of a table of where a step goes: each stage of `op_ms`
    (`{stage: {column: CPU ms per step}}`, in order), their sum, the whole
    step (`whole_ms`, `{column: wall ms per step}`) and its ratio to the first
    column's."""
    names = list(whole_ms)
    rows = [[stage, *(row[n] for n in names)] for stage, row in op_ms.items()]
    if rows:
        rows.append(["all operations", *(sum(row[n] for row in op_ms.values()) for n in names)])
    rows.append(["whole step (fit, wall)", *(whole_ms[n] for n in names)])
    rows.append([f"step / {names[0]}'s", *(times(whole_ms[n] / whole_ms[names[0]]) for n in names)])
    return rows


def step_stages(report):
    page = pages.Page("Where a training step's time goes")
    page.text(
        "Generated by `benchmarks/profile_step.py` from `step_stages.json` (see the script's docstring). "
        "The whole step: milliseconds per training step of each estimator on one SBN (`fit`, "
        "steps_per_execution 50, best of the rounds, the estimators alternating within a round); the step "
        "ratio is each whole step over the first column's. Under XLA, where it goes: CPU milliseconds per "
        "step of the compiled step's operations, summed over the threads that ran them, by the stage whose "
        "name scope they carry (`keras_bpq.step.STAGE_SCOPES`; \"(gradient)\": that stage's share of the "
        "actor's gradient; \"other\": operations under no stage's scope, the actor's loss and the copies of "
        "the step's inputs and outputs), from one profiled `fit` of each step.")
    for tag, entry in sections(report).items():
        page.heading(tag).command(entry.get("command"))
        page.machine(entry["machine"], load_end=entry["load_end"])
        for setting, result in entry["jit_compile"].items():
            names = list(result["whole_ms"])
            rows = stage_rows(result.get("op_ms", {}), result["whole_ms"])
            page.table(["stage", *names], rows, "l" + "r" * len(names),
                       [None] + [".2f"] * len(names), lead=f"`jit_compile` {setting}, batch {entry['batch_size']}:")
        page.bullets(entry.get("notes"), "Reading:")
    return page


# ----------------------------------------------------------------------------- kg_step_stages
def seconds_or_count(value):
    """A count of operations as `4,941`, seconds as `8.4`."""
    return f"{value:,}" if isinstance(value, int) else f"{value:.1f}"


def kg_step_stages(report):
    page = pages.Page("Where the knowledge-graph agent's first compile and step go")
    page.text(
        "Generated by `benchmarks/kg_profile_step.py` from `kg_step_stages.json` (see the script's docstring). "
        "Per arm: its first compile (a fresh agent's first `fit`, less its steps at the steady step time; the "
        "median of the rounds, the arms in turns), of which the Python trace of the training step alone, and "
        "that trace's TensorFlow operations by the stage whose name scope they carry "
        "(`keras_bpq.step.STAGE_SCOPES`; \"(gradient)\": that stage's share of the actor's gradient; "
        "\"other\": under no stage's scope); then the steady step (the best of the timed `fit`s) and its CPU "
        "milliseconds per step by stage, summed over the threads that ran them, from one profiled `fit`.")
    for tag, entry in sections(report).items():
        page.heading(tag).command(entry.get("command"))
        page.machine(entry["machine"], load_end=entry["load_end"])
        arms = entry["arms"]
        names = list(arms)
        page.text(f"Settings {json.dumps(entry['settings'])}; XLA {'on' if entry['xla'] else 'off'}; "
                  f"{entry['compile_rounds']} compile rounds, steady step best of {entry['repeats']} fits of "
                  f"{entry['fit_steps']} steps.")
        seen = {stage for arm in arms.values() for part in ("traced_ops", "op_ms") for stage in arm[part]}
        order = entry["stages"] + sorted(seen - set(entry["stages"]))
        rows = [["first compile (s)", *(arms[n]["compile_seconds"] for n in names)],
                ["of which the step's trace (s)", *(arms[n]["trace_seconds"] for n in names)]]
        rows += [[f"traced ops: {stage}", *(arms[n]["traced_ops"].get(stage, 0) for n in names)] for stage in order
                 if any(stage in arms[n]["traced_ops"] for n in names)]
        rows.append(["traced ops: all", *(sum(arms[n]["traced_ops"].values()) for n in names)])
        page.table(["first compile", *names], rows, "l" + "r" * len(names), [None] + [seconds_or_count] * len(names),
                   lead="The first compile:")
        op_ms = {stage: {n: arms[n]["op_ms"].get(stage, 0.0) for n in names} for stage in order
                 if any(stage in arms[n]["op_ms"] for n in names)}
        rows = stage_rows(op_ms, {n: arms[n]["whole_ms"] for n in names})
        page.table(["stage (CPU ms per step)", *names], rows, "l" + "r" * len(names), [None] + [".1f"] * len(names),
                   lead="The steady step:")
        page.bullets(entry.get("notes"), "Reading:")
    return page


# ----------------------------------------------------------------------------- RESULTS.md's headline
RESULTS_PAGE = os.path.join(common.ROOT, "benchmarks", "RESULTS.md")
HEADLINE_START = "<!-- headline table: rendered by benchmarks/render.py from results/*.json -->"
HEADLINE_END = "<!-- end headline table -->"
# The tasks the headline expects, in its order: equal_time.json's sections
# (`<dataset>_<arch>`), then kg.json's datasets. A task without results shows as "not run".
HEADLINE_SBN = {
    "fashion_mnist_linear": "Fashion-MNIST linear 784-200",
    "fashion_mnist_two_layer": "Fashion-MNIST two-layer",
    "fashion_mnist_nonlinear": "Fashion-MNIST nonlinear",
    "digits_two_layer": "digits two-layer",
}
# equal_time.json's (kg_equal_time.json's) section `<task's section><HEADLINE_LONG>`
# (`--out_tag`) holds a task's run at longer budgets, its rows under the task's own.
HEADLINE_LONG = "_long"
HEADLINE_KG = {"umls": "KG UMLS", "kinship": "KG Kinship"}
# kg_equal_time.json's section `<dataset><HEADLINE_KG_XLA>` holds a dataset's run
# with every arm under XLA (`--jit_compile=true`, as the SBN rows run): where
# it exists its rows are the dataset's, first, and the runs without XLA follow
# under the label `<dataset's label><HEADLINE_KG_NO_XLA>`.
HEADLINE_KG_XLA = "_long_xla"
HEADLINE_KG_NO_XLA = " without XLA"
# Its section `<dataset><HEADLINE_KG_XLA><HEADLINE_KG_SELECTED>` holds the same
# flags scored at each arm's checkpoint with the best dev Hits@1
# (`kg_equal_time.py --select_every`, MINERVA's protocol): where it exists its
# rows come first, labelled `<label><HEADLINE_KG_BEST_DEV>`, and the XLA run
# scored at the last turn follows, labelled `<label><HEADLINE_KG_LAST>`.
HEADLINE_KG_SELECTED = "_selected"
HEADLINE_KG_BEST_DEV = ", best dev checkpoint"
HEADLINE_KG_LAST = ", last turn"
KG_CRITIC_FREE = {"minerva": "MINERVA's estimator", "rloo": "`rloo`"}


def bold(text, yes):
    return f"**{text}**" if yes else text


def span(values, spec):
    """`lo-hi` of `values` formatted by `spec` (one value where they agree)."""
    lo, hi = format(min(values), spec), format(max(values), spec)
    return lo if lo == hi else f"{lo}-{hi}"


def headline_overhead(overhead, tag):
    """The range of overhead.json's package / hand-written ratios (median over
    rounds) on the net of equal_time's `tag`, and of their 1-minute loads
    (overhead.py's nets are Fashion-MNIST's)."""
    rows = [r for r in overhead["results"] if f"fashion_mnist_{r['arch']}" == tag]
    if not rows:
        return None
    return (span([r["arms"]["hand"]["package_ratio"]["median_of_rounds"] for r in rows], ".2f") + "x (load "
            + span([r["load_1min"]["median"] for r in rows], ".1f") + ")")


def headline_sbn_rows(tag, label, entry, overhead):
    """A row per budget of equal_time.json's section `tag` (None: not run);
    `overhead` None leaves target 3's cell empty (a task's long-budget run).
    The step ratio is blank where the run trained no `reinforce` arm."""
    package = headline_overhead(overhead, tag) if overhead is not None else ""
    if entry is None:
        return [[label, "not run", "", "", "", "", package, ""]]
    runs = entry["runs"]
    step = (times(common.median([r["auto"]["ms_per_step"] for r in runs])
                  / common.median([r["reinforce"]["ms_per_step"] for r in runs]))
            if "reinforce" in runs[0] else "")
    made = equal_time_sections.section_runs(entry)
    load = [value for machine, end in made for value in (pages.start_load(machine)[0], end[0])]
    commits = sorted({pages.commit_text(machine) or "commit not recorded" for machine, _ in made})
    measured = f"{', '.join(commits)}, load {span(load, '.1f')}"
    rows = []
    for i, row in enumerate(entry["summary"]):
        values, free, winner = row["values"], row["best_critic_free"], row["winner"]
        rows.append([label if i == 0 else "", f"{row['budget']} s",
                     bold(number(values["auto"], ".2f"), winner == "auto"),
                     bold(number(values[free], ".2f"), winner == free) + f" (`{free}`)",
                     "default" if winner == "auto" else f"`{winner}`",
                     *([step, package, measured] if i == 0 else ["", "", ""])])
    return rows


def headline_task_rows(tag, label, equal_time, overhead):
    """The task's rows (`headline_sbn_rows`), then those of its long-budget
    section where equal_time.json holds one."""
    long = equal_time.get(tag + HEADLINE_LONG)
    return (headline_sbn_rows(tag, label, equal_time.get(tag), overhead)
            + (headline_sbn_rows(tag, "", long, None) if long is not None else []))


def kg_measured(machines):
    """`commit(s), load lo-hi at the start` of the runs made on `machines`."""
    load = [pages.start_load(m)[0] for m in machines if pages.start_load(m)]
    commits = {pages.commit_text(m) for m in machines}
    return (", ".join(sorted(c for c in commits if c)) or "commit not recorded") + (
        f", load {span(load, '.1f')} at the start" if load else "")


def headline_kg_versus(default, free, winner):
    """The default's and the best critic-free arm's cells: Hits@1 `default`,
    `free` (`{arm: Hits@1}`), `winner` an arm name."""
    best = max(free, key=free.get)
    others = "".join(f"; {KG_CRITIC_FREE[n]} {v:.3f}" for n, v in free.items() if n != best)
    return ["Hits@1 " + bold(f"{default:.3f}", winner == "auto"),
            bold(f"{free[best]:.3f}", winner == best) + f" ({KG_CRITIC_FREE[best]}{others})",
            "default" if winner == "auto" else KG_CRITIC_FREE[winner]]


def headline_kg_time_rows(entry, label, skip=()):
    """A row per budget of a kg_equal_time.json section (test Hits@1 at equal
    wall-clock; budgets in `skip` left out), the first labelled `label`."""
    runs = entry["runs"]
    step = (times(common.median([r["auto"]["ms_per_step"] for r in runs])
                  / common.median([r["minerva"]["ms_per_step"] for r in runs])) + " MINERVA's step"
            if "minerva" in runs[0] else None)
    made = equal_time_sections.section_runs(entry)
    measured = (kg_measured([machine for machine, _ in made])
                + f", {span([end[0] for _, end in made], '.1f')} at the end")
    rows = []
    for row in entry["summary"]:
        if row["budget"] in skip:
            continue
        values = row["hits@1"]
        free = {n: values[n] for n in KG_CRITIC_FREE if n in values}
        # The default against the critic-free arms only (a section may hold other arms of the default).
        winner = max(["auto", *free], key=lambda n: (values[n], n == "auto"))
        rows.append([label if not rows else "", f"{row['budget']} s",
                     *headline_kg_versus(values["auto"], free, winner),
                     *([step, "", measured] if not rows else ["", "", ""])])
    return rows


def headline_kg_rows(dataset, label, kg, kg_time):
    """The rows of kg_equal_time.json's section `dataset` (test Hits@1 at equal
    wall-clock), then those of its section `<dataset>_long` at the budgets the
    first lacks, then kg.json's row at equal steps: the default's, and the best
    critic-free estimator's with the other's."""
    rows = []
    entry, long = kg_time.get(dataset), kg_time.get(dataset + HEADLINE_LONG)
    if entry is not None:
        rows += headline_kg_time_rows(entry, label)
    if long is not None:
        rows += headline_kg_time_rows(long, "" if rows else label,
                                      {row["budget"] for row in entry["summary"]} if entry else ())
    summary = kg_summary(kg, dataset)
    if "auto" not in summary:
        return rows or [[label, "not run", "", "", "", "", "", ""]]
    default = summary["auto"]
    free = {name: summary[name]["hits@1"] for name in KG_CRITIC_FREE if name in summary}
    winner = max(["auto", *free], key=lambda n: (default["hits@1"] if n == "auto" else free[n], n == "auto"))
    step = (f"{times(summary['minerva']['steps_per_second'] / default['steps_per_second'])} MINERVA's step"
            if "minerva" in summary else None)
    machines = common.listed(kg["machine"])
    budget = f"equal steps ({default['steps']})" if rows else f"equal steps only ({default['steps']})"
    return rows + [["" if rows else label, budget, *headline_kg_versus(default["hits@1"], free, winner), step, "",
                    kg_measured(machines)]]


def headline_kg_dataset_rows(dataset, label, kg, kg_time):
    """A KG dataset's rows: those of kg_equal_time.json's section
    `<dataset>_long_xla` (every arm under XLA) labelled `label`, then the runs
    without XLA (`headline_kg_rows`) labelled `<label> without XLA`; without
    that section, the runs without XLA alone, labelled `label`. Where the
    section `<dataset>_long_xla_selected` exists (scored at the best dev
    checkpoint), its rows come first, labelled `<label>, best dev checkpoint`,
    and those of `<dataset>_long_xla` are labelled `<label>, last turn`."""
    entry = kg_time.get(dataset + HEADLINE_KG_XLA)
    if entry is None:
        return headline_kg_rows(dataset, label, kg, kg_time)
    selected = kg_time.get(dataset + HEADLINE_KG_XLA + HEADLINE_KG_SELECTED)
    rows = [] if selected is None else headline_kg_time_rows(selected, label + HEADLINE_KG_BEST_DEV)
    rows += headline_kg_time_rows(entry, label if selected is None else label + HEADLINE_KG_LAST)
    return rows + headline_kg_rows(dataset, label + HEADLINE_KG_NO_XLA, kg, kg_time)


def headline_table(equal_time, overhead, kg, kg_time=None):
    """RESULTS.md's headline table (markdown) from the reports of equal_time.json,
    overhead.json, kg.json and kg_equal_time.json (None: not run): each task of
    HEADLINE_SBN and HEADLINE_KG, "not run" where its report has no section for it."""
    equal_time = sections(equal_time)
    rows = [row for tag, label in HEADLINE_SBN.items()
            for row in headline_task_rows(tag, label, equal_time, overhead)]
    kg_time = sections(kg_time or {})
    rows += [row for dataset, label in HEADLINE_KG.items()
             for row in headline_kg_dataset_rows(dataset, label, kg, kg_time)]
    table = pages.table(
        ["task", "budget", "default (`auto`)", "best critic-free", "winner",
         "default's step / `reinforce`'s (target 2)", "package / hand-written step (target 3)",
         "measured at (commit, 1-min load)"], rows, "llrrlrll")
    note = (
        "Rendered by `benchmarks/render.py` from `results/equal_time.json` (test -ELBO per "
        "budget, medians over seeds, the best critic-free of the arms each run trained; a task's longer budgets "
        f"from its section `<task>{HEADLINE_LONG}`; the default's step over `reinforce`'s: their median ms per "
        "step in the same run; measured at: the section's commit and the 1-minute load average at its start and end), "
        "`results/overhead.json` (package / hand-written step: the range over the estimators "
        "run on that net of the median-over-rounds ratio, and of their 1-minute loads; commit "
        f"{pages.commit_text(overhead['machine']) or 'not recorded'}), `results/kg_equal_time.json` (KG rows "
        "per budget: test Hits@1 at equal training wall-clock, higher is better, medians over seeds; a dataset's "
        f"rows from its section `<dataset>{HEADLINE_KG_XLA}`, every arm compiled with XLA as on the SBN rows and "
        "scored with its weights at its last turn within the budget (rows \"last turn\" where the dataset also has "
        f"its section `<dataset>{HEADLINE_KG_XLA}{HEADLINE_KG_SELECTED}`, whose rows \"best dev checkpoint\" come "
        "first: the same flags, each arm scored at its checkpoint with the best dev Hits@1, MINERVA's protocol); the "
        f"rows \"{HEADLINE_KG_NO_XLA.strip()}\" from its section `<dataset>` and, at the longer budgets, "
        f"`<dataset>{HEADLINE_LONG}`, Keras' default on a CPU; the step "
        "ratio: the default's median ms per step over MINERVA's estimator's in the same run) and "
        "`results/kg.json` (KG rows at equal steps: test Hits@1, medians over seeds, every estimator trained "
        "for the same steps; the step ratio: MINERVA's median steps/s over the default's). \"not run\": the "
        "results hold no section for that task.")
    return "\n".join(table) + "\n\n" + note


def headline(results=common.RESULTS):
    """RESULTS.md's headline table from the committed JSON of `results`."""
    reports = []
    for name in ("equal_time", "overhead", "kg"):
        with open(os.path.join(results, name + ".json")) as f:
            reports.append(json.load(f))
    kg_time = os.path.join(results, "kg_equal_time.json")
    if os.path.exists(kg_time):
        with open(kg_time) as f:
            reports.append(json.load(f))
    return headline_table(*reports)


def with_headline(text, table):
    """`text` with what lies between HEADLINE_START and HEADLINE_END replaced by `table`."""
    start, end = text.find(HEADLINE_START), text.find(HEADLINE_END)
    if start < 0 or end < start:
        raise ValueError(f"no {HEADLINE_START} ... {HEADLINE_END} in the page")
    return text[:start + len(HEADLINE_START)] + "\n\n" + table + "\n\n" + text[end:]


def results_page(path=RESULTS_PAGE, results=common.RESULTS):
    """The text of RESULTS.md at `path` with its headline table rendered from `results`."""
    with open(path) as f:
        return with_headline(f.read(), headline(results))


# ----------------------------------------------------------------------------- entry point
LAYOUTS = {
    "bandit": bandit,
    "equal_time": equal_time,
    "kg": kg,
    "kg_equal_time": kg_equal_time,
    "kg_step_stages": kg_step_stages,
    "overhead": overhead,
    "replay": replay,
    "sbn": sbn,
    "sbn_variance": sbn_variance,
    "scaling": scaling,
    "step_stages": step_stages,
    "toy": toy,
    "variance_per_second": variance_per_second,
}


# The layouts whose pages have plots: each maps a report to `{file name:
# draw}`, `draw(plt)` the matplotlib figure of that file, for the plots the
# report names.
FIGURES = {"kg": kg_figures, "sbn": sbn_figures, "toy": toy_figures}


def layout_name(stem):
    """The name of the layout of `<stem>.json`: `stem` if a layout has that
    name, else the longest layout name `stem` starts with followed by `_`;
    None if none."""
    return max((n for n in LAYOUTS if stem == n or stem.startswith(n + "_")), key=len, default=None)


def layout_for(stem):
    """The layout of `<stem>.json` (`layout_name`)."""
    name = layout_name(stem)
    if name is None:
        raise KeyError(f"no page layout for {stem}.json (layouts: {', '.join(LAYOUTS)})")
    return LAYOUTS[name]


def render(json_path):
    """The markdown of the page of `json_path`, from the JSON alone."""
    with open(json_path) as f:
        report = json.load(f)
    return layout_for(os.path.splitext(os.path.basename(json_path))[0])(report).render()


def page(layout, report):
    """The markdown of the page of `report` by the layout named `layout`."""
    return LAYOUTS[layout](report).render()


def plots(layout, report, folder):
    """`{png path: draw}` of the plots `report` names (none where the layout
    named `layout` has no plots), each in `folder`."""
    figures = FIGURES[layout](report) if layout in FIGURES else {}
    return {os.path.join(folder, name): figure for name, figure in figures.items()}


def json_plots(json_path):
    """`plots` of the JSON at `json_path` (none where no layout has its name), next to it."""
    layout = layout_name(os.path.splitext(os.path.basename(json_path))[0])
    if layout not in FIGURES:
        return {}
    with open(json_path) as f:
        return plots(layout, json.load(f), os.path.dirname(json_path))


def draw(figures):
    """Writes each PNG of `figures` (`{png path: draw}`) atomically; draws
    none, and says why, where matplotlib is not installed."""
    if not figures:
        return
    plt = pages.pyplot()
    if plt is None:
        print(f"matplotlib is not installed (the `examples` extra): {len(figures)} plots not drawn",
              file=sys.stderr)
        return
    for path, figure in figures.items():
        pages.write_figure(plt, figure(plt), path)
        print(f"wrote {path}")


def write(layout, report, path):
    """The page of `report` by the layout named `layout`, written atomically to
    `path`, and the plots it names next to it."""
    LAYOUTS[layout](report).write(path)
    draw(plots(layout, report, os.path.dirname(path)))


def committed_pages(results=common.RESULTS):
    """`(json, md)` paths of every page in `results`: each `<name>.md` with a `<name>.json`."""
    names = sorted(n[:-3] for n in os.listdir(results) if n.endswith(".md"))
    return [(os.path.join(results, n + ".json"), os.path.join(results, n + ".md"))
            for n in names if os.path.exists(os.path.join(results, n + ".json"))]


def committed_plots(results=common.RESULTS):
    """`{png path: draw}` of every plot a JSON of `results` names (pages'
    and superseded runs' alike)."""
    figures = {}
    for name in sorted(os.listdir(results)):
        if name.endswith(".json"):
            figures.update(json_plots(os.path.join(results, name)))
    return figures


def stale_plots(figures, results=None):
    """What `--check` reports of the plots: each PNG of `figures` that is
    missing and, given `results`, each PNG there that no JSON names."""
    problems = [f"{path} is missing: run `python benchmarks/render.py`"
                for path in figures if not os.path.exists(path)]
    if results is not None:
        named = {os.path.basename(path) for path in figures}
        problems += [f"{os.path.join(results, n)} is named by no results JSON (render.py's docstring: how a "
                     "JSON names its plots)"
                     for n in sorted(os.listdir(results)) if n.endswith(".png") and n not in named]
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*", help="results JSON files (default: every page and plot of "
                        "benchmarks/results/)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a page differs or a plot is missing or named by no JSON")
    args = parser.parse_args(argv)
    paths = [(p, os.path.splitext(p)[0] + ".md") for p in args.json] or committed_pages()
    outputs = [(md_path, render(json_path)) for json_path, md_path in paths]
    if args.json:
        figures = {path: figure for p in args.json for path, figure in json_plots(p).items()}
    else:
        outputs.append((RESULTS_PAGE, results_page()))
        figures = committed_plots()
    stale = []
    for md_path, text in outputs:
        if args.check:
            with open(md_path) as f:
                if f.read() != text:
                    stale.append(f"{md_path} differs from what the results JSON renders")
        else:
            common.write_atomically(md_path, text)
            print(f"wrote {md_path}")
    if args.check:
        stale += stale_plots(figures, None if args.json else common.RESULTS)
    else:
        draw(figures)
    for problem in stale:
        print(problem, file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
