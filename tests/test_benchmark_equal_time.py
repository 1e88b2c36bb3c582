"""`benchmarks/equal_time.py --extend` and `kg_equal_time.py --extend`
(`equal_time_sections.extended`): seeds of a later run added to a section.

A 10-minute comparison of 3 seeds takes hours; `--extend` lets it be made in
more than one run and keeps what each run was (command, machine, load) on the
pages. Fake sections, no training, no TensorFlow.
"""

import pytest


@pytest.fixture(scope="module")
def scripts(benchmark_script):
    """benchmarks/equal_time_sections.py and render.py."""
    return benchmark_script("equal_time_sections"), benchmark_script("render")


def section(seeds, auto, disarm, commit, start, end, budgets=("600",)):
    """An equal_time.json section as one run of the script writes it."""
    arm = {"ms_per_step": 2.0, "compile_seconds": 1.0, "curve": [{"step": 1000}]}
    runs = [{"auto": {**arm, "at_budget": {b: a for b in budgets}},
             "disarm": {**arm, "at_budget": {b: d for b in budgets}}} for a, d in zip(auto, disarm)]
    return {"command": f"equal_time.py --seeds={','.join(map(str, seeds))}", "seeds": list(seeds),
            "budgets": list(budgets), "chunk_steps": 250, "jit": True, "runs": runs, "summary": None,
            "machine": {"commit": commit, "load_average": [start, start, start]}, "load_end": [end, end, end]}


def test_extend_adds_the_seeds_and_takes_the_summary_over_all(scripts):
    equal_time, render = scripts
    first = section([0], [251.0], [252.0], "abc1234", 2.5, 4.0)
    later = section([1, 2], [250.0, 249.0], [248.0, 247.0], "def5678", 1.0, 1.5)
    merged = equal_time.extended(first, later)
    assert merged["seeds"] == [0, 1, 2]
    assert merged["command"] == ["equal_time.py --seeds=0", "equal_time.py --seeds=1,2"]
    assert [m["load_average_at_end"] for m in merged["machine"]] == [[4.0] * 3, [1.5] * 3]
    assert "load_end" not in merged
    # Medians of 3 seeds: auto 250 (251, 250, 249), disarm 248 (252, 248, 247).
    assert merged["summary"] == [{"budget": "600", "values": {"auto": 250.0, "disarm": 248.0},
                                  "best_critic_free": "disarm", "winner": "disarm"}]
    # A third run extends the extended section.
    again = equal_time.extended(merged, section([3], [240.0], [250.0], "def5678", 1.0, 1.0))
    assert again["seeds"] == [0, 1, 2, 3] and len(again["command"]) == 3 and len(again["machine"]) == 3

    # Its pages: both commands, both machines; the headline's row names both commits and every load.
    page = render.page("equal_time", {"fashion_mnist_linear_long": merged})
    assert "equal_time.py --seeds=0\nequal_time.py --seeds=1,2" in page
    assert "abc1234" in page and "def5678" in page
    rows = render.headline_sbn_rows("fashion_mnist_linear", "", merged, None)
    assert rows[0][1:5] == ["600 s", "250.00", "**248.00** (`disarm`)", "`disarm`"]
    assert rows[0][-1] == "abc1234, def5678, load 1.0-4.0"


@pytest.mark.parametrize("change, message", [
    ({"budgets": ["60"]}, "budgets"),
    ({"jit": False}, "jit"),
    ({"seeds": [0]}, r"seeds \[0\] are in the section"),
])
def test_extend_refuses_runs_that_do_not_compare(scripts, change, message):
    equal_time, _ = scripts
    first = section([0], [251.0], [252.0], "abc1234", 1.0, 1.0)
    later = {**section([1], [250.0], [248.0], "abc1234", 1.0, 1.0), **change}
    with pytest.raises(ValueError, match=message):
        equal_time.extended(first, later)


