"""Every committed benchmark page is what its committed JSON renders.

`benchmarks/render.py` rebuilds each page of `benchmarks/results/` from its
JSON alone; a page that differs holds text or numbers its JSON lacks (a note
written into the page by hand, a figure typed in after the run) or was not
rewritten after its JSON changed. The same holds for the headline table of
`benchmarks/RESULTS.md`, rendered from equal_time.json, overhead.json and
kg.json between its markers. The plots too are drawn from the JSON alone:
every PNG of `benchmarks/results/` is one a JSON names, and one plot per
layout that has plots is redrawn (with matplotlib, where installed) at the
committed one's size. Fast: no TensorFlow, no training.
"""

import difflib
import json
import pathlib
import shutil
import struct
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
PAGES = sorted(p.stem for p in RESULTS.glob("*.md"))


@pytest.fixture(scope="module")
def render(benchmark_script):
    """benchmarks/render.py."""
    return benchmark_script("render")


def test_every_page_has_its_json():
    assert PAGES, f"no pages in {RESULTS}"
    missing = [f"{name}.md" for name in PAGES if not (RESULTS / f"{name}.json").exists()]
    assert not missing, f"pages without a results JSON to render them from: {missing}"


def test_the_entry_point_finds_every_page(render):
    assert [pathlib.Path(md).stem for _, md in render.committed_pages(str(RESULTS))] == PAGES


@pytest.mark.parametrize("name", PAGES)
def test_page_is_rendered_from_its_json(render, name):
    committed = (RESULTS / f"{name}.md").read_text()
    rendered = render.render(str(RESULTS / f"{name}.json"))
    diff = "\n".join(difflib.unified_diff(
        committed.splitlines(), rendered.splitlines(), f"{name}.md (committed)", f"{name}.md (rendered)",
        lineterm="", n=1))
    assert rendered == committed, (
        f"benchmarks/results/{name}.md is not what {name}.json renders: put hand-written text into the JSON's "
        f"notes, then run `python benchmarks/render.py benchmarks/results/{name}.json`.\n{diff[:4000]}")


def test_results_headline_is_rendered_from_the_json(render):
    committed = (BENCHMARKS / "RESULTS.md").read_text()
    rendered = render.results_page(str(BENCHMARKS / "RESULTS.md"), str(RESULTS))
    diff = "\n".join(difflib.unified_diff(
        committed.splitlines(), rendered.splitlines(), "RESULTS.md (committed)", "RESULTS.md (rendered)",
        lineterm="", n=1))
    assert rendered == committed, (
        "benchmarks/RESULTS.md's headline table is not what results/equal_time.json, overhead.json and kg.json "
        f"render: run `python benchmarks/render.py`.\n{diff[:4000]}")


def test_a_task_missing_from_equal_time_renders_as_not_run(render):
    machine = {"commit": "abc1234", "load_average": [1.0, 1.0, 1.0]}
    arm = {"ms_per_step": 2.0, "compile_seconds": 1.0}
    equal_time = {"fashion_mnist_linear": {
        "runs": [{"auto": {**arm, "ms_per_step": 3.0}, "disarm": arm, "rloo": arm, "reinforce": arm}],
        "summary": [{"budget": "60", "values": {"auto": 250.0, "disarm": 251.0, "rloo": 252.0, "reinforce": 260.0},
                     "best_critic_free": "disarm", "winner": "auto"}],
        "machine": machine, "load_end": [2.0, 2.0, 2.0]}}
    table = render.headline_table(equal_time, {"machine": machine, "results": []}, {"machine": [], "runs": []})
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["Fashion-MNIST linear 784-200"].startswith(
        "| Fashion-MNIST linear 784-200 | 60 s | **250.00** | 251.00 (`disarm`) | default | 1.50x |")
    assert "abc1234, load 1.0-2.0" in rows["Fashion-MNIST linear 784-200"]
    for task in ("Fashion-MNIST two-layer", "Fashion-MNIST nonlinear", "digits two-layer", "KG UMLS", "KG Kinship"):
        assert rows[task].startswith(f"| {task} | not run |"), rows[task]


