"""`polymodal chat` on the command line: one-shot in any argument order, the interactive session,
what goes to stdout and stderr, and one-line errors for models and checkpoints it cannot use."""
import io

import pytest

import polymodal.infer.chat as chat_api
from polymodal.cli import main
from polymodal.errors import UnsupportedTaskError, UsageError
from polymodal.infer.chat import ChatSession, chat

GEN = {"max_new_tokens": 8}
QUESTION = "What color is the circle?"


def one_line_error(capsys, *fragments):
    """The captured stderr ends with one 'polymodal chat: error:' line holding every fragment, and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("polymodal chat: error: ") and all(f in last for f in fragments), err
    return last


def test_one_shot_matches_the_api_in_any_argument_order(mm_model, tokenizer, files, run_chat):
    image, model = str(files / "scene0.png"), str(files / "mm")
    expected = chat(mm_model, tokenizer, [{"role": "user", "content": QUESTION}], [image], **GEN) + "\n"
    orders = [[model, QUESTION, "--image", image, "--max-new-tokens", "8"],
              [model, "--image", image, QUESTION, "--max-new-tokens", "8"],  # the README's order
              ["--max-new-tokens", "8", "--image", image, model, QUESTION],
              [model, "--image", image, "--max-new-tokens", "8", QUESTION]]
    for argv in orders:
        out, err = run_chat(argv)
        assert out == expected
        assert f"loading {model} ..." in err and "loaded mmllm model (" in err and "parameters) in " in err


def test_the_polymodal_command_prints_only_the_reply_on_stdout(mm_model, tokenizer, files, capsys):
    image, model = str(files / "scene0.png"), str(files / "mm")
    assert main(["chat", model, "--image", image, QUESTION, "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out == chat(mm_model, tokenizer, [{"role": "user", "content": QUESTION}], [image], **GEN) + "\n"
    assert "loading" in captured.err and "loading" not in captured.out


def test_a_model_that_cannot_chat_is_refused_before_any_tokenization(files, run_chat, capsys, monkeypatch):
    def no_encoding(*args, **kwargs):
        raise AssertionError("tokenized a prompt for a model that cannot chat")

    monkeypatch.setattr(chat_api, "encode_chat", no_encoding)
    with pytest.raises(UnsupportedTaskError, match=r"a 'clip' model \(ContrastiveModel\) cannot chat; it can: embed"):
        run_chat([str(files / "clip"), "Hello"])
    assert main(["chat", str(files / "clip"), "Hello"]) == 2
    one_line_error(capsys, "cannot chat", "embed")


def test_a_checkpoint_without_tokenizer_is_a_usage_error_naming_it(files, run_chat, capsys):
    with pytest.raises(UsageError, match=rf"{files / 'bare_lm'} has no tokenizer"):
        run_chat([str(files / "bare_lm"), "Hello"])
    assert main(["chat", str(files / "bare_lm"), "Hello"]) == 2
    one_line_error(capsys, "bare_lm", "no tokenizer")


def test_a_prompt_longer_than_the_context_fails_or_is_truncated(files, run_chat, capsys):
    long_prompt = "Is there a red circle left of the blue square? " * 40
    assert main(["chat", str(files / "lm"), long_prompt, "--max-new-tokens", "4"]) == 2
    one_line_error(capsys, "longer than the model's context of 256 tokens", "--truncate")
    out, err = run_chat([str(files / "lm"), long_prompt, "--max-new-tokens", "4", "--truncate"])
    assert out.endswith("\n")
    assert "polymodal chat: warning: the prompt of " in err and "truncated to its last 252 tokens" in err


@pytest.mark.parametrize("argv,message", [
    (["--batch", "requests.jsonl"], "--batch needs --out"),
    (["Hello", "--batch", "requests.jsonl", "--out", "a.jsonl"], "not both (got --batch and a prompt)"),
    (["--out", "a.jsonl"], "--out only applies to --batch"),
    (["--image-root", ".", "Hello"], "--image-root only applies to --batch"),
])
def test_option_combinations_that_mean_nothing_fail_before_loading(files, argv, message, capsys):
    assert main(["chat", str(files / "mm"), *argv]) == 2
    one_line_error(capsys, message)
    assert "loading" not in capsys.readouterr().err


def test_bad_sampling_options_are_argparse_errors(files, capsys):
    for argv, option in ([["--temperature", "-1"], "--temperature"], [["--top-p", "2"], "--top-p"],
                         [["--batch-size", "0"], "--batch-size"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["chat", str(files / "mm"), "Hello", *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"polymodal chat: error: argument {option}: must be" in err and "Traceback" not in err


def test_interactive_session(mm_model, tokenizer, files, run_chat):
    image = str(files / "scene0.png")
    stdin = io.StringIO(f"/help\n/image {image}\nWhat color is it?\n\n/nonsense please\nAnd the shape?\n"
                        "/image missing.png\n/image\n/reset\n//etc is a folder\nHello\n/quit\nnever read\n")
    out, err = run_chat([str(files / "mm"), "--max-new-tokens", "8"], stdin=stdin)
    session = ChatSession(mm_model, tokenizer, **GEN)
    first = session.send("What color is it?", images=[image])
    second = session.send("And the shape?")
    after_reset = ChatSession(mm_model, tokenizer, **GEN)
    slash, hello = after_reset.send("/etc is a folder"), after_reset.send("Hello")
    # stdout holds the replies and nothing else: /help and /nonsense never reached the model.
    assert out == f"{first}\n{second}\n{slash}\n{hello}\n"
    assert f"polymodal chat: {files / 'mm'} (mmllm model, " in err and "can: complete, chat; reads images" in err
    assert err.count("/image PATH  attach") == 2  # the banner and /help both list the commands
    assert "[unknown command /nonsense; /help lists the commands" in err
    assert f"[attached {image}]" in err and "missing.png" in err and "[usage: /image PATH]" in err
    assert "[conversation reset]" in err


def test_interactive_text_only_model_reports_errors_and_goes_on(files, run_chat):
    from polymodal.api import load

    out, err = run_chat([str(files / "lm"), "--max-new-tokens", "8"],
                        stdin=io.StringIO("/image x.png\nHi\n" + "red circle " * 200 + "\nThanks\n"))
    session = ChatSession(*load(files / "lm"), **GEN)
    # The failed turn (a prompt too long) left no trace in the conversation.
    assert out == f"{session.send('Hi')}\n{session.send('Thanks')}\n"
    assert "text only" in err and "[error: DecoderLM is a text-only model; it cannot read images]" in err
    assert "[error: the prompt is" in err and "longer than the model's context of 256 tokens" in err
