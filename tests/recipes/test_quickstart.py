"""The quickstart end to end on a tiny time budget: both stages, the evaluation table and the PNGs."""
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
