"""Continuous batching: rows that join and leave a running batch decode exactly as alone; concurrent
requests share forward passes and get the answers they would get one at a time; a seeded sample
does not depend on its batch; a client that leaves mid-stream frees its slot."""
from __future__ import annotations

import threading
import time

import httpx
import openai

from polymodal.infer.chat import encode_chat
from polymodal.infer.generate import generate
from polymodal.serve import ServeConfig, create_app
from polymodal.serve.background import BackgroundServer
from polymodal.serve.batch import DecodeBatch, Row

from serve_helpers import load_slow_lm, start


def run_batch(model, prompts: list, limits: list[int], joins: dict[int, list[int]]) -> dict[int, list[int]]:
    """Decode with DecodeBatch; prompt i joins at the step given in `joins` (step -> prompt indices)."""
    batch, out, step = DecodeBatch(model, tuple(getattr(model, "generation_suppressed_tokens", lambda: ())())), {}, 0
    waiting = dict(joins)
    while len(batch) or waiting:
        if step in waiting:
            batch.add([Row(prompts[i].ids, prompts[i].pixels, limits[i], owner=i) for i in waiting.pop(step)])
        if not len(batch):
            step = min(waiting)
            continue
        tokens = batch.sample()
        keep = []
        for row, token in zip(batch.rows, tokens):
            row.count += 1
            out.setdefault(row.owner, []).append(token)
            keep.append(row.count < row.limit)
        batch.advance(tokens, keep)
        step += 1
    return out


def test_rows_joining_and_leaving_decode_as_alone(loaded, scene):
    model, tokenizer = loaded["unified"]
    chats = [([{"role": "user", "content": "What color is the circle?"}], [scene]),
             ([{"role": "user", "content": "Hi"}], []),
             ([{"role": "user", "content": "How many objects are in this picture, and where?"}], [scene]),
             ([{"role": "user", "content": "Describe it."}], [scene])]
    prompts = [encode_chat(model, tokenizer, m, ims) for m, ims in chats]
    limits = [12, 4, 12, 9]
    out = run_batch(model, prompts, limits, {0: [0, 1], 3: [2], 6: [3]})
    suppress = model.generation_suppressed_tokens()
    for i, prompt in enumerate(prompts):
        if prompt.pixels is not None:  # the model's own generate suppresses what a text reply never holds
            alone = model.generate([prompt.ids], prompt.pixels, max_new_tokens=limits[i], eos_token_id=[])
        else:
            alone = generate(model, [prompt.ids], max_new_tokens=limits[i], eos_token_id=[], suppress_tokens=suppress)
        assert out[i] == alone[0], i


def test_concurrent_requests_share_forward_passes_and_answer_as_one_at_a_time(checkpoints):
    model, tokenizer = load_slow_lm(checkpoints)
    forwards = []
    original = model.forward
    model.forward = lambda *a, **k: (forwards.append(1), original(*a, **k))[1]
    prompts = ["A", "A red circle and a blue square", "Where is the star?", "Count them", "B", "Is it big?"]

    def answers(max_batch: int) -> list[str]:
        forwards.clear()
        server = BackgroundServer(create_app(model, tokenizer, ServeConfig(model_name="m", max_batch=max_batch)))
        client = openai.OpenAI(base_url=server.start().url + "/v1", api_key="-", max_retries=0)
        texts = [None] * len(prompts)
        go = threading.Barrier(len(prompts))

        def ask(i):
            go.wait()
            texts[i] = client.completions.create(model="m", prompt=prompts[i], max_tokens=16, temperature=0) \
                .choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        server.stop()
        return texts

    one_at_a_time = answers(1)
    passes_alone = len(forwards)
    batched = answers(8)
    assert batched == one_at_a_time
    assert passes_alone == len(prompts) * 16  # a prefill and 15 decode steps each
    assert len(forwards) < passes_alone / 2  # rows shared most steps


def test_a_seeded_sample_does_not_depend_on_its_batch(slow_server):
    client = openai.OpenAI(base_url=slow_server.url + "/v1", api_key="-", max_retries=0)
    ask = dict(model="slow_lm", prompt="A small", max_tokens=12, temperature=0.9, top_p=0.95, seed=11)
    alone = client.completions.create(**ask).choices[0].text
    answered = []

    def other(k: int) -> None:
        answered.append(client.completions.create(model="slow_lm", prompt="Other " * k, max_tokens=30,
                                                  temperature=1.0).choices[0].text)

    crowd = [threading.Thread(target=other, args=(k,)) for k in range(1, 4)]
    for t in crowd:
        t.start()
    assert wait_for(lambda: httpx.get(slow_server.url + "/health").json()["batch_rows"] >= 2)  # the crowd is decoding
    together = client.completions.create(**ask).choices[0].text
    for t in crowd:
        t.join()
    assert len(answered) == 3  # every crowd request was answered (an exception there would leave it out)
    assert together == alone


def wait_for(condition, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_client_leaving_mid_stream_frees_its_slot(loaded):
    server = start(loaded, "slow_lm", max_batch=1)
    try:
        body = {"model": "slow_lm", "prompt": "A", "max_tokens": 3000, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            assert httpx.get(server.url + "/health").json()["batch_rows"] == 1
        # The connection is closed after one event: the row leaves the batch long before its 3000 tokens.
        assert wait_for(lambda: httpx.get(server.url + "/health").json()["batch_rows"] == 0)
        reply = httpx.post(server.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 3})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
        # A client that gives up on a non-streamed answer: the server notices while waiting and frees the row.
        try:
            httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=0.3)
        except httpx.TimeoutException:
            pass
        assert wait_for(lambda: httpx.get(server.url + "/health").json()["batch_rows"] == 0)
        metrics = httpx.get(server.url + "/metrics").text
        assert 'polymodal_requests_total{route="/v1/completions",status="499"} 1.0' in metrics
    finally:
        server.stop()
