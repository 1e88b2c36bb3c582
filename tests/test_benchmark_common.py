"""`benchmarks/common.py`'s record of a resumed run (`common.resumed`): a
script that finds its results JSON (a cut-off run, or one made with fewer
seeds) keeps its runs and the command and machine of every run, and refuses
to add runs made with other settings. No TensorFlow, no training.
"""

import pytest

SETTINGS = {"steps": 2000, "batch_size": 128}


@pytest.fixture(scope="module")
def common(benchmark_script):
    """benchmarks/common.py."""
    return benchmark_script("common")


def test_a_resumed_run_lists_every_command_and_machine(common):
    first = {"command": "python benchmarks/kg.py --seeds=0", "machine": {"commit": "a"}, "settings": SETTINGS,
             "runs": [{"seed": 0}]}
    second = common.resumed(first, SETTINGS, "python benchmarks/kg.py --seeds=0,1", {"commit": "b"})
    assert second["commands"] == ["python benchmarks/kg.py --seeds=0", "python benchmarks/kg.py --seeds=0,1"]
    assert second["machine"] == [{"commit": "a"}, {"commit": "b"}]
    assert "command" not in second and second["runs"] == [{"seed": 0}] and second["settings"] == SETTINGS
    third = common.resumed({**second, "runs": [{"seed": 0}, {"seed": 1}]}, SETTINGS, "c3", {"commit": "c"})
    assert third["commands"][-1] == "c3" and len(third["commands"]) == len(third["machine"]) == 3
    assert first["command"] == "python benchmarks/kg.py --seeds=0"  # the report read is left as it was


def test_a_run_with_other_settings_is_refused(common):
    first = {"command": "c1", "machine": {}, "settings": SETTINGS, "runs": [{"seed": 0}]}
    with pytest.raises(ValueError, match=r"other settings \(steps: \[2000\], this run \[500\]\).*--out_dir"):
        common.resumed(first, {**SETTINGS, "steps": 500}, "c2", {})


def test_changed_settings_counts_a_missing_key(common):
    assert common.changed_settings(SETTINGS, dict(SETTINGS)) == []
    assert common.changed_settings(SETTINGS, {"steps": 500}) == ["batch_size", "steps"]


def test_commands_reads_either_form(common):
    assert common.commands({"command": "python a.py"}) == ["python a.py"]
    assert common.commands({"commands": ["python a.py", "python b.py"], "command": "old"}) == ["python a.py",
                                                                                              "python b.py"]


def test_listed_wraps_one_entry_and_keeps_a_list(common):
    assert common.listed({"commit": "a"}) == [{"commit": "a"}]
    assert common.listed("python x.py") == ["python x.py"]
    assert common.listed(["a", "b"]) == ["a", "b"]
