"""MkDocs hook: publishes the benchmark pages and plots of `benchmarks/results/`
under `benchmarks/` in the site, from the files the benchmarks wrote (so the
documentation never holds a second, possibly stale, copy of a measurement)."""

import pathlib

from mkdocs.structure.files import File

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def on_files(files, config):
    for path in sorted(RESULTS.glob("*.md")) + sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"benchmarks/{path.name}", abs_src_path=str(path)))
    return files
