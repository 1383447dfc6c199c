"""`polymodal chat --batch`: JSONL requests answered in order, bad requests reported line by line,
image paths kept inside the image root."""
import json
import pathlib
import shutil

import pytest

from polymodal.cli import main
from polymodal.errors import DataError
from polymodal.infer.chat import chat
from polymodal.infer.chat_requests import read_requests, resolve_request_image

GEN = {"max_new_tokens": 8}


@pytest.fixture
def batch(tmp_path, files):
    """tmp/batch/ holding scene0.png, a symlink out of it and an undecodable image; tmp/outside.png beside it."""
    folder = tmp_path / "batch"
    folder.mkdir()
    shutil.copy(files / "scene0.png", folder / "scene0.png")
    shutil.copy(files / "scene1.png", tmp_path / "outside.png")
    (folder / "link.png").symlink_to(tmp_path / "outside.png")
    (folder / "garbage.png").write_bytes(b"not an image at all")
    return folder


def write_lines(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def answers_of(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_batch_answers_equal_the_api_in_order(mm_model, tokenizer, files, run_chat, batch):
    requests = write_lines(batch / "requests.jsonl", [
        {"id": "a", "messages": [{"role": "user", "content": "<image>\nWhere is the circle?"}],
         "images": ["scene0.png"]},
        {"prompt": "How many objects are there?", "image": "scene0.png"},
        "",
        {"id": 7, "prompt": "Hello"},
    ])
    out_path = batch / "answers.jsonl"
    out, err = run_chat([str(files / "mm"), "--batch", str(requests), "--out", str(out_path), "--batch-size", "2",
                         "--max-new-tokens", "8"])
    answers = answers_of(out_path)
    assert [(a["index"], a["line"], a.get("id")) for a in answers] == [(0, 1, "a"), (1, 2, None), (2, 4, 7)]
    image = batch / "scene0.png"
    expected = [chat(mm_model, tokenizer, [{"role": "user", "content": question}], images, **GEN)
                for question, images in (("<image>\nWhere is the circle?", [image]),
                                         ("How many objects are there?", [image]), ("Hello", []))]
    assert [a["answer"] for a in answers] == expected
    assert out == "" and f"wrote 3 answers and 0 errors to {out_path}" in err


def test_a_bad_request_is_reported_on_its_line_and_the_others_are_answered(mm_model, tokenizer, files, run_chat,
                                                                           batch, capsys):
    lines = [
        {"id": "first", "prompt": "Hello"},
        "this is not json",
        {"text": "no prompt"},
        {"messages": ["hi"]},
        {"prompt": "hi", "image": "../outside.png"},
        {"prompt": "hi", "image": "../nope.png"},
        {"prompt": "hi", "image": "/etc/passwd"},
        {"prompt": "hi", "image": "link.png"},
        {"prompt": "hi", "image": "missing.png"},
        {"prompt": "hi", "image": "garbage.png"},
        [{"prompt": "an array on one line"}],
        {"id": "two", "prompt": "<image><image> compare", "image": "scene0.png"},
        {"prompt": "Is there a red circle left of the blue square? " * 40},
        {"id": "last", "prompt": "What is it?", "image": "scene0.png"},
    ]
    requests = write_lines(batch / "requests.jsonl", lines)
    out_path = batch / "answers.jsonl"
    assert main(["chat", str(files / "mm"), "--batch", str(requests), "--out", str(out_path),
                 "--max-new-tokens", "8"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"wrote 2 answers and 12 errors to {out_path} (first: {requests}:2: not valid JSON" in err
    answers = answers_of(out_path)
    assert [a["index"] for a in answers] == list(range(14)) and [a["line"] for a in answers] == list(range(1, 15))
    assert answers[0] == {"index": 0, "line": 1, "id": "first",
                          "answer": chat(mm_model, tokenizer, [{"role": "user", "content": "Hello"}], **GEN)}
    assert answers[13]["answer"] == chat(mm_model, tokenizer, [{"role": "user", "content": "What is it?"}],
                                         [batch / "scene0.png"], **GEN)
    errors = [a["error"] for a in answers[1:13]]
    assert errors[0].startswith("not valid JSON")
    assert errors[1] == "expected an object with 'messages' (+ 'images') or 'prompt' (+ 'image')"
    assert errors[2].startswith("messages[0] must be an object with a 'role'")
    root = str(batch)
    for error, path in zip(errors[3:7], ["../outside.png", "../nope.png", "/etc/passwd", "link.png"]):
        # The same words whether or not the file exists: a batch cannot probe the filesystem.
        assert error == f"image {path!r} is outside the image root {root} (see --image-root)"
    assert "missing.png" in errors[7] and "not found" in errors[7]
    assert "garbage.png" in errors[8] and "cannot decode image" in errors[8]
    assert errors[9] == "expects JSONL (one JSON object per line), got a JSON array"
    assert answers[11]["id"] == "two" and "2 '<image>' markers but 1 images" in errors[10]
    assert "longer than the model's context of 256 tokens" in errors[11]


def test_paths_outside_the_root_are_refused_by_their_text_alone(batch, monkeypatch):
    resolved = []
    original = pathlib.Path.resolve

    def recording_resolve(self, strict=False):
        resolved.append(str(self))
        return original(self, strict)

    monkeypatch.setattr(pathlib.Path, "resolve", recording_resolve)
    for path in ("../outside.png", "/etc/passwd", "sub/../../outside.png"):
        with pytest.raises(DataError, match="is outside the image root"):
            resolve_request_image(path, batch, batch)
    assert resolved == [str(batch)] * 3  # only the root itself was looked up
    with pytest.raises(DataError, match="'link.png' is outside the image root"):
        resolve_request_image("link.png", batch, batch)  # inside by its text: resolved, then refused
    assert resolve_request_image(str(batch / "scene0.png"), batch, batch) == batch / "scene0.png"


def test_image_root_widens_where_batch_images_may_come_from(mm_model, tokenizer, files, run_chat, batch):
    sub = batch / "requests"
    sub.mkdir()
    requests = write_lines(sub / "requests.jsonl", [{"prompt": "What is it?", "image": "../scene0.png"}])
    out_path = batch / "answers.jsonl"
    run_chat([str(files / "mm"), "--batch", str(requests), "--out", str(out_path), "--max-new-tokens", "8"])
    assert "is outside the image root" in answers_of(out_path)[0]["error"]
    _, err = run_chat([str(files / "mm"), "--batch", str(requests), "--out", str(out_path), "--max-new-tokens", "8",
                       "--image-root", str(batch)])
    expected = chat(mm_model, tokenizer, [{"role": "user", "content": "What is it?"}], [batch / "scene0.png"], **GEN)
    assert answers_of(out_path) == [{"index": 0, "line": 1, "answer": expected}]
    assert "wrote 1 answer and 0 errors" in err


def test_a_json_array_file_is_refused_as_a_whole_before_loading(files, batch, capsys):
    requests = batch / "requests.json"
    requests.write_text(json.dumps([{"prompt": "Hello"}, {"prompt": "Hi"}], indent=2))
    with pytest.raises(DataError, match=r"requests.json: expects JSONL \(one JSON object per line\), got a JSON array"):
        read_requests(requests)
    assert main(["chat", str(files / "mm"), "--batch", str(requests), "--out", str(batch / "a.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "loading" not in err
    assert err.strip().splitlines() == [f"polymodal chat: error: {requests}: expects JSONL (one JSON object per line), "
                                        "got a JSON array"]
    assert not (batch / "a.jsonl").exists()


def test_unreadable_batch_files_name_the_file(batch):
    (batch / "latin1.jsonl").write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl: not UTF-8 text"):
        read_requests(batch / "latin1.jsonl")
    with pytest.raises(FileNotFoundError):
        read_requests(batch / "absent.jsonl")


def test_truncation_warnings_name_the_request_line(files, run_chat, batch):
    requests = write_lines(batch / "requests.jsonl", [{"prompt": "Hi"},
                                                      {"prompt": "Is there a red circle left of the blue square? " * 40}])
    out_path = batch / "answers.jsonl"
    _, err = run_chat([str(files / "mm"), "--batch", str(requests), "--out", str(out_path), "--max-new-tokens", "4",
                       "--truncate"])
    assert "polymodal chat: warning: line 2: the prompt of " in err and "truncated to its last 252 tokens" in err
    assert [set(a) for a in answers_of(out_path)] == [{"index", "line", "answer"}] * 2