def test_extend_refuses_other_arms(scripts):
    equal_time, _ = scripts
    first = section([0], [251.0], [252.0], "abc1234", 1.0, 1.0)
    later = section([1], [250.0], [248.0], "abc1234", 1.0, 1.0)
    later["runs"] = [{"auto": later["runs"][0]["auto"]}]
    with pytest.raises(ValueError, match="arms"):
        equal_time.extended(first, later)


def kg_section(seeds, auto, minerva, commit, budgets=("60", "180", "600"), settings=None):
    """A kg_equal_time.json section as one run of the script writes it (Hits@1
    `auto` / `minerva` per seed, the same at every budget)."""
    def arm(hits):
        return {"ms_per_step": 300.0, "compile_seconds": 10.0, "steps": 1000,
                "at_budget": {b: {"step": 100, "hits@1": hits, "hits@3": hits, "hits@10": hits, "mrr": hits}
                              for b in budgets}}
    return {"command": f"kg_equal_time.py --seeds={','.join(map(str, seeds))}", "seeds": list(seeds),
            "budgets": list(budgets), "chunk_steps": 50, "settings": settings or {"dim": 64},
            "runs": [{"minerva": arm(m), "auto": arm(a)} for a, m in zip(auto, minerva)], "summary": None,
            "machine": {"commit": commit, "load_average": [2.0] * 3}, "load_end": [3.0] * 3}


def test_kg_extend_and_the_headline_reads_the_long_section(scripts):
    sections, render = scripts
    first = kg_section([0], [0.70], [0.60], "abc1234")
    later = kg_section([1, 2], [0.50, 0.65], [0.55, 0.66], "def5678")
    merged = sections.extended_in({"umls_long": first}, "umls_long", later, "kg_equal_time.json",
                                  sections.kg_summary, sections.KG_SAME)
    assert merged["seeds"] == [0, 1, 2]
    # Medians of 3 seeds: auto 0.65 (0.70, 0.50, 0.65), minerva 0.60 (0.60, 0.55, 0.66).
    assert merged["summary"][-1] == {"budget": "600", "hits@1": {"minerva": 0.60, "auto": 0.65},
                                     "best_critic_free": "minerva", "winner": "auto"}
    with pytest.raises(ValueError, match="settings"):
        sections.extended(first, kg_section([3], [0.5], [0.5], "abc1234", settings={"dim": 32}),
                          sections.kg_summary, sections.KG_SAME)
    with pytest.raises(ValueError, match="has no section 'kinship_long' to add seeds \\[1, 2\\]"):
        sections.extended_in({"umls_long": first}, "kinship_long", later, "kg_equal_time.json",
                             sections.kg_summary, sections.KG_SAME)
    assert "abc1234" in render.page("kg_equal_time", {"umls_long": merged})

    # The headline: the 3-seed section's budgets, then the long section's other budgets only.
    base = kg_section([0], [0.30], [0.40], "0000aaa", budgets=("60", "180"))
    base["summary"] = sections.kg_summary(base["runs"], base["budgets"])
    rows = render.headline_kg_time_rows(base, "KG UMLS") + render.headline_kg_time_rows(
        merged, "", {"60", "180"})
    assert [r[1] for r in rows] == ["60 s", "180 s", "600 s"]
    assert rows[2][2:5] == ["Hits@1 **0.650**", "0.600 (MINERVA's estimator)", "default"]
    assert rows[2][-1] == "abc1234, def5678, load 2.0 at the start, 3.0 at the end"


