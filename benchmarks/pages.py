"""The one renderer of the benchmark pages: a page is a title, then blocks one
blank line apart (free text, the exact command, the machine, notes, tables with
their number formats, images), written atomically; its plots are PNGs drawn
with matplotlib, written atomically too.

Every benchmark's page and plots are built from its results JSON alone by a
layout in `render.py`; this module knows nothing of any benchmark. It imports
neither TensorFlow nor the package, so a page renders in a fraction of a
second; matplotlib (the `examples` extra) is imported only to draw a plot.
"""

import math
import os

import common

# How `machine_line` names the packages of `common.machine_info()` (`tfp`: an
# older run's `tensorflow_probability`).
PACKAGES = {
    "tensorflow": "TensorFlow",
    "keras": "Keras",
    "tfp": "TFP",
    "keras_bpq": "keras_bpq",
    "torch": "torch",
    "pyro": "Pyro",
    "storchastic": "Storchastic",
}
DEFAULT_PACKAGES = ("tensorflow", "keras", "tfp", "keras_bpq")


def number(value, spec="", absent=""):
    """`value` formatted by `spec` (a `format` spec or a function of the value);
    `absent` for None, NaN and infinity; strings pass unchanged."""
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return absent
    return spec(value) if callable(spec) else format(value, spec)


def numbers(values, spec="", sep=", "):
    """`values` formatted by `spec`, joined by `sep`."""
    return sep.join(number(v, spec) for v in values)


def load_text(load):
    """A 1/5/15-minute load average, to 2 decimals: `3.63, 2.05, 1.90`."""
    return numbers(load, ".2f")


def table(header, rows, align=None, formats=None, absent=""):
    """Markdown table lines. `align`: a letter per column, `l` (the default) or
    `r`; `formats`: a `number` spec per column (None: the cell as it is);
    `absent`: the text of a missing number."""
    align = align or "l" * len(header)
    formats = formats or [None] * len(header)
    if not len(align) == len(formats) == len(header):
        raise ValueError(f"table: {len(header)} columns, {len(align)} alignments, {len(formats)} formats")
    lines = ["| " + " | ".join(header) + " |", "|" + "".join("---:|" if a == "r" else "---|" for a in align)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"table row {row!r} has {len(row)} cells for {len(header)} columns")
        lines.append("| " + " | ".join(number(c, f or "", absent) for c, f in zip(row, formats)) + " |")
    return lines


def start_load(info):
    """The 1/5/15-minute load average a run recorded at its start (`common.machine_info()`'s
    key, or an older run's), or None."""
    return info.get("load_average") or info.get("load_average_at_start")


def commit_text(info):
    """The commit a run recorded, as its pages show it (a full hash cut to 10
    characters, with what follows it; "keras_bpq modified" where the run says
    so), or None."""
    commit = info.get("commit") or info.get("git_commit")
    if commit and commit == info.get("git_commit"):
        commit = commit[:10] + commit[40:]  # a full hash, and what follows it
    if commit and info.get("keras_bpq_dirty") and "modified" not in commit:
        commit += " (keras_bpq modified)"
    return commit


def machine_line(info, packages=DEFAULT_PACKAGES, load_end=None):
    """`Machine: ...`: CPU, cores, GPUs, platform, Python, the load average at the
    start (and at the end: `load_end`, else the info's own), the versions of
    `packages` and the commit, of whichever keys `info` (`common.machine_info()`,
    or the subset an older run recorded) holds."""
    cpu = info.get("cpu") or info.get("cpu_model") or info.get("processor") or "unknown CPU"
    cores = info.get("cores") or info.get("cpu_count")
    hardware = [cpu] + ([f"{cores} cores"] if cores else [])
    if info.get("gpus") is not None:
        hardware.append(f"{info['gpus']} GPUs" if info["gpus"] else "no GPU")
    if info.get("platform"):
        hardware.append(info["platform"])
    if info.get("python"):
        hardware.append(f"Python {info['python']}")
    parts = [", ".join(hardware)]
    start = start_load(info)
    end = load_end or info.get("load_average_at_end") or info.get("load_average_end")
    if start or end:
        load = [f"{load_text(v)} at the {when}" for v, when in ((start, "start"), (end, "end")) if v]
        parts.append("1/5/15-min load average " + " and ".join(load))
    versions = [(PACKAGES[key], info.get(key) or (key == "tfp" and info.get("tensorflow_probability")))
                for key in packages]
    if any(version for _, version in versions):
        parts.append(", ".join(f"{name} {version}" for name, version in versions if version))
    commit = commit_text(info)
    if commit:
        parts.append(f"commit {commit}")
    return "Machine: " + "; ".join(parts) + "."


class Page:
    """A results page: `Page(title)`, then its blocks in order; `render()` is
    the markdown, `write(path)` writes it atomically."""

    def __init__(self, title, level=1):
        self.blocks = []
        self.heading(title, level)

    def block(self, lines):
        """Markdown lines as one block (nothing for an empty one)."""
        lines = [lines] if isinstance(lines, str) else list(lines)
        if lines:
            self.blocks.append(lines)
        return self

    def heading(self, text, level=2):
        return self.block("#" * level + " " + text)

    def text(self, *paragraphs):
        """Free text: each paragraph a block (empty ones skipped)."""
        for paragraph in paragraphs:
            if paragraph:
                self.block(paragraph)
        return self

    def bullets(self, items, lead=None):
        """A bulleted list (`lead`: a line before it, e.g. "Reading:")."""
        if items:
            if lead:
                self.block(lead)
            self.block([f"* {item}" for item in items])
        return self

    def command(self, command):
        """The exact command (or commands) in a code block; says so where the
        results did not record it."""
        commands = [command] if isinstance(command, str) else list(command or [])
        if not commands:
            return self.block("Command: not recorded (the run predates the field).")
        self.block("Command:" if len(commands) == 1 else "Commands:")
        return self.block(["```", *commands, "```"])

    def machine(self, info, packages=DEFAULT_PACKAGES, load_end=None):
        """`machine_line` of each distinct machine in `info` (a dict or a list)."""
        infos = common.listed(info)
        lines = [machine_line(i, packages, load_end) for i in infos]
        return self.block(list(dict.fromkeys(lines)))

    def table(self, header, rows, align=None, formats=None, absent="", lead=None):
        """A table (see `table`), with `lead`, a line before it, if given."""
        if lead:
            self.block(lead)
        return self.block(table(header, rows, align, formats, absent))

    def image(self, path, alt):
        return self.block(f"![{alt}]({path})")

    def render(self):
        return "\n\n".join("\n".join(lines) for lines in self.blocks) + "\n"

    def write(self, path):
        common.write_atomically(path, self.render())


def pyplot():
    """`matplotlib.pyplot` on the Agg backend (no display), or None where
    matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figure(plt, fig, path):
    """`fig` as a PNG at `path`, at `fig.dpi` (which a plot may set after laying
    the figure out), written through a temporary file renamed over it, then closed."""
    tmp = path + ".tmp"
    fig.savefig(tmp, format="png", dpi=fig.dpi)
    os.replace(tmp, path)
    plt.close(fig)
