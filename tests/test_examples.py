"""The demo end to end at tiny sizes (the public commands, chained), and the experiment's
pieces that decide what is compared: its search configurations, its selection rule (fixed
before any test number), its statistics and its tables."""

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
    grounding = json.loads((work / "grounding.json").read_text())
    assert [m["spec"] for m in grounding["models"]] == [m["spec"] for m in report["models"]]
    rows = demo.summarise(report, ["teacher", "clip", "hierd"], grounding)
    for name, m in rows:
        for _, key in demo.COLUMNS:
            assert 0.0 <= m[key] <= 1.0, (name, key)
    out = capsys.readouterr()
    printed = out.out + out.err
    # scenes, cache-teacher, 2 × (distill, export), eval-retrieval, eval-grounding
    assert printed.count("$ hierdctl ") == 8
    assert "Scenes demo" in printed and "hierd" in printed and "point" in printed and "chance" in printed
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


def test_every_searched_configuration_is_a_valid_recipe_and_the_budgets_are_equal(tmp_path):
    from hierdctl.losses.registry import load_recipe

    for r, changes in experiment.FIRST.items():
        base = experiment.weights_of(experiment.shipped_recipe(r))
        for c, ch in changes.items():
            load_recipe(experiment.write_recipe(tmp_path, f"{r}-{c}", experiment.apply(base, ch), c))
    # the three recipes compared get the same number of extra configurations (5 single changes + 2 follow-ups)
    for r in ("clip-kd", "clip-rd", "hierd"):
        assert len(experiment.FIRST[r]) + 2 == experiment.EXTRA
    for c in experiment.CONTROLS:
        load_recipe(c)
    # hierd's single changes are its structure families, each on top of the shipped hierd
    hierd = experiment.weights_of(experiment.shipped_recipe("hierd"))
    for name, terms in experiment.FAMILIES.items():
        assert set(experiment.FIRST["hierd"][f"+{name}"]) == set(terms)
        assert not set(terms) & set(hierd)
    assert set(experiment.STRUCTURE_TERMS) == {n for f in experiment.FAMILIES.values() for n in f}


def test_follow_ups_combine_the_two_best_and_push_the_best_once_more():
    scores = {"fd1000": 0.20, "fd4000": 0.25, "crd2": 0.24, "crd0.5": 0.1, "icl2": 0.2}
    f = experiment.follow_ups("clip-kd", scores)
    assert f == {"fd4000+crd2": {"fd": 4000.0, "crd": 2.0}, "fd4000x2": {"fd": 8000.0}}
    f = experiment.follow_ups("hierd", {"+align": 0.3, "+xbatch": 0.1, "+relations": 0.2, "+coupling": 0.0,
                                        "+structure": 0.0})
    assert f["+align+relations"] == {"hierd_clu_phr": 1.0, "hierd_clu_clu": 1.0, "hierd_phr_phr": 1.0}
    assert f["+alignx2"] == {"hierd_clu_phr": 4.0}  # an added term: weight ×4


def _row(config, lr, score, weights):
    return {"config": config, "lr": lr, "score": score, "weights": weights}


def test_the_choice_is_the_best_on_validation_within_the_step_budget():
    s = {"tried": {
        "clip-kd": [_row("clip-kd", 0.004, 0.20, {"clip": 1}), _row("crd2", 0.004, 0.22, {"clip": 1, "crd": 2})],
        "hierd": [_row("hierd", 0.004, 0.25, {"hierd_clu_fd": 1}),
                  _row("+neg", 0.004, 0.30, {"hierd_clu_fd": 1, "hierd_neg": 1}),  # over the budget
                  _row("+align", 0.002, 0.24, {"hierd_clu_fd": 1, "hierd_clu_phr": 1}),
                  _row("+relations", 0.004, 0.23, {"hierd_clu_fd": 1, "hierd_clu_clu": 1})]}}
    c = experiment.choose(s)
    assert c["clip-kd"]["config"] == "crd2"
    assert c["hierd"]["config"] == "hierd"  # +neg scored higher but misses the step-time budget
    assert c["hierd-rel"]["config"] == "+align" and c["hierd-rel"]["lr"] == 0.002


def test_the_small_budget_chooses_hierd_from_its_rates_and_hierd_rel_from_its_own_candidates():
    m = {"text_retrieval_recall@1": 0.3, "image_retrieval_recall@1": 0.2}
    both = {"metrics": {"shapes/val7": m, "cluttered/val7": m}}
    rates = [_row("hierd", lr, sc, {"hierd_clu_fd": 1}) | both for lr, sc in ((0.002, 0.2), (0.004, 0.25), (0.008, 0.1))]
    shapes = {"metrics": {"shapes/val7": m, "shapes/val8": m}}
    s = {"tried": {"hierd": rates,
                   "hierd-rel": [_row("+align", 0.004, 0.30, {"hierd_clu_fd": 1, "hierd_clu_phr": 1}) | shapes,
                                 _row("+coupling", 0.004, 0.26, {"hierd_clu_fd": 1, "hierd_clu_img": 1}) | shapes]}}
    c = experiment.choose(s)
    assert (c["hierd"]["config"], c["hierd"]["lr"]) == ("hierd", 0.004)  # the structure rows never compete here
    assert c["hierd-rel"]["config"] == "+align"
    md = experiment.search_markdown(s | {"controls": [], "configs_tried": {"hierd": 3, "hierd-rel": 2}}, c)
    assert md.count("(chosen)") == 2 and "–" in md  # hierd-rel's rows ran on one flavour only