def test_kg_arm_names_and_a_default_with_other_critics(scripts):
    sections, render = scripts
    assert sections.kg_arm("auto") == ("auto", "", None, 1)
    assert sections.kg_arm("auto+replay_retrace+critic_32x64") == ("auto", "retrace", (32, 64), 1)
    assert sections.kg_arm("rloo+critic_16x32") == ("rloo", "", (16, 32), 1)
    assert sections.kg_arm("hop_1=critic_cv+hop_2=minerva") == ("hop_1=critic_cv+hop_2=minerva", "", None, 1)
    assert sections.kg_arm("auto+critic_every_4") == ("auto", "", None, 4)
    assert sections.kg_arm("auto+critic_32x64+critic_every_2").agent_options() == {
        "critic_update_period": 2, "critic_dim": 32, "critic_hidden": 64}
    assert sections.kg_arm("auto").agent_options() == {}

    # An arm of the default with other critics is not critic-free; the headline weighs the
    # default against the critic-free arms only, even where that other arm scored best.
    entry = kg_section([0], [0.60], [0.55], "abc1234", budgets=("60",))
    entry["runs"][0]["auto+critic_32x64"] = {**entry["runs"][0]["auto"], "at_budget": {
        "60": {**entry["runs"][0]["auto"]["at_budget"]["60"], "hits@1": 0.70}}}
    entry["summary"] = sections.kg_summary(entry["runs"], entry["budgets"])
    assert entry["summary"][0]["best_critic_free"] == "minerva"
    assert entry["summary"][0]["winner"] == "auto+critic_32x64"
    row = render.headline_kg_time_rows(entry, "KG UMLS")[0]
    assert row[2:5] == ["Hits@1 **0.600**", "0.550 (MINERVA's estimator)", "default"]


def test_kg_selection_on_valid_keeps_the_best_checkpoint_and_the_page_shows_the_last(scripts):
    """`kg_equal_time.py --select_every`: a budget's score is the test metrics of
    the checkpoint with the best valid Hits@1 (the earliest of those tied, as
    MINERVA keeps the first best dev model), and the page says so and shows the
    last turn's test Hits@1 beside it."""
    sections, render = scripts

    def point(step, valid, test):
        return {"valid": {"step": step, "hits@1": valid}, "test": {"step": step, "hits@1": test}}

    checkpoints = [point(100, 0.50, 0.45), point(200, 0.70, 0.60), point(300, 0.70, 0.66), point(400, 0.65, 0.68)]
    assert sections.selected_on_valid(checkpoints) is checkpoints[1]
    assert sections.selected_on_valid(checkpoints[2:]) is checkpoints[2]

    entry = kg_section([0], [0.60], [0.55], "abc1234", budgets=("600",), settings={"dim": 64, "select_every": 30})
    for arm, last in (("auto", 0.58), ("minerva", 0.41)):
        entry["runs"][0][arm]["at_budget_last"] = {"600": {"step": 500, "hits@1": last}}
        entry["runs"][0][arm]["checkpoints"] = [{"step": 500, "valid_hits@1": 0.5, "test_hits@1": last}]
    entry["summary"] = sections.kg_summary(entry["runs"], entry["budgets"])
    page = render.page("kg_equal_time", {"umls_long_xla_selected": entry})
    assert "with the best valid Hits@1 (`--select_every`)" in page
    assert "| 600 s | minerva | 100 | 0.550 | 0.550 | 0.550 | 0.550 | 0.410 |" in page


