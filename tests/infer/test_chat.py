"""The chat API (messages in, a reply or a stream out, batched) on tiny multimodal and text-only models."""
import ast
import copy
import inspect

import pytest

import polymodal.infer.chat as chat_module
from polymodal.errors import UsageError
from polymodal.infer.chat import (
    ChatSession,
    chat,
    chat_batch,
    encode_chat,
    fit_chat_prompt,
    generate_replies,
    stream_chat,
)
from polymodal.infer.limits import ContextWarning

GEN = {"max_new_tokens": 8}


def with_context(model, tokens):
    """A copy of `model` whose context is `tokens` long."""
    model = copy.deepcopy(model)
    config = getattr(model.config, "lm", model.config)
    config.max_position_embeddings = tokens
    return model


def test_prompt_expands_each_image_to_its_tokens(mm_model, tokenizer, files):
    image_id = mm_model.config.image_token_id
    prompt = encode_chat(mm_model, tokenizer, [{"role": "user", "content": "What is it?"}], [files / "scene0.png"])
    assert prompt.ids.count(image_id) == mm_model.image_tokens
    assert prompt.pixels.shape == (1, 3, 32, 32)
    with pytest.raises(UsageError, match="2 '<image>' markers but 1 images"):
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
    done = []
    assert chat_batch(mm_model, tokenizer, requests, batch_size=2, on_progress=done.append, **GEN) == alone
    assert done == [2, 1]
    assert len(set(alone)) > 1  # the image and the question change the reply
    with pytest.raises(UsageError, match="batch_size must be an integer >= 1, got 0"):
        chat_batch(mm_model, tokenizer, requests, batch_size=0)


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


def test_a_failed_turn_leaves_the_session_as_it_was(mm_model, tokenizer, files):
    session = ChatSession(with_context(mm_model, 40), tokenizer, **GEN)
    session.send("Hi")
    before = [dict(m) for m in session.messages]
    with pytest.raises(UsageError, match="longer than the model's context of 40 tokens"):
        session.send("What color is the big circle on the left of the red square? " * 3)
    with pytest.raises(UsageError, match="longer than the model's context"):
        session.stream("What color is the big circle on the left of the red square? " * 3)
    with pytest.raises(Exception, match="missing.png"):
        session.send("What is it?", images=[files / "missing.png"])
    assert session.messages == before and not session.images and not session.pending
    unread = session.stream("Never read")  # a stream nobody reads adds no turn
    del unread
    assert session.messages == before


def test_streams_check_the_request_when_called(mm_model, tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_new_tokens": -2}):
        name, value = next(iter(bad.items()))
        with pytest.raises(UsageError, match=rf"{name} must be .*, got {value}"):
            stream_chat(mm_model, tokenizer, messages, **bad)  # not iterated: raised at the call
        with pytest.raises(UsageError, match=name):
            chat(mm_model, tokenizer, messages, **bad)


def test_long_prompt_is_refused_or_truncated_whole_images_at_a_time(mm_model, tokenizer, files):
    k, image_id = mm_model.image_tokens, mm_model.config.image_token_id
    messages = [{"role": "user", "content": "<image> first, <image> second: which is red?"}]
    images = [files / "scene0.png", files / "scene1.png"]
    prompt = encode_chat(mm_model, tokenizer, messages, images)
    slots = [i for i, t in enumerate(prompt.ids) if t == image_id]
    n = len(prompt.ids)
    # A budget that cuts into the first image: that image goes whole, the second stays.
    model = with_context(mm_model, n - (slots[0] + 3) + 8)
    with pytest.raises(UsageError, match=rf"the prompt is {n} tokens, longer than the model's context of {n - 1} "):
        chat(with_context(mm_model, n - 1), tokenizer, messages, images, **GEN)
    with pytest.warns(ContextWarning, match=rf"prompt of {n} tokens was truncated to its last {n - slots[k - 1] - 1}"):
        fitted = fit_chat_prompt(model, prompt, max_new_tokens=8, truncate=True)
    assert fitted.ids == prompt.ids[slots[k - 1] + 1:] and fitted.pixels.shape[0] == 1
    assert fitted.ids.count(image_id) == k
    # Cutting into the last image drops every image; the reply still comes.
    model = with_context(mm_model, n - slots[-1] + 8)
    with pytest.warns(ContextWarning):
        fitted = fit_chat_prompt(model, prompt, max_new_tokens=8, truncate=True)
        reply = chat(model, tokenizer, messages, images, truncate=True, **GEN)
    assert fitted.pixels is None and image_id not in fitted.ids
    assert reply == generate_replies(model, tokenizer, [fitted], **GEN)[0]


def test_reply_stops_at_the_context_with_one_warning(files):
    from polymodal.api import load

    model, tokenizer = load(files / "lm")
    messages = [{"role": "user", "content": "Is there a red circle?"}]
    n = len(encode_chat(model, tokenizer, messages).ids)
    small = with_context(model, n + 3)
    with pytest.warns(ContextWarning, match=rf"prompt \({n} tokens\) \+ max_new_tokens \(50\) exceeds the model's "
                                            rf"context of {n + 3} tokens") as caught:
        reply = chat(small, tokenizer, messages, max_new_tokens=50, eos_token_id=[])
    assert len([w for w in caught if w.category is ContextWarning]) == 1
    assert reply == chat(small, tokenizer, messages, max_new_tokens=3, eos_token_id=[])


def test_text_only_lm_checkpoint(files):
    from polymodal.api import load

    model, tokenizer = load(files / "lm")
    messages = [{"role": "user", "content": "Is there a red circle?"}]
    reply = chat(model, tokenizer, messages, **GEN)
    assert "".join(stream_chat(model, tokenizer, messages, **GEN)) == reply
    with pytest.raises(UsageError, match="text-only"):
        chat(model, tokenizer, messages, [files / "scene0.png"])
    with pytest.raises(UsageError, match="text-only"):
        ChatSession(model, tokenizer).attach(files / "scene0.png")


def test_the_api_module_never_touches_the_terminal():
    # The chat API is shared with a server: no printing, no stdin/stdout, no argument parsing.
    tree = ast.parse(inspect.getsource(chat_module))
    calls = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    imports = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
               for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                          if isinstance(node, ast.ImportFrom) and node.module}
    assert not calls & {"print", "input"} and not imports & {"sys", "argparse", "tqdm"}
