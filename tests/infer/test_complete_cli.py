"""`polymodal complete`: the completion alone on stdout, loading on stderr, clear errors for
models and checkpoints it cannot use, context limits, and options in any order."""
import io

import pytest

from polymodal.cli import main
from polymodal.errors import UnsupportedTaskError, UsageError
from polymodal.infer.complete import complete


def test_completion_on_stdout_loading_on_stderr(files):
    out, err = io.StringIO(), io.StringIO()
    text = complete(str(files / "lm"), "a red circle", max_new_tokens=5, out=out, err=err)
    assert out.getvalue() == text + "\n"
    lines = err.getvalue().splitlines()
    assert lines[0] == f"loading {files / 'lm'} ..."
    assert lines[1].startswith("loaded lm model (") and lines[1].endswith(" s")


def test_options_and_prompt_in_any_order(files, capsys):
    assert main(["complete", str(files / "lm"), "--max-new-tokens", "5", "a red circle"]) == 0
    first = capsys.readouterr().out
    assert main(["complete", "--max-new-tokens", "5", str(files / "lm"), "a red circle"]) == 0
    assert capsys.readouterr().out == first != "\n"


def test_a_model_that_cannot_complete_is_an_unsupported_task(files, capsys):
    with pytest.raises(UnsupportedTaskError, match=r"'clip' model \(ContrastiveModel\) cannot complete; it can: embed"):
        complete(str(files / "clip"), "hello", out=io.StringIO(), err=io.StringIO())
    assert main(["complete", str(files / "clip"), "hello"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.strip().splitlines()[-1].startswith("polymodal complete: error: a 'clip' model")


def test_a_checkpoint_without_tokenizer_is_named(files):
    with pytest.raises(UsageError, match=rf"{files / 'bare_lm'} has no tokenizer; `polymodal complete` needs one"):
        complete(str(files / "bare_lm"), "hello", out=io.StringIO(), err=io.StringIO())


def test_bad_sampling_arguments_fail_before_loading(tmp_path):
    with pytest.raises(UsageError, match="top_p must be a number in"):
        complete(str(tmp_path / "no-such-model"), "hello", top_p=0.0)


def test_a_prompt_longer_than_the_context(files):
    prompt = "a red circle left of a blue square " * 40
    with pytest.raises(UsageError, match=r"the prompt is \d+ tokens, longer than the model's context of 256 tokens"):
        complete(str(files / "lm"), prompt, max_new_tokens=4, out=io.StringIO(), err=io.StringIO())
    err = io.StringIO()
    complete(str(files / "lm"), prompt, max_new_tokens=4, truncate=True, out=io.StringIO(), err=err)
    assert "polymodal complete: warning: the prompt of " in err.getvalue()
    assert "truncated to its last 252 tokens" in err.getvalue()