def test_a_tasks_long_budget_section_renders_under_the_task(render):
    machine = {"commit": "abc1234", "load_average": [1.0, 1.0, 1.0]}
    arm = {"ms_per_step": 2.0, "compile_seconds": 1.0}

    def section(budget, values, winner, commit):
        arms = {name: {**arm, "ms_per_step": 3.0 if name == "auto" else 2.0} for name in values}
        return {"runs": [arms], "machine": {**machine, "commit": commit}, "load_end": [2.0, 2.0, 2.0],
                "summary": [{"budget": budget, "values": values, "best_critic_free": "disarm", "winner": winner}]}

    equal_time = {
        "fashion_mnist_linear": section(
            "60", {"auto": 250.0, "disarm": 251.0, "rloo": 252.0, "reinforce": 260.0}, "auto", "abc1234"),
        "fashion_mnist_linear" + render.HEADLINE_LONG: section(
            "600", {"auto": 241.0, "disarm": 240.0, "rloo": 242.0}, "disarm", "def5678"),
    }
    table = render.headline_table(equal_time, {"machine": machine, "results": []}, {"machine": [], "runs": []})
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    task = next(i for i, line in enumerate(lines) if line.startswith("| Fashion-MNIST linear 784-200 |"))
    assert lines[task].startswith(
        "| Fashion-MNIST linear 784-200 | 60 s | **250.00** | 251.00 (`disarm`) | default | 1.50x |")
    # The long run trained no reinforce arm: no step ratio; its own commit.
    assert lines[task + 1].startswith("|  | 600 s | 241.00 | **240.00** (`disarm`) | `disarm` |  |  | def5678, load ")
    assert lines[task + 2].startswith("| Fashion-MNIST two-layer | not run |")


def test_the_headline_replaces_only_what_lies_between_its_markers(render):
    page = f"prose\n\n{render.HEADLINE_START}\n\nold table\n\n{render.HEADLINE_END}\n\nmore prose\n"
    assert render.with_headline(page, "new table") == (
        f"prose\n\n{render.HEADLINE_START}\n\nnew table\n\n{render.HEADLINE_END}\n\nmore prose\n")
    with pytest.raises(ValueError, match="headline table"):
        render.with_headline("prose without markers\n", "new table")


def test_a_note_in_the_json_reaches_the_page(render):
    report = json.loads((RESULTS / "kg.json").read_text())
    report["notes"] = ["**A note.** Written into the JSON by hand."]
    assert "* **A note.** Written into the JSON by hand." in render.page("kg", report)


def test_a_page_without_a_layout_is_refused(render):
    with pytest.raises(KeyError, match="no page layout"):
        render.layout_for("unknown")
    assert render.layout_for("overhead_threads1") is render.layout_for("overhead")


def test_every_plot_is_named_by_a_json_and_committed(render):
    figures = render.committed_plots(str(RESULTS))
    assert figures, f"no plots named by the JSON of {RESULTS}"
    assert render.stale_plots(figures, str(RESULTS)) == []


