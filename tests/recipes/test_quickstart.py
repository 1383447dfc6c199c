"""The quickstart end to end on a tiny time budget: both stages, the evaluation table and the PNGs."""
import pytest

from polymodal.quickstart import quickstart


def test_quickstart_smoke(tmp_path, capsys):
    table = quickstart(minutes=0.05, out=tmp_path / "qs", eval_scenes=1)
    assert {"val/color", "val/shape", "val/all", "compositional/all", "val/cider", "color", "all"} <= set(table)
    assert all(0.0 <= v <= 1.0 for k, v in table.items() if not k.endswith("cider"))
    out = tmp_path / "qs"
    assert (out / "loss.png").stat().st_size > 0 and (out / "examples.png").stat().st_size > 0
    assert (out / "instruct" / "final" / "config.json").exists()
    printed = capsys.readouterr().out
    assert "polymodal chat" in printed and "compositional" in printed
    with pytest.raises(ValueError, match="already holds a quickstart run.*--overwrite"):
        quickstart(minutes=0.05, out=out, eval_scenes=1)


def test_overwrite_deletes_only_the_earlier_runs_stage_folders(tmp_path):
    from polymodal.quickstart import _clear_previous_run

    (tmp_path / "align" / "final").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine")
    _clear_previous_run(tmp_path, overwrite=True)
    assert not (tmp_path / "align").exists() and (tmp_path / "notes.txt").read_text() == "mine"
    _clear_previous_run(tmp_path, overwrite=False)  # nothing left to refuse
