"""Request bodies of the OpenAI-compatible routes, as pydantic models.

Fields follow OpenAI's API. Unknown fields are refused (422, naming the field) rather than
ignored: a client asking for `logprobs` or `tools` learns this server does not do them instead of
getting an answer that silently lacks them. Ranges are checked here so every out-of-range value
is a 422 naming its field; what depends on the model (context length, image sizes) is checked
when the request is encoded (400).
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

MAX_STOPS = 4  # OpenAI's limit on stop sequences
MAX_SEED = 2**63 - 1

Number = Union[StrictInt, StrictFloat]


class Strict(BaseModel):
    """Base of every request model: unknown fields are errors, no type coercion ("1" is not 1)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ImageURL(Strict):
    """An image reference: a `data:image/...;base64,` URL, or `file://` under --image-root. `detail` is
    accepted for OpenAI clients that always send it; the model sees every image at its one resolution."""

    url: StrictStr
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(Strict):
    """A text part of a message's content."""

    type: Literal["text"]
    text: StrictStr


class ImagePart(Strict):
    """An image part of a message's content."""

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(Strict):
    """One chat message; content is a string or a list of text / image_url parts."""

    role: Literal["system", "user", "assistant", "developer"]
    content: Union[StrictStr, list[ContentPart]]


class StreamOptions(Strict):
    """stream_options: include_usage adds a last chunk holding the token counts."""

    include_usage: StrictBool = False


class Sampling(Strict):
    """The generation fields shared by chat and plain completions."""

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=0)
    n: StrictInt = Field(1, ge=1)
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None  # the end user's id, written to the request log

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @property
    def stops(self) -> tuple[str, ...]:
        """The stop sequences as a tuple (the validator turned a string into a one-item list)."""
        return tuple(self.stop or ())


class ChatCompletionRequest(Sampling):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens


class CompletionRequest(Sampling):
    """POST /v1/completions: one prompt, or a list of prompts (each gets n choices)."""

    prompt: Union[StrictStr, list[StrictStr]]
    max_tokens: StrictInt | None = Field(16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("give at least one prompt")
        return value


class EmbeddingImage(Strict):
    """An image to embed (an extension of OpenAI's text-only input): {"type": "image_url", ...}."""

    type: Literal["image_url"]
    image_url: ImageURL


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's cap on one embeddings request


class EmbeddingRequest(Strict):
    """POST /v1/embeddings: texts (and, for image-text models, images) to embed."""

    model: StrictStr
    input: Union[StrictStr, list[Union[StrictStr, EmbeddingImage]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(None, ge=1)
    user: StrictStr | None = None

    @field_validator("input")
    @classmethod
    def _inputs(cls, value):
        items = [value] if isinstance(value, str) else value
        if not items:
            raise ValueError("give at least one input")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request (OpenAI's limit), got {len(items)}")
        return items


class ImageGenerationRequest(Strict):
    """POST /v1/images/generations."""

    prompt: StrictStr = Field(min_length=1)
    model: StrictStr
    n: StrictInt = Field(1, ge=1)
    size: StrictStr | None = None
    response_format: Literal["b64_json"] = "b64_json"
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    output_format: Literal["png"] = "png"
    user: StrictStr | None = None
