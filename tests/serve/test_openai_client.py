"""The official `openai` client against live servers: every route, streaming, n, stop lists, seeds,
image generation decoded back to PNG, embeddings, and one error case per status code."""
from __future__ import annotations

import base64
import io
import threading

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from polymodal.eval.contrastive import encode_texts
from polymodal.infer.chat import chat as library_chat
from polymodal.infer.images import generate_images

from serve_helpers import API_KEY, data_url, start


def client(server, key: str = "unused", **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, **options)


def image_message(scene, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(scene)}},
                                         {"type": "text", "text": text}]}]


def test_models_lists_the_tasks(unified_server, clip_server):
    card = client(unified_server).models.retrieve("unified")
    assert card.id == "unified"
    assert set(card.model_extra["tasks"]) == {"complete", "chat", "generate_image"}
    assert card.model_extra["reads_images"] is True
    assert [m.id for m in client(clip_server).models.list()] == ["clip"]
    assert client(clip_server).models.retrieve("clip").model_extra["tasks"] == ["embed"]


def test_chat_with_a_data_url_image_answers_as_the_library_does(unified_server, loaded, scene):
    messages = image_message(scene, "What color is the circle?")
    reply = client(unified_server).chat.completions.create(model="unified", messages=messages, max_tokens=12,
                                                           temperature=0)
    model, tokenizer = loaded["unified"]
    expected = library_chat(model, tokenizer, [{"role": "user", "content": "<image>\nWhat color is the circle?"}],
                            images=[scene], max_new_tokens=12)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > model.image_tokens  # the image's span is in the prompt
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.object == "chat.completion" and reply.model == "unified"


@pytest.mark.parametrize("name", ["unified", "slow_lm"])
def test_streaming_pieces_join_to_the_whole_reply(name, unified_server, slow_server, scene):
    server = unified_server if name == "unified" else slow_server
    c = client(server)
    messages = image_message(scene, "Describe the scene.") if name == "unified" else [
        {"role": "user", "content": "Describe the scene."}]
    whole = c.chat.completions.create(model=name, messages=messages, max_tokens=20, temperature=0)
    chunks = list(c.chat.completions.create(model=name, messages=messages, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    if name == "slow_lm":  # a random LM talks until max_tokens: many pieces
        assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) >= 5
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices_with_a_seed_are_reproducible(unified_server):
    c = client(unified_server)
    ask = dict(model="unified", messages=[{"role": "user", "content": "What shapes do you see?"}], max_tokens=10,
               temperature=1.0, n=2, seed=7)
    first, again = c.chat.completions.create(**ask), c.chat.completions.create(**ask)
    assert [ch.index for ch in first.choices] == [0, 1]
    assert [ch.message.content for ch in first.choices] == [ch.message.content for ch in again.choices]
    assert first.usage.completion_tokens >= 2  # both choices count
    greedy = c.chat.completions.create(**{**ask, "temperature": 0})
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_a_stop_list_cuts_the_reply_before_the_stop(slow_server):
    c = client(slow_server)
    ask = dict(model="slow_lm", messages=[{"role": "user", "content": "Name a shape."}], max_tokens=30, temperature=0)
    full = c.chat.completions.create(**ask).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]  # three characters from the middle of the reply
    assert len(stop) == 3, full
    cut = c.chat.completions.create(**ask, stop=["never said", stop])
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    chunks = c.chat.completions.create(**ask, stop=[stop], stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == cut.choices[0].message.content


def test_completions_take_a_list_of_prompts(unified_server):
    reply = client(unified_server).completions.create(model="unified", prompt=["A large", "The"], max_tokens=4, n=2,
                                                      temperature=0)
    assert [ch.index for ch in reply.choices] == [0, 1, 2, 3]
    assert reply.choices[0].text == reply.choices[1].text and reply.choices[2].text == reply.choices[3].text


def test_image_generation_decodes_to_the_library_png(unified_server, loaded):
    prompt = "A large red star is in the center."
    result = client(unified_server).images.generate(model="unified", prompt=prompt, n=2, size="16x16",
                                                    response_format="b64_json", extra_body={"seed": 3})
    images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in result.data]
    assert [im.format for im in images] == ["PNG", "PNG"] and images[0].size == (16, 16)
    model, tokenizer = loaded["unified"]
    expected = generate_images(model, [prompt], tokenizer, n=2, seed=3)
    for got, want in zip(images, expected):
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))