def test_kg_checkpoint_spans_split_checkpoints_at_the_budgets_last_turns(scripts):
    """`equal_time_sections.checkpoint_spans`: the checkpoints after the last
    turn within one budget and up to the last within the next, their mean test
    Hits@1 and the deviation of their valid Hits@1; the page shows the medians
    over seeds for a `--select_every` section."""
    sections, render = scripts

    def result(points):
        return {"at_budget_last": {b: {"step": s, "hits@1": 0.5} for b, s in (("60", 200), ("180", 400), ("600", 900))},
                "checkpoints": [{"step": s, "valid_hits@1": v, "test_hits@1": t} for s, v, t in points]}

    auto = result([(100, 0.1, 0.1), (200, 0.5, 0.4), (300, 0.6, 0.5), (400, 0.8, 0.7), (700, 0.7, 0.6)])
    spans = sections.checkpoint_spans(auto, ("60", "180", "600"))
    assert [s["span"] for s in spans] == [("60", "180"), ("180", "600")]
    assert [s["checkpoints"] for s in spans] == [2, 1]
    assert spans[0]["mean_test"] == pytest.approx(0.6) and spans[0]["sd_valid"] == pytest.approx(0.1)
    assert spans[1]["mean_test"] == pytest.approx(0.6) and spans[1]["sd_valid"] == 0.0
    empty = sections.checkpoint_spans(result([(100, 0.1, 0.1)]), ("60", "180"))
    assert empty == [{"span": ("60", "180"), "checkpoints": 0, "mean_test": None, "sd_valid": None}]

    entry = kg_section([0, 1], [0.60, 0.62], [0.55, 0.57], "abc1234", budgets=("60", "180", "600"),
                       settings={"dim": 64, "select_every": 30})
    for seed, run in enumerate(entry["runs"]):
        for arm in run:
            run[arm].update(auto if arm == "auto" or seed == 0 else
                            result([(300, 0.4, 0.3), (400, 0.4, 0.5), (800, 0.5, 0.4)]))
    entry["summary"] = sections.kg_summary(entry["runs"], entry["budgets"])
    page = render.page("kg_equal_time", {"umls_long_xla_selected": entry})
    assert "| 60-180 s | auto | 2 | 0.600 | 0.100 |" in page
    assert "| 60-180 s | minerva | 2 | 0.500 | 0.050 |" in page  # medians of 0.6 / 0.4 and 0.1 / 0.0
    assert "| 180-600 s | minerva | 1 | 0.500 | 0.000 |" in page


def test_kg_selected_at_equal_steps_keeps_checkpoints_within_the_defaults_steps(scripts):
    """`equal_time_sections.selected_at_equal_steps`: every arm's best dev
    checkpoint of those at or before the default's last turn within the
    budget; the page shows the medians and the seeds the default holds."""
    sections, render = scripts

    def result(last_steps, points):
        return {"at_budget_last": {b: {"step": s, "hits@1": 0.5} for b, s in zip(("60", "600"), last_steps)},
                "checkpoints": [{"step": s, "valid_hits@1": v, "test_hits@1": t} for s, v, t in points]}

    run = {"auto": result((200, 600), [(200, 0.5, 0.45), (400, 0.7, 0.65), (600, 0.6, 0.7)]),
           "rloo": result((300, 900), [(300, 0.4, 0.4), (500, 0.8, 0.6), (700, 0.9, 0.9), (900, 0.9, 0.8)])}
    kept = sections.selected_at_equal_steps(run, "600")
    assert kept["auto"]["step"] == 400 and kept["rloo"]["step"] == 500  # not rloo's better one at 700
    assert sections.selected_at_equal_steps(run, "60")["rloo"] is None  # its first checkpoint comes later

    entry = kg_section([0, 1], [0.6, 0.6], [0.5, 0.5], "abc1234", budgets=("60", "600"),
                       settings={"dim": 64, "select_every": 30})
    later = result((200, 600), [(300, 0.4, 0.3), (600, 0.9, 0.75)])  # seed 1: ahead of the default's 0.65
    for seed, per_arm in enumerate(entry["runs"]):
        per_arm["auto"].update(run["auto"])
        per_arm["minerva"].update(run["rloo"] if seed == 0 else later)
    entry["summary"] = sections.kg_summary(entry["runs"], entry["budgets"])
    page = render.page("kg_equal_time", {"umls_long_xla_selected": entry})
    assert "| 600 s | 600 | minerva | 550 | 0.675 | 1 of 2 |" in page  # medians of 500 / 600 and 0.6 / 0.75
    assert "| 600 s | 600 | auto | 400 | 0.650 | - |" in page
    assert "| 60 s | 200 | minerva | - | - | 0 of 0 |" in page
