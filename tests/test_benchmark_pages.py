"""Every committed benchmark page is what its committed JSON renders.

`benchmarks/render.py` rebuilds each page of `benchmarks/results/` from its
JSON alone; a page that differs holds text or numbers its JSON lacks (a note
written into the page by hand, a figure typed in after the run) or was not
rewritten after its JSON changed. Fast: no TensorFlow, no training.
"""

import difflib
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
PAGES = sorted(p.stem for p in RESULTS.glob("*.md"))


@pytest.fixture(scope="module")
def render():
    """benchmarks/render.py, imported as the scripts import it (their folder first on the path)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import render as module
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


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


def test_a_note_in_the_json_reaches_the_page(render):
    report = json.loads((RESULTS / "kg.json").read_text())
    report["notes"] = ["**A note.** Written into the JSON by hand."]
    assert "* **A note.** Written into the JSON by hand." in render.page("kg", report)


def test_a_page_without_a_layout_is_refused(render):
    with pytest.raises(KeyError, match="no page layout"):
        render.layout_for("unknown")
    assert render.layout_for("overhead_threads1") is render.layout_for("overhead")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