def test_embeddings_match_the_library_in_float_and_base64(clip_server, loaded, scene):
    model, tokenizer = loaded["clip"]
    texts = ["a red circle", "a blue square"]
    expected = encode_texts(model, tokenizer, texts).numpy()
    c = client(clip_server)
    as_base64 = c.embeddings.create(model="clip", input=texts)  # the client asks for base64 and decodes it
    as_float = c.embeddings.create(model="clip", input=texts, encoding_format="float")
    for result in (as_base64, as_float):
        assert np.allclose(np.array([d.embedding for d in result.data]), expected, atol=1e-6)
    assert as_float.usage.prompt_tokens > 0
    mixed = httpx.post(clip_server.url + "/v1/embeddings", json={
        "model": "clip", "input": ["a red circle", {"type": "image_url", "image_url": {"url": data_url(scene)}}]})
    vectors = np.array([d["embedding"] for d in mixed.json()["data"]])
    assert vectors.shape == (2, expected.shape[1]) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_one_error_per_status(keyed_server, loaded, scene):
    good = client(keyed_server, API_KEY)
    with pytest.raises(openai.BadRequestError, match="does not fetch remote URLs") as err:
        good.chat.completions.create(model="unified", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert err.value.body["param"] == "messages[0].content[0].image_url"
    with pytest.raises(openai.AuthenticationError):
        client(keyed_server, "wrong").models.list()
    with pytest.raises(openai.NotFoundError) as err:
        good.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.APIStatusError) as err:
        good.chat.completions.create(model="unified", messages=[{"role": "user", "content": "x" * 2_000_000}])
    assert err.value.status_code == 413
    with pytest.raises(openai.UnprocessableEntityError) as err:
        good.chat.completions.create(model="unified", messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert err.value.body["param"] == "temperature"
    assert good.chat.completions.create(model="unified", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=2).choices[0].finish_reason


def test_a_full_queue_answers_429_and_the_server_recovers(loaded):
    server = start(loaded, "slow_lm", max_batch=1, max_queue=1)
    c = client(server)
    outcomes = []

    def ask():
        try:
            c.completions.create(model="slow_lm", prompt="A", max_tokens=400)
            outcomes.append(200)
        except openai.RateLimitError as err:
            assert err.body["code"] == "queue_full"
            outcomes.append(429)

    try:
        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 429 in outcomes and 200 in outcomes and len(outcomes) == 6
        assert c.completions.create(model="slow_lm", prompt="A", max_tokens=2).choices[0].text is not None
        metrics = httpx.get(server.url + "/metrics").text
        assert 'polymodal_requests_total{route="/v1/completions",status="429"}' in metrics
    finally:
        server.stop()


def test_a_request_past_its_timeout_gets_504_and_a_stream_gets_an_error_event(loaded):
    server = start(loaded, "slow_lm", timeout_s=0.3)
    c = client(server)
    try:
        with pytest.raises(openai.APIStatusError) as err:
            c.completions.create(model="slow_lm", prompt="A", max_tokens=3000)
        assert err.value.status_code == 504
        with pytest.raises(openai.APIError, match="timed out"):
            list(c.completions.create(model="slow_lm", prompt="A", max_tokens=3000, stream=True))
        assert c.completions.create(model="slow_lm", prompt="A", max_tokens=2).choices[0].finish_reason == "length"
    finally:
        server.stop()


def test_a_latent_diffusion_model_draws_at_its_size_and_twice_it():
    import torch

    from polymodal.models.registry import get_family
    from polymodal.serve import ServeConfig, create_app
    from polymodal.serve.background import BackgroundServer

    family = get_family("latent_diffusion")
    torch.manual_seed(0)
    model = family.build(family.tiny()).eval()  # class-conditional, no tokenizer; the VAE upsamples 4x
    with BackgroundServer(create_app(model, None, ServeConfig(model_name="ldm"))) as server:
        c = client(server)
        side = c.models.retrieve("ldm").model_extra["image_size"]
        for size, expected in ((None, side), (f"{side}x{side}", side), (f"{2 * side}x{2 * side}", 2 * side)):
            extra = {"size": size} if size else {}
            data = c.images.generate(model="ldm", prompt="3", n=1, extra_body={"seed": 0}, **extra).data
            assert Image.open(io.BytesIO(base64.b64decode(data[0].b64_json))).size == (expected, expected)
        with pytest.raises(openai.BadRequestError, match="not supported"):
            c.images.generate(model="ldm", prompt="3", size=f"{side + 1}x{side + 1}")
        with pytest.raises(openai.BadRequestError, match="cannot chat|can: generate_image"):
            c.chat.completions.create(model="ldm", messages=[{"role": "user", "content": "hi"}])