def test_the_validation_score_averages_both_ways_over_flavours_and_draws():
    m = lambda a, b: {"text_retrieval_recall@1": a, "image_retrieval_recall@1": b}  # noqa: E731
    assert experiment.val_score({"shapes/val7": m(0.2, 0.4), "cluttered/val8": m(0.1, 0.1)}) == pytest.approx(0.2)


def test_paired_differences_give_a_paired_t_interval_and_seed_counts():
    assert experiment.paired([0.3, 0.4, 0.5], [0.2, 0.5, 0.3]) == "+6.7 [-31.3, +44.6] (2–1)"
    lo, hi = experiment.t_interval([1.0, 2.0, 3.0])
    assert (lo, hi) == pytest.approx((2 - 4.303 / 3**0.5, 2 + 4.303 / 3**0.5), abs=1e-3)
    assert experiment.paired([None, 0.4], [0.2, 0.3]) == "+10.0 (1–0)"


def test_epochs_to_reach_a_share_of_the_teacher():
    m = lambda a, b: {"text_retrieval_recall@1": a, "image_retrieval_recall@1": b}  # noqa: E731
    teacher = m(0.5, 0.4)
    curve = {1: [m(0.3, 0.3)], 2: [m(0.46, 0.35)], 4: [m(0.46, 0.37)], 8: [m(0.5, 0.4)]}
    assert experiment.epochs_to(curve, teacher, 0, 0.9) == 4  # both ways must reach 90 %
    assert experiment.epochs_to(curve, teacher, 0, 1.01) is None


def test_results_table_gives_mean_and_std_over_seeds_and_the_paired_rows():
    assert experiment.fmt([0.5, 0.7, 0.6]) == "60.0 ± 10.0"
    assert experiment.fmt([0.25]) == "25.0"
    assert experiment.fmt([None]) == "–"
    res = {"flavour": "shapes", "lr": {"clip": 0.002, "hierd": 0.004, "clip-kd": 0.004}, "seeds": [0, 1],
           "table": {"teacher": {k: [0.9] for k in experiment.METRICS},
                     "clip": {k: [0.1, 0.3] for k in experiment.METRICS},
                     "clip-kd": {k: [0.2, 0.3] for k in experiment.METRICS},
                     "hierd": {k: [0.25, 0.29] for k in experiment.METRICS}},
           "grounding": {"teacher": {"pointing_acc": [0.5], "box_mass": [0.4], "chance/pointing_acc": [0.1],
                                     "chance/box_mass": [0.1]},
                         "clip-kd": {"pointing_acc": [0.3, 0.3], "box_mass": [0.2, 0.2]},
                         "hierd": {"pointing_acc": [0.4, 0.35], "box_mass": [0.3, 0.2]}},
           "wall_seconds": {}}
    md = experiment.markdown([res])
    assert "| clip | 20.0 ± 14.1 |" in md and "| teacher | 90.0 |" in md
    assert "lr: clip 0.002, hierd 0.004" in md
    assert "| hierd − clip-kd | +2.0 [-36.1, +40.1] (1–1) |" in md
    assert "+7.5 [-24.3, +39.3] (2–0) |" in md  # pointing, paired


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


def test_a_final_student_equal_to_a_search_student_is_that_student():
    a = {"recipe": "description: clip-kd (shipped)\nterms:\n- {name: clip, weight: 1.0}\n", "lr": 0.004, "seed": 0,
         "cache": "c", "epochs": 4, "curve": [], "batch_size": 128, "warmup": 50}
    b = a | {"recipe": "description: 'clip-kd: the search''s choice'\nterms:\n- {name: clip, weight: 1.0}\n"}
    assert experiment._same_student(a, b)
    assert not experiment._same_student(a, b | {"seed": 1})
    assert not experiment._same_student(a, a | {"recipe": "terms:\n- {name: clip, weight: 2.0}\n"})


def test_grounding_headlines_are_eval_groundings_all_region_metrics():
    m = {"pointing_acc/all": 0.2, "box_mass/all": 0.1, "pointing_acc_chance/all": 0.08, "box_mass_chance/all": 0.07,
         "pointing_acc_control/all": 0.25, "box_mass_control/all": 0.11, "pointing_acc/kind:object": 0.3}
    h = experiment.headline(m)
    assert (h["pointing_acc"], h["box_mass"], h["chance/pointing_acc"], h["control/box_mass"]) == (0.2, 0.1, 0.08, 0.11)
    assert h["pointing_acc/kind:object"] == 0.3 and experiment.headline({}) == {}
