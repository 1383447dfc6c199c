"""Chat API, streaming, batches and the `polymodal chat` command on tiny multimodal and text-only models."""
import argparse
import io
import json

import pytest
import torch

from polymodal.backbones.decoder import DecoderLM
from polymodal.checkpoint import save_checkpoint
from polymodal.data.world import World, world_tokenizer
from polymodal.infer.chat import (
    ChatSession,
    add_cli,
    chat,
    chat_batch,
    encode_chat,
    read_requests,
    run_chat_cli,
    stream_chat,
)
from polymodal.models.lm import lm_tiny
from polymodal.models.mmllm import MultimodalLM, mmllm_tiny_for

GEN = {"max_new_tokens": 8}


@pytest.fixture(scope="module")
def tokenizer():
    return world_tokenizer()


@pytest.fixture(scope="module")
def mm_model(tokenizer):
    torch.manual_seed(0)
    return MultimodalLM(mmllm_tiny_for(tokenizer)).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory, mm_model, tokenizer):
    """A saved mmllm checkpoint, a saved lm checkpoint and two scene images, in one folder."""
    root = tmp_path_factory.mktemp("chat")
    save_checkpoint(mm_model, root / "mm", tokenizer=tokenizer)
    lm_config = lm_tiny()
    lm_config.vocab_size, lm_config.eos_token_id = tokenizer.vocab_size, tokenizer.eos_token_id
    torch.manual_seed(1)
    save_checkpoint(DecoderLM(lm_config).eval(), root / "lm", tokenizer=tokenizer)
    for k, scene in enumerate(World("val").scenes(2)):
        scene.image().save(root / f"scene{k}.png")
    return root


def _cli(argv, stdin=None):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command", required=True))
    out = io.StringIO()
    run_chat_cli(parser.parse_args(["chat", *argv]), stdin=stdin, out=out)
    return out.getvalue()


def test_prompt_expands_each_image_to_its_tokens(mm_model, tokenizer, files):
    image_id = mm_model.config.image_token_id
    prompt = encode_chat(mm_model, tokenizer, [{"role": "user", "content": "What is it?"}], [files / "scene0.png"])
    assert prompt.ids.count(image_id) == mm_model.image_tokens
    assert prompt.pixels.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="2 '<image>' markers but 1 images"):
        encode_chat(mm_model, tokenizer, [{"role": "user", "content": "<image><image> hi"}], [files / "scene0.png"])


def test_streaming_equals_non_streaming(mm_model, tokenizer, files):
    messages = [{"role": "user", "content": "<image>\nWhat color is the circle?"}]
    for images in ([files / "scene0.png"], []):
        msgs = messages if images else [{"role": "user", "content": "Describe a red circle."}]
        reply = chat(mm_model, tokenizer, msgs, images, **GEN)
        assert reply and "".join(stream_chat(mm_model, tokenizer, msgs, images, **GEN)) == reply


def test_batch_equals_one_at_a_time(mm_model, tokenizer, files):
    requests = [
        ([{"role": "user", "content": "What is the shape of the object in the center?"}], [files / "scene0.png"]),
        ([{"role": "user", "content": "How many objects are there?"}], []),
        ([{"role": "user", "content": "<image> and <image>: same?"}], [files / "scene0.png", files / "scene1.png"]),
    ]
    alone = [chat(mm_model, tokenizer, m, ims, **GEN) for m, ims in requests]
    assert chat_batch(mm_model, tokenizer, requests, batch_size=2, **GEN) == alone
    assert len(set(alone)) > 1  # the image and the question change the reply


def test_session_keeps_turns_and_images(mm_model, tokenizer, files):
    session = ChatSession(mm_model, tokenizer, system="Answer briefly.", **GEN)
    first = session.send("What color is it?", images=[files / "scene0.png"])
    second = "".join(session.stream("And its shape?"))
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages[1]["content"].startswith("<image>\n") and session.messages[2]["content"] == first
    history = session.messages[:4]
    assert second == chat(mm_model, tokenizer, history, [files / "scene0.png"], **GEN)
    session.reset()
    assert session.messages == [{"role": "system", "content": "Answer briefly."}] and not session.images


