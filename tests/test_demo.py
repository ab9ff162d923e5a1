"""The main job (make demo) on tiny data: the table, JSON and plot it promises."""
import json

import pytest

from fqss_plugin.demo import main, paired_delta


def test_paired_delta_and_its_confidence_interval():
    mean, half = paired_delta([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0])
    assert mean == pytest.approx(1.5)
    assert half == pytest.approx(1.96 * 1.2909944 / 2, rel=1e-5)


def test_demo_runs_end_to_end_on_tiny_data(tmp_path, capsys):
    from tests.test_asteroid_recipe import conf_for, train
    from fqss_plugin.data.speech import SpeechConfig, generate_speech
    generate_speech(SpeechConfig(out=tmp_path / "data", hours=0.004, train_speakers=4, eval_speakers=3,
                                 eval_mixtures=3, jobs=1, progress=False))
    teacher = tmp_path / "teacher"
    train(conf_for("float", tmp_path / "data" / "data", teacher))
    assert main(["--data", str(tmp_path / "data"), "--teacher", str(teacher), "--out", str(tmp_path / "out"),
                 "--epochs", "1", "--limit_train_batches", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| model | Float SI-SDRi | Float + | Vanilla QAT 8-bit | FQSS 8-bit |" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["test_mixtures"] == len(results["per_mixture_si_sdri"]["fqss"]) == 3
    assert set(results["delta_vs_float"]) == {"float_more", "vanilla", "fqss"}
    assert set(results["delta_vs_float_more"]) == {"vanilla", "fqss"}
    assert set(results["delta_vs_float_by_half"]["fqss"]) == {"lower", "upper"}
    assert "below | above the float median" in printed
    # "Float +" is the teacher fine-tuned in float: a float package, trained for the same steps at the QAT lr
    float_more = json.loads((tmp_path / "out" / "float_more" / "best_k_models.json").read_text())
    assert float_more and (tmp_path / "out" / "float_more" / "best_model.pth").is_file()
    assert (tmp_path / "out" / "per_mixture.png").stat().st_size > 10_000
    # a run made with another conf (an edited recipe, another fqss version) is trained afresh, not resumed
    from fqss_plugin.demo import fine_tune
    capsys.readouterr()
    fine_tune("ConvTasNet", "fqss", str(teacher), tmp_path / "data", tmp_path / "out" / "fqss", 1, 2,
              ("--decoder_in_splits", "1"))
    assert "made with another conf" in capsys.readouterr().out
    fine_tune("ConvTasNet", "fqss", str(teacher), tmp_path / "data", tmp_path / "out" / "fqss", 1, 2,
              ("--decoder_in_splits", "1"))
    assert "made with another conf" not in capsys.readouterr().out      # same conf: resumed (finished)
    # a rerun resumes the runs made from the same teacher, and starts afresh those made from another one
    from fqss_plugin.demo import discard_runs_of_another_teacher
    discard_runs_of_another_teacher(str(teacher), tmp_path / "out")
    assert (tmp_path / "out" / "fqss" / "best_model.pth").is_file()
    (tmp_path / "out" / "teacher.sha256").write_text("another teacher\n")
    discard_runs_of_another_teacher(str(teacher), tmp_path / "out")
    assert not (tmp_path / "out" / "fqss").exists() and not (tmp_path / "out" / "float_more").exists()
    assert "made from another teacher; starting vanilla, fqss, float_more afresh" in capsys.readouterr().out


def test_demo_reports_a_missing_teacher_clearly(tmp_path, capsys):
    from fqss_plugin.data.speech import SpeechConfig, generate_speech
    generate_speech(SpeechConfig(out=tmp_path / "data", hours=0.003, train_speakers=4, eval_speakers=3,
                                 eval_mixtures=2, jobs=1, progress=False))
    assert main(["--data", str(tmp_path / "data"), "--teacher", str(tmp_path / "none.pth"),
                 "--out", str(tmp_path / "out")]) == 1
    assert "none.pth: no such model file" in capsys.readouterr().err