def png_size(data):
    """`(width, height)` of a PNG's bytes, from its IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def one_plot(name):
    """`(layout, report)`: a report of `<name>.json` that names one of its committed plots."""
    report = json.loads((RESULTS / f"{name}.json").read_text())
    if name == "sbn":
        return "sbn", {"fashion_mnist_two_layer_units_xla": report["fashion_mnist_two_layer_units_xla"]}
    if name == "toy":
        return "toy", {**report, "plots": report["plots"][:1]}
    return "kg", report


@pytest.mark.parametrize("name", ["kg_ablation", "sbn", "toy"])
def test_a_plot_is_drawn_from_its_json(render, tmp_path, name):
    pytest.importorskip("matplotlib")
    layout, report = one_plot(name)
    figures = render.plots(layout, report, str(tmp_path))
    assert len(figures) == 1
    render.draw(figures)
    drawn = pathlib.Path(next(iter(figures)))
    assert png_size(drawn.read_bytes()) == png_size((RESULTS / drawn.name).read_bytes())


def test_the_renderer_draws_no_plot_without_matplotlib(render, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    render.draw(render.plots(*one_plot("kg_ablation"), str(tmp_path)))
    assert not list(tmp_path.iterdir())
    assert "matplotlib is not installed" in capsys.readouterr().err



def test_the_kg_rows_show_equal_wall_clock_before_equal_steps(render):
    machine = {"commit": "abc1234", "load_average": [1.0, 1.0, 1.0]}
    arm = {"ms_per_step": 10.0, "compile_seconds": 1.0, "steps": 100, "at_budget": {}}
    kg_time = {"umls": {
        "runs": [{"minerva": arm, "rloo": arm, "auto": {**arm, "ms_per_step": 15.0}}],
        "summary": [{"budget": "60", "hits@1": {"minerva": 0.40, "rloo": 0.45, "auto": 0.50},
                     "best_critic_free": "rloo", "winner": "auto"},
                    {"budget": "180", "hits@1": {"minerva": 0.60, "rloo": 0.55, "auto": 0.58},
                     "best_critic_free": "minerva", "winner": "minerva"}],
        "machine": machine, "load_end": [2.0, 2.0, 2.0]}}
    table = render.headline_table({}, {"machine": machine, "results": []}, {"machine": [], "runs": []}, kg_time)
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    start = next(i for i, line in enumerate(lines) if line.startswith("| KG UMLS |"))
    assert lines[start].startswith(
        "| KG UMLS | 60 s | Hits@1 **0.500** | 0.450 (`rloo`; MINERVA's estimator 0.400) | default | 1.50x MINERVA's step |")
    assert lines[start + 1].startswith(
        "|  | 180 s | Hits@1 0.580 | **0.600** (MINERVA's estimator; `rloo` 0.550) | MINERVA's estimator |")
    assert lines[start + 2].startswith("| KG Kinship | not run |"), "no equal-steps row without kg.json runs"

    # A section `umls_long_xla` (every arm under XLA, as the SBN rows) gives the
    # dataset's rows, first; the runs without XLA follow under their own label.
    kg_time["umls_long_xla"] = {**kg_time["umls"], "summary": kg_time["umls"]["summary"][1:]}
    table = render.headline_table({}, {"machine": machine, "results": []}, {"machine": [], "runs": []}, kg_time)
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    start = next(i for i, line in enumerate(lines) if line.startswith("| KG UMLS |"))
    assert lines[start].startswith(
        "| KG UMLS | 180 s | Hits@1 0.580 | **0.600** (MINERVA's estimator; `rloo` 0.550) | MINERVA's estimator |")
    assert lines[start + 1].startswith("| KG UMLS without XLA | 60 s | Hits@1 **0.500** |")
    assert lines[start + 2].startswith("|  | 180 s | Hits@1 0.580 |")
    assert lines[start + 3].startswith("| KG Kinship | not run |")

    # A section `umls_long_xla_selected` (the same flags scored at each arm's best
    # dev checkpoint) comes first; the XLA rows scored at the last turn follow.
    kg_time["umls_long_xla_selected"] = {**kg_time["umls"], "summary": kg_time["umls"]["summary"][:1]}
    table = render.headline_table({}, {"machine": machine, "results": []}, {"machine": [], "runs": []}, kg_time)
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    start = next(i for i, line in enumerate(lines) if line.startswith("| KG UMLS, best dev checkpoint |"))
    assert lines[start].startswith("| KG UMLS, best dev checkpoint | 60 s | Hits@1 **0.500** |")
    assert lines[start + 1].startswith("| KG UMLS, last turn | 180 s | Hits@1 0.580 |")
    assert lines[start + 2].startswith("| KG UMLS without XLA | 60 s |")
    assert lines[start + 4].startswith("| KG Kinship | not run |")


def test_every_benchmark_imports_common_before_keras_bpq():
    """Importing `common` puts the benchmark's own checkout first on
    `sys.path`: a script that imported keras_bpq before it would time an
    installed (editable) keras_bpq of another checkout, under this one's commit."""
    late = []
    for path in sorted(BENCHMARKS.glob("*.py")):
        lines = path.read_text().splitlines()
        first = lambda test: next((i for i, line in enumerate(lines) if test(line)), None)  # noqa: E731
        bpq = first(lambda line: line.startswith(("import keras_bpq", "from keras_bpq")))
        if bpq is not None and path.name != "common.py":
            common_at = first(lambda line: line.startswith("import common"))
            if common_at is None or common_at > bpq:
                late.append(path.name)
    assert not late, f"import common before keras_bpq in {late}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
