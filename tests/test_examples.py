"""The demo end to end at tiny sizes (the public commands, chained), and the experiment's
pieces that decide what is compared: its ablation recipes and its summary table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import demo  # noqa: E402
import experiment  # noqa: E402
import pipeline  # noqa: E402


@pytest.mark.slow
def test_quick_demo_runs_the_pipeline_and_prints_one_table(tmp_path, tiny_teacher, capsys):
    work = tmp_path / "demo"
    assert demo.main(["--quick", "--work", str(work), "--teacher", tiny_teacher, "--recipes", "clip,hierd"]) == 0
    report = json.loads((work / "report.json").read_text())
    assert [m["spec"] for m in report["models"]] == [
        tiny_teacher, f"local-dir:{work / 'models' / 'clip'}", f"local-dir:{work / 'models' / 'hierd'}"]
    for m in report["models"]:
        for _, key in demo.COLUMNS:
            assert 0.0 <= m["metrics"][key] <= 1.0, key
    out = capsys.readouterr()
    printed = out.out + out.err
    assert printed.count("$ hierdctl ") == 7  # scenes, cache-teacher, 2 × (distill, export), eval-retrieval
    assert "Scenes demo" in printed and "hierd" in printed
    assert (work / "demo.png").stat().st_size > 5000
    assert (work / "models" / "hierd" / "open_clip_model.safetensors").is_file()


def test_a_failing_command_stops_the_script_and_shows_its_log(tmp_path, capsys):
    times = {}
    pipeline.hierdctl("version", times=times, log_dir=tmp_path / "logs")
    assert set(times) == {"version"} and "hierdctl" in (tmp_path / "logs" / "00-version.log").read_text()
    with pytest.raises(SystemExit, match="scenes.*exit code 2"):
        pipeline.hierdctl("scenes", "--out", str(tmp_path / "s"), "--n-train", "-3", times=times,
                          log_dir=tmp_path / "logs")
    assert "--n-train" in capsys.readouterr().err
    assert (tmp_path / "logs" / "01-scenes.log").is_file() and set(times) == {"version"}


def test_ablation_recipes_drop_exactly_one_level(tmp_path):
    from hierdctl.losses.registry import load_recipe

    full = {t.name for t in load_recipe(experiment.ABLATION_BASE).terms}
    paths = experiment.ablation_recipes(tmp_path)
    levels = {level for level, names in experiment.LEVELS.items() if set(names) & full}
    assert {"global", "part-fd", "neg"} <= levels  # the ablations' base has these levels
    # removing the negatives from the base gives exactly the shipped hierd
    no_neg = {t.name: t.weight for t in load_recipe(paths["hierd-no-neg"]).terms}
    assert no_neg == {t.name: t.weight for t in load_recipe("hierd").terms}
    assert set(paths) == {f"hierd-no-{level}" for level in levels} | {"hierd-global-only"}
    for level in levels:
        kept = {t.name for t in load_recipe(paths[f"hierd-no-{level}"]).terms}
        assert kept == full - set(experiment.LEVELS[level]), level
        assert "clip" in kept
    # every hierarchical level removed at once: CLIP + the global (CLIP-KD) terms alone
    only = {t.name: t.weight for t in load_recipe(paths["hierd-global-only"]).terms}
    assert only == {"clip": 1.0, "crd": 1.0, "icl": 1.0, "fd": 2000.0}


def test_search_gives_every_recipe_its_base_and_at_most_extra_configurations(tmp_path):
    from hierdctl.losses.registry import load_recipe

    configs = experiment.search_configs(tmp_path)
    assert set(configs) == set(experiment.RECIPES)
    for r, cs in configs.items():
        assert 1 <= len(cs) <= 1 + experiment.EXTRA, r
        for _, path in cs:
            load_recipe(path)  # every configuration is a valid recipe
    # the baselines hierd must beat get as many extra configurations as hierd
    n = {r: len(cs) for r, cs in configs.items()}
    assert n["clip-kd"] == n["clip-rd"] == n["hierd"] == 1 + experiment.EXTRA
    # what the final phase trains is a configuration the search tried: the same terms and
    # weights (a shipped recipe chosen by name, like hierd, must equal a searched one)
    tried = {r: [experiment.weights_of(load_recipe_yaml(path)) for _, path in cs] for r, cs in configs.items()}
    for r, (name, lr) in experiment.CHOSEN.items():
        family = "hierd" if r.startswith("hierd") else r
        path = dict(configs[family]).get(name)
        weights = experiment.weights_of(load_recipe_yaml(path) if path else experiment.shipped_recipe(name))
        assert weights in tried[family], r
        assert lr in experiment.PRESETS["full"]["lrs"], r
    # the shipped hierd is within the step-time budget; hierd+neg is not
    assert not set(experiment.OVER_BUDGET_TERMS) & set(experiment.weights_of(experiment.shipped_recipe("hierd")))
    assert set(experiment.OVER_BUDGET_TERMS) & set(experiment.weights_of(experiment.shipped_recipe("hierd+neg")))


def load_recipe_yaml(path):
    import yaml

    return yaml.safe_load(open(path).read())


def test_paired_differences_count_seeds_favouring_each_side():
    assert experiment.paired([0.3, 0.4, 0.5], [0.2, 0.5, 0.3]) == "+6.7 ± 15.3 (2–1)"


def test_results_table_gives_mean_and_std_over_seeds():
    assert experiment.fmt([0.5, 0.7, 0.6]) == "60.0 ± 10.0"
    assert experiment.fmt([0.25]) == "25.0"
    assert experiment.fmt([None]) == "–"
    res = {"flavour": "shapes", "lr": {"clip": 0.002, "hierd": 0.004, "clip-kd": 0.004}, "seeds": [0, 1],
           "table": {"teacher": {k: [0.9] for k in experiment.METRICS},
                     "clip": {k: [0.1, 0.3] for k in experiment.METRICS},
                     "clip-kd": {k: [0.2, 0.3] for k in experiment.METRICS},
                     "hierd": {k: [0.25, 0.29] for k in experiment.METRICS}},
           "wall_seconds": {"distill": 12.0}}
    md = experiment.markdown([res], experiment.PRESETS["quick"])
    assert "| clip | 20.0 ± 14.1 |" in md and "| teacher | 90.0 |" in md
    assert "lr: clip 0.002, hierd 0.004" in md
    assert "| hierd − clip-kd | +2.0 ± 4.2 (1–1) |" in md


def test_search_chooses_the_best_configuration_within_the_step_budget():
    m = lambda v: {k: v for k in experiment.METRICS}  # noqa: E731
    s = {"grid": {"hierd": {0.004: m(0.20)}},
         "extras": {"hierd": [{"config": "v2-no-cross", "lr": 0.004, "metrics": m(0.24)},
                              {"config": "v2-no-cross-no-neg", "lr": 0.004, "metrics": m(0.23)}]},
         "over_budget": ["hierd-search", "v2-no-cross"], "configs_tried": {"hierd": 3}}
    rows = {line.split(" | ")[1]: line for line in experiment.search_markdown(s, {}).splitlines()
            if line.startswith("| hierd |")}
    assert set(rows) == {"hierd-search (over the step-time budget)",
                         "v2-no-cross (best on validation; over the step-time budget)",
                         "v2-no-cross-no-neg **(chosen)**"}


def test_paired_differences_pair_only_rows_with_the_same_seeds():
    m = {k: [0.2, 0.3] for k in experiment.METRICS}
    res = {"flavour": "shapes", "lr": {"clip-kd": 0.004, "hierd": 0.004}, "seeds": [0, 1],
           "seeds_per_model": {"clip-kd": [0, 1], "hierd": [1, 2]},
           "table": {"teacher": {k: [0.9] for k in experiment.METRICS}, "clip-kd": m, "hierd": m},
           "wall_seconds": {}}
    assert "hierd − clip-kd" not in experiment.markdown([res], experiment.PRESETS["quick"])
    res["seeds_per_model"]["hierd"] = [0, 1]
    assert "hierd − clip-kd" in experiment.markdown([res], experiment.PRESETS["quick"])
    assert experiment.paired([None, 0.4], [0.2, 0.3]) == "+10.0 (1–0)"


def test_train_teacher_publishes_only_over_its_own_export(tmp_path):
    import train_teacher

    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "export.json").write_text(json.dumps({"schema": "hierdctl.export/1"}))
    (staged / "weights.bin").write_text("new")
    out = tmp_path / "teacher"
    train_teacher.publish(staged, out)  # a new folder
    train_teacher.publish(staged, out)  # over its own export
    assert (out / "weights.bin").read_text() == "new"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "export.json").write_text(json.dumps({"tool": "someone else's"}))
    (foreign / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit, match="not written by hierdctl"):
        train_teacher.publish(staged, foreign)
    assert (foreign / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "staged", "teacher"]  # no leftovers


def test_demo_clears_only_its_own_command_logs(tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "00-scenes.log").write_text("old")
    (logs / "notes.txt").write_text("the user's")

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(demo, "hierdctl", stop)
    with pytest.raises(Stop):
        demo.main(["--work", str(tmp_path), "--quick"])
    assert sorted(p.name for p in logs.iterdir()) == ["notes.txt"]
