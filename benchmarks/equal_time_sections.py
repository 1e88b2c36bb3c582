"""The sections of equal_time.json and kg_equal_time.json: the summary of a
run's seeds, and a section extended by a later run's seeds (`equal_time.py
--extend`, `kg_equal_time.py --extend`).

No TensorFlow: the tests import it beside the page renderer.
"""

import re
import statistics
import typing

import common

CRITIC_FREE = ("rloo", "disarm", "reinforce")
# What two runs of a section must share: equal_time.json's, kg_equal_time.json's.
SAME = ("budgets", "chunk_steps", "jit")
KG_SAME = ("budgets", "chunk_steps", "settings")


class KGArm(typing.NamedTuple):
    """An arm of kg_equal_time.py or kg_profile_step.py,
    `<estimator>[+replay_<correction>][+critic_<dim>x<hidden>][+critic_every_<k>]`:
    the estimator's flag value, the replay correction ("" for no replay), the
    critics' `(dim, hidden)` (None: the `--critic_dim` / `--critic_hidden`
    flags') and their `compile(critic_update_period=k)` (1: every step)."""

    estimator: str
    replay: str
    critic_size: typing.Optional[typing.Tuple[int, int]]
    critic_every: int = 1

    def agent_options(self):
        """`kg_reasoning.agent_from_flags`' keywords for the arm's critics (its
        replay is the caller's: it reads the caller's flags)."""
        options = {} if self.critic_every == 1 else {"critic_update_period": self.critic_every}
        if self.critic_size:
            options.update(critic_dim=self.critic_size[0], critic_hidden=self.critic_size[1])
        return options


_KG_ARM = re.compile(
    r"(?P<estimator>.+?)(\+replay_(?P<replay>[a-z_]+?))?(\+critic_(?P<dim>\d+)x(?P<hidden>\d+))?"
    r"(\+critic_every_(?P<every>\d+))?"
)


def kg_arm(name):
    """The `KGArm` an arm's name spells."""
    match = _KG_ARM.fullmatch(name)
    size = (int(match["dim"]), int(match["hidden"])) if match["dim"] else None
    return KGArm(match["estimator"], match["replay"] or "", size, int(match["every"] or 1))


def summary(runs, budgets):
    """equal_time.json: per budget, each arm's median test -ELBO, the best
    critic-free arm, and the winner."""
    rows = []
    for b in budgets:
        values = {name: common.median([r[name]["at_budget"][b] for r in runs]) for name in runs[0]}
        free = {n: v for n, v in values.items() if n in CRITIC_FREE and v is not None}
        best_free = min(free, key=free.get) if free else None
        known = {n: v for n, v in values.items() if v is not None}
        rows.append({"budget": b, "values": values, "best_critic_free": best_free,
                     "winner": min(known, key=known.get) if known else None})
    return rows


def selected_on_valid(checkpoints):
    """The checkpoint MINERVA's protocol keeps: of `checkpoints` (each
    `{"valid": metrics, "test": metrics}`, in training order), the one with the
    best valid Hits@1, the earliest of those tied."""
    return max(checkpoints, key=lambda c: c["valid"]["hits@1"])


def checkpoint_spans(result, budgets):
    """How an arm's checkpoints (`kg_equal_time.py --select_every`) score
    between budgets: for each budget after the first, of the checkpoints
    after the last turn within the budget before and up to the last turn within
    this one, `{"span": (before, budget), "checkpoints": n, "mean_test": the
    mean of their test Hits@1, "sd_valid": the standard deviation of their
    valid Hits@1}` (None for a span with no checkpoint). `result` is one arm's
    entry of one run (its `at_budget_last` and `checkpoints`, in training
    order). The mean is the Hits@1 expected of a checkpoint taken at a random
    time of the span, whichever protocol picks it; the deviation, how much
    picking one by the dev split is a draw."""
    spans = []
    for before, budget in zip(budgets, budgets[1:]):
        first, last = (result["at_budget_last"][b]["step"] for b in (before, budget))
        points = [c for c in result["checkpoints"] if first < c["step"] <= last]
        spans.append({
            "span": (before, budget), "checkpoints": len(points),
            "mean_test": statistics.fmean(c["test_hits@1"] for c in points) if points else None,
            "sd_valid": statistics.pstdev(c["valid_hits@1"] for c in points) if points else None,
        })
    return spans


