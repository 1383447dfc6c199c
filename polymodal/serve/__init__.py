"""An OpenAI-compatible HTTP server for any polymodal model: `polymodal serve CHECKPOINT`.

What a model serves follows from its declared tasks: `chat` -> /v1/chat/completions (text and
images in, streamed text out), `complete` -> /v1/completions, `embed` -> /v1/embeddings,
`generate_image` -> /v1/images/generations. Modules, one job each:

    config      the limits and their defaults        errors      OpenAI-style error bodies
    schemas     request bodies (pydantic)            images      image_url decoding and limits
    tasks       requests -> prompts, embeddings, images
    engine      the worker thread and bounded queue  batch       continuous batching over the KV cache
    reply       streamed text and stop sequences     responses   response objects, waiting for events
    middleware  auth, body limit, request log        metrics     Prometheus counters
    app         the FastAPI app and its routes       background  a server on a thread (tests, benchmarks)
    cli         `polymodal serve`                    static/     the web page served at /
"""
from polymodal.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def create_app(model, tokenizer, config: ServeConfig | None = None):
    """The FastAPI app serving `model`; see `polymodal.serve.app.create_app`."""
    from polymodal.serve.app import create_app as build

    return build(model, tokenizer, config)
