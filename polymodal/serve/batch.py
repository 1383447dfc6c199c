"""The running decode batch of the server: KV-cached rows that join and leave between steps.

`polymodal.infer.generate.generate` decodes one fixed batch to its end. A server cannot wait
for that: requests arrive while others are half done. `DecodeBatch` keeps the rows being decoded
in one KV cache and lets rows join (after a batched prefill of the newcomers) and leave (finished,
or their client gone) between any two steps: continuous batching.

How rows of different lengths share one cache. All rows share one write offset (`KVCache` is a
dense (B, H, S, D) tensor per layer); each row's real keys are a contiguous run at the right end
and a (B, S) key mask marks them. The decoder derives each token's position from the mask
(`cumsum` of real keys), so a row decodes exactly as it would alone however much padding stands
to its left. Joining or leaving rebuilds the cache: the kept rows' right-aligned runs are copied
into a fresh cache only as wide as the longest run, plus room for the longest remaining reply, so
the shared offset never grows beyond one request's length however long the server runs.

Sampling is per row (each row its own temperature / top-k / top-p and its own seeded
generator), so greedy and sampled requests share a batch, and a seeded request draws the same
tokens whatever else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from polymodal.infer.generate import left_pad, sample_next_token


@dataclass
class Row:
    """One sequence being decoded: a choice of a request.

    ids: the prompt (T,); pixels: its images (N, 3, H, W) or None; limit: most new tokens;
    temperature / top_k / top_p: its sampling; generator: its seeded RNG (None when greedy);
    count: tokens generated so far; owner: the engine's record of the choice (opaque here).
    """

    ids: list[int]
    pixels: torch.Tensor | None
    limit: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    count: int = 0
    owner: object = None


class DecodeBatch:
    """The rows being decoded, their KV cache (B, H, S, D per layer), key mask (B, S) and the
    logits (B, V) their next tokens are sampled from.

    model: a decoder with `new_kv_cache(batch, max_len)` and the `polymodal.infer.generate`
    forward contract; models that read images also give `embed(ids, pixels)`.
    suppress: token ids never sampled (an image placeholder).
    """

    def __init__(self, model, suppress: tuple[int, ...] = ()):
        self.model = model
        self.device = next(model.parameters()).device
        self.suppress = torch.tensor(list(suppress), dtype=torch.long, device=self.device)
        placeholder = getattr(getattr(model, "config", None), "image_token_id", None)
        # Left padding must never read as an image placeholder (the embedders scan ids for it).
        self.pad_id = 1 if placeholder == 0 else 0
        self.clear()

    def clear(self) -> None:
        """Drop every row and the cache."""
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # (B, S) 1 = a real key
        self.logits: torch.Tensor | None = None  # (B, V)

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def add(self, rows: list[Row]) -> None:
        """Prefill `rows` together (left-padded) and join them to the batch."""
        ids, mask = left_pad([row.ids for row in rows], pad_id=self.pad_id)  # (B, T) each
        ids, mask = ids.to(self.device), mask.to(self.device)
        room = max(row.limit - row.count for row in rows + self.rows)
        cache = self.model.new_kv_cache(len(rows), ids.shape[1] + (0 if self.rows else room))
        padded = bool((mask == 0).any())
        pixels = [row.pixels for row in rows if row.pixels is not None]
        if pixels:
            # Placeholders are filled in row-major order, which is the order of `pixels`.
            embeds = self.model.embed(ids, torch.cat(pixels).to(self.device))  # (B, T, D)
            extra = {"image_mask": self.model.image_slots(ids, mask)} if hasattr(self.model, "image_slots") else {}
            out = self.model(None, inputs_embeds=embeds, attention_mask=mask if padded else None, kv_cache=cache,
                             logits_to_keep=1, **extra)
        else:
            out = self.model(ids, attention_mask=mask if padded else None, kv_cache=cache, logits_to_keep=1)
        logits = out.logits[:, -1]  # (B, V)
        if not self.rows:
            self.rows, self.cache, self.mask, self.logits = list(rows), cache, mask, logits
            return
        every = torch.arange(len(self.rows), device=self.device)
        fresh = torch.arange(len(rows), device=self.device)
        self.cache, self.mask = self._rebuild([(self.cache, self.mask, every), (cache, mask, fresh)], room)
        self.rows = self.rows + list(rows)
        self.logits = torch.cat([self.logits, logits])

    def sample(self) -> list[int]:
        """The next token of every row, each with its own sampling settings and generator."""
        logits = self.logits
        if self.suppress.numel():
            logits = logits.index_fill(-1, self.suppress, float("-inf"))
        tokens = logits.argmax(-1)  # (B,)
        for i, row in enumerate(self.rows):
            if row.temperature > 0:
                tokens[i] = sample_next_token(logits[i:i + 1], row.temperature, row.top_k, row.top_p, row.generator)[0]
        return tokens.tolist()

    @torch.no_grad()
    def advance(self, tokens: list[int], keep: list[bool]) -> None:
        """Drop the rows whose `keep` is False, then run one decode step feeding each kept row its token."""
        kept = [i for i, k in enumerate(keep) if k]
        if not kept:
            self.clear()
            return
        if len(kept) < len(self.rows):
            index = torch.tensor(kept, device=self.device)
            self.rows = [self.rows[i] for i in kept]
            room = max(row.limit - row.count for row in self.rows)
            self.cache, self.mask = self._rebuild([(self.cache, self.mask, index)], room)
        ids = torch.tensor([[tokens[i]] for i in kept], dtype=torch.long, device=self.device)  # (B, 1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(kept), 1))], dim=1)
        padded = not bool(self.mask.all())
        out = self.model(ids, attention_mask=self.mask if padded else None, kv_cache=self.cache, logits_to_keep=1)
        self.logits = out.logits[:, -1]

    def _rebuild(self, parts: list[tuple], room: int):
        """A new (cache, mask) holding the selected rows of each (cache, mask, row index) part, in
        order, right-aligned, as wide as the longest run of real keys plus `room` positions."""
        widths = [int(mask[index].sum(1).max()) for _, mask, index in parts]
        width = max(widths)
        cache = self.model.new_kv_cache(sum(len(index) for _, _, index in parts), width + room)
        mask = torch.zeros((cache.keys[0].shape[0], width), dtype=parts[0][1].dtype, device=self.device)
        start = 0
        for (old, old_mask, index), w in zip(parts, widths):
            end, length = start + len(index), old.length
            for layer in range(len(cache.keys)):
                cache.keys[layer][start:end, :, width - w:width] = old.keys[layer][index, :, length - w:length]
                cache.values[layer][start:end, :, width - w:width] = old.values[layer][index, :, length - w:length]
            mask[start:end, width - w:] = old_mask[index, length - w:length]
            start = end
        cache.length = width
        return cache, mask