def selected_at_equal_steps(run, budget, reference="auto"):
    """Each arm's checkpoint MINERVA's protocol keeps when it may train no more
    steps than `reference` did: of one run's arms (`run`, `kg_equal_time.py
    --select_every`), `{arm: the checkpoint with the best valid Hits@1 of those
    at or before the step of reference's last turn within budget}` (the
    earliest of those tied; each `{"step", "valid_hits@1", "test_hits@1"}`).
    An arm whose checkpoints all come later maps to None. Checkpoints fall
    every `--select_every` seconds, so another arm's kept checkpoint may lie up
    to one interval's steps short of the reference's."""
    steps = run[reference]["at_budget_last"][budget]["step"]
    kept = {}
    for arm, result in run.items():
        points = [c for c in result["checkpoints"] if c["step"] <= steps]
        kept[arm] = max(points, key=lambda c: c["valid_hits@1"]) if points else None
    return kept


def kg_summary(runs, budgets):
    """kg_equal_time.json: per budget, each arm's median test Hits@1, the best
    critic-free arm (one whose estimator is not the default, with or without
    replay, whatever its critics' size: `kg_arm`) and the winner (ties go to
    the default)."""
    rows = []
    for budget in budgets:
        values = {name: common.median([r[name]["at_budget"][budget]["hits@1"] for r in runs]) for name in runs[0]}
        free = {n: v for n, v in values.items() if kg_arm(n).estimator != "auto"}
        best_free = max(free, key=free.get) if free else None
        winner = max(values, key=lambda n: (values[n], n == "auto"))
        rows.append({"budget": budget, "hits@1": values, "best_critic_free": best_free, "winner": winner})
    return rows


def section_runs(entry):
    """[(machine info, load average at the end)] of each run a section holds:
    one (the machine and the section's `load_end`), or several where `--extend`
    added seeds (each machine then carries its own `load_average_at_end`)."""
    if "load_end" in entry:
        return [(machine, entry["load_end"]) for machine in common.listed(entry["machine"])]
    return [(machine, machine["load_average_at_end"]) for machine in entry["machine"]]


def extended(old, new, summarize=summary, same=SAME):
    """The section `old` with the seeds of the section `new` (one run of the
    script) added: runs and seeds appended, commands and machines listed (each
    machine with its own end-of-run load), the summary over all the seeds
    (`summarize(runs, budgets)`: `summary`, or `kg_summary` for
    kg_equal_time.json). Raises ValueError where the two runs do not compare
    (other arms, or another value of a key in `same`: `SAME`, or `KG_SAME`
    for kg_equal_time.json) or share a seed."""
    for key in same:
        if old[key] != new[key]:
            raise ValueError(f"--extend: the section has {key}={old[key]!r}, this run {new[key]!r}; pass the same.")
    if list(old["runs"][0]) != list(new["runs"][0]):
        raise ValueError(f"--extend: the section's arms are {list(old['runs'][0])}, this run's "
                         f"{list(new['runs'][0])}; pass the same arms.")
    shared = sorted(set(old["seeds"]) & set(new["seeds"]))
    if shared:
        raise ValueError(f"--extend: seeds {shared} are in the section already; pass other --seeds.")

    def machines(entry):
        return [{**machine, "load_average_at_end": list(end)} for machine, end in section_runs(entry)]

    runs = old["runs"] + new["runs"]
    kept = {key: value for key, value in old.items() if key != "load_end"}
    return {**kept, "command": common.listed(old["command"]) + common.listed(new["command"]),
            "seeds": old["seeds"] + new["seeds"],
            "runs": runs, "summary": summarize(runs, old["budgets"]), "machine": machines(old) + machines(new)}


def extended_in(report, tag, new, path, summarize=summary, same=SAME):
    """`extended` of the section `tag` of `report` (the JSON at `path`) with
    `new`: what a script's `--extend` writes. Raises ValueError where `report`
    has no section `tag`."""
    if tag not in report:
        raise ValueError(f"--extend: {path} has no section {tag!r} to add seeds {new['seeds']} to; run without "
                         "--extend to start it.")
    return extended(report[tag], new, summarize, same)
