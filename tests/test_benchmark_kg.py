"""`benchmarks/kg.py --merge`: runs made in separate processes (one per
dataset, say) join into one kg.json when their settings agree, and are
refused, naming the file and the settings that differ, when they do not.
No training."""

import json

import pytest

SETTINGS = {"steps": 500, "batch_size": 128, "dim": 64}


@pytest.fixture(scope="module")
def kg(benchmark_script):
    """benchmarks/kg.py."""
    return benchmark_script("kg")


def write(path, command, commit, settings, runs):
    path.write_text(json.dumps({"command": command, "machine": {"commit": commit}, "settings": settings,
                                "runs": runs}))
    return str(path)


def test_merge_joins_runs_commands_and_machines(kg, tmp_path):
    umls = write(tmp_path / "umls.json", "kg.py --datasets=umls", "a", SETTINGS, [{"dataset": "umls"}])
    kinship = write(tmp_path / "kinship.json", "kg.py --datasets=kinship", "b", SETTINGS,
                    [{"dataset": "kinship", "seed": 0}, {"dataset": "kinship", "seed": 1}])
    merged = kg.merge([umls, kinship])
    assert merged["commands"] == ["kg.py --datasets=umls", "kg.py --datasets=kinship"]
    assert merged["machine"] == [{"commit": "a"}, {"commit": "b"}]
    assert merged["settings"] == SETTINGS
    assert [r["dataset"] for r in merged["runs"]] == ["umls", "kinship", "kinship"]


def test_merge_refuses_other_settings_and_names_them(kg, tmp_path):
    umls = write(tmp_path / "umls.json", "c1", "a", SETTINGS, [])
    other = write(tmp_path / "kinship.json", "c2", "b", {**SETTINGS, "dim": 32, "hops": 3}, [])
    with pytest.raises(ValueError, match=r"kinship\.json was run with other settings than .*umls\.json "
                                         r"\(dim, hops: \[32, 3\] against \[64, None\]\)"):
        kg.merge([umls, other])