def test_cli_one_shot_matches_api(mm_model, tokenizer, files):
    image = str(files / "scene0.png")
    out = _cli([str(files / "mm"), "What color is the circle?", "--image", image, "--max-new-tokens", "8"])
    expected = chat(mm_model, tokenizer, [{"role": "user", "content": "What color is the circle?"}], [image], **GEN)
    assert out == expected + "\n"


def test_cli_batch_jsonl(mm_model, tokenizer, files):
    lines = [
        {"id": "a", "messages": [{"role": "user", "content": "<image>\nWhere is the circle?"}], "images": ["scene0.png"]},
        {"prompt": "How many objects are there?", "image": "scene1.png"},
        {"id": 7, "prompt": "Hello"},
    ]
    (files / "requests.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    answers_path = files / "answers.jsonl"
    _cli([str(files / "mm"), "--batch", str(files / "requests.jsonl"), "--out", str(answers_path),
          "--batch-size", "2", "--max-new-tokens", "8"])
    answers = [json.loads(x) for x in answers_path.read_text().splitlines()]
    assert [a["index"] for a in answers] == [0, 1, 2]
    assert [a.get("id") for a in answers] == ["a", None, 7]
    expected = [chat(mm_model, tokenizer, m, ims, **GEN) for m, ims, _ in read_requests(files / "requests.jsonl")]
    assert [a["answer"] for a in answers] == expected


def test_batch_file_errors_name_the_line(files):
    bad = files / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_requests(bad)
    with pytest.raises(ValueError, match="--out"):
        _cli([str(files / "mm"), "--batch", str(bad)])
    for line, message in [('{"messages": ["hi"]}', r"bad.jsonl:1: messages\[0\] must be an object with a 'role'"),
                          ('{"messages": [{"role": "bot", "content": "x"}]}', r"messages\[0\]"),
                          ('{"prompt": "hi", "image": 5}', r"bad.jsonl:1: 'image' must be a file path")]:
        bad.write_text(line + "\n")
        with pytest.raises(ValueError, match=message):
            read_requests(bad)


def test_interactive_session_via_fake_stdin(mm_model, tokenizer, files):
    image = str(files / "scene0.png")
    stdin = io.StringIO(f"/image {image}\nWhat color is it?\n\nAnd the shape?\n/image missing.png\n/reset\n"
                        "Hello\n/quit\nnever read\n")
    out = _cli([str(files / "mm"), "--max-new-tokens", "8"], stdin=stdin)
    session = ChatSession(mm_model, tokenizer, **GEN)
    first = session.send("What color is it?", images=[image])
    second = session.send("And the shape?")
    fresh = ChatSession(mm_model, tokenizer, **GEN).send("Hello")
    # The untrained model's replies are arbitrary text (newlines and \x0b included), so the
    # transcript is matched as a whole rather than split into lines.
    head = f"[attached {image}]\n{first}\n{second}\n[error:"
    tail = f"\n[conversation reset]\n{fresh}\n"
    assert out.startswith(head) and out.endswith(tail)
    assert "missing.png" in out[len(head):-len(tail)]


def test_text_only_lm_checkpoint(files):
    from polymodal.api import load

    model, tokenizer = load(files / "lm")
    messages = [{"role": "user", "content": "Is there a red circle?"}]
    reply = chat(model, tokenizer, messages, **GEN)
    assert "".join(stream_chat(model, tokenizer, messages, **GEN)) == reply
    assert _cli([str(files / "lm"), "Is there a red circle?", "--max-new-tokens", "8"]) == reply + "\n"
    with pytest.raises(ValueError, match="text-only"):
        chat(model, tokenizer, messages, [files / "scene0.png"])
    out = _cli([str(files / "lm"), "--max-new-tokens", "8"], stdin=io.StringIO("/image x.png\nHi\n"))
    assert out.splitlines()[0].startswith("[error:") and "text-only" in out
