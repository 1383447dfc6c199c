"""The shared multimodal sequence: documents of segments, padding-free packing, one attention rule.

A `Document` is an ordered list of `Segment`s (text tokens, an image as pixels/codes/latents,
audio, video). Each model family decides how a segment becomes embeddings; this module only
decides *where* every segment goes and *who may attend to whom*:

- `pack_documents` fills rows up to a token budget with whole documents (first-fit decreasing,
  no padding inside a row; only a row's tail is padded), recording per position the document id,
  the position within its document, the segment id and whether that segment is bidirectional.
- The attention rule (DESIGN.md §2): query q may see key k iff
  same document AND (k is not after q OR q and k lie in the same bidirectional segment).
  All-causal documents give LLaVA/Chameleon; bidirectional image spans inside causal text give
  Transfusion/Show-o; several documents per row give LWM-style masked sequence packing.
- The rule compiles to a dense boolean mask for SDPA (CPU) or a FlexAttention block mask (CUDA),
  where fully-masked blocks between documents are skipped entirely.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100


# What a segment's positions are trained to predict (`Segment.target`); the packer records each
# kind where the objectives in `polymodal.train.objectives` read it.
NEXT_TOKEN = "next_token"  # each token is predicted from the position before it (PackedBatch.labels)
MASKED_TOKEN = "masked_token"  # the `masked` positions predict `targets` at themselves (PackedBatch.masked_labels)
PAYLOAD = "payload"  # the family regresses the segment's payload (diffusion); listed in PackedBatch.placements
TARGETS = (NEXT_TOKEN, MASKED_TOKEN, PAYLOAD, None)


@dataclass
class Segment:
    """One span of a document.

    modality: "text", "image", "audio" or "video".
    tokens: (L,) int64 ids for text or discrete codes (the model's inputs); None for continuous segments.
    data: the raw payload of a continuous segment (pixels (C, H, W), latents, audio features);
        the family's encoder/projector turns it into `length` embeddings.
    length: positions the segment occupies; defaults to len(tokens).
    bidirectional: positions inside this segment see each other regardless of order.
    target: what the segment is trained on (one of TARGETS): NEXT_TOKEN (the default for token
        segments), MASKED_TOKEN (with `masked`, and `targets` when the inputs were corrupted),
        PAYLOAD (a regression/diffusion target on `data`), or None (conditioning only: prompts,
        input images).
    masked: (L,) bool, MASKED_TOKEN only: the positions whose target is scored.
    targets: (L,) int64, MASKED_TOKEN only: the ids to predict (default: `tokens`), so the inputs
        can carry a mask id where the targets keep the original codes (Show-o, BEiT).
    """

    modality: str = "text"
    tokens: torch.Tensor | None = None
    data: torch.Tensor | None = None
    length: int | None = None
    bidirectional: bool = False
    target: str | None = NEXT_TOKEN
    masked: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    def __post_init__(self):
        if self.tokens is not None:
            self.tokens = torch.as_tensor(self.tokens, dtype=torch.long).reshape(-1)
            if self.length is None:
                self.length = int(self.tokens.numel())
            elif self.length != self.tokens.numel():
                raise ValueError(f"segment length {self.length} != len(tokens) {self.tokens.numel()}")
        if self.length is None:
            raise ValueError(f"{self.modality} segment needs `tokens` or an explicit `length`")
        if self.target not in TARGETS:
            raise ValueError(f"segment target must be one of {TARGETS}, got {self.target!r}")
        if self.target == NEXT_TOKEN and self.tokens is None:
            self.target = None  # a payload-only segment has no tokens to predict
        if self.target == MASKED_TOKEN:
            if self.masked is None:
                raise ValueError("a masked_token segment needs `masked`: the (L,) bool positions to score")
            self.masked = torch.as_tensor(self.masked, dtype=torch.bool).reshape(-1)
            self.targets = torch.as_tensor(self.tokens if self.targets is None else self.targets,
                                           dtype=torch.long).reshape(-1)
            for name in ("masked", "targets"):
                if getattr(self, name).numel() != self.length:
                    raise ValueError(f"masked_token segment: `{name}` has {getattr(self, name).numel()} entries "
                                     f"for {self.length} positions")
        elif self.masked is not None or self.targets is not None:
            raise ValueError(f"`masked` / `targets` belong to masked_token segments, not target={self.target!r}")


@dataclass
class Document:
    """An ordered list of segments; its positions restart at 0 when packed."""

    segments: list[Segment] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(s.length for s in self.segments)

    @classmethod
    def from_tokens(cls, tokens, target: str | None = NEXT_TOKEN) -> "Document":
        """A text-only document from a list/tensor of token ids."""
        return cls([Segment("text", tokens=tokens, target=target)])


@dataclass
class Placement:
    """Where a segment with a payload landed: row, first position, length, and the segment.

    Every segment with `data` (or without tokens) gets one, in row-major layout order, so a
    family can scatter encoder outputs into exactly these positions. A segment may carry both
    placeholder `tokens` (e.g. K copies of an `<image>` id, HF-LLaVA style) and `data` (pixels).
    """

    row: int
    start: int
    length: int
    document: int
    segment: Segment


@dataclass
class PackedBatch:
    """Rows of packed documents. Every per-position tensor is (R, L).

    token_ids: ids of token segments (pad_id at continuous segments and padding);
    document_ids: index of the source document (-1 for padding);
    positions: position within the document (restarts at 0 per document);
    segment_ids: a row-unique id per segment (-1 for padding);
    bidirectional: whether the position's segment is bidirectional;
    labels: next-token targets (IGNORE_INDEX where none): labels[t] is the id at t+1;
    masked_labels: masked-token targets at the masked positions themselves (IGNORE_INDEX elsewhere);
    placements: segments with payloads, to be filled with embeddings by the family (layout order);
    document_rows: for each input document, (row, start) where it was placed.
    """

    token_ids: torch.Tensor
    document_ids: torch.Tensor
    positions: torch.Tensor
    segment_ids: torch.Tensor
    bidirectional: torch.Tensor
    labels: torch.Tensor
    masked_labels: torch.Tensor
    placements: list[Placement]
    document_rows: list[tuple[int, int]]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) positions in the batch."""
        return int((self.document_ids >= 0).sum())

    def to(self, device) -> "PackedBatch":
        """The batch with its tensors on `device` (placements' payloads move lazily with the family)."""
        moved = {k: getattr(self, k).to(device) for k in
                 ("token_ids", "document_ids", "positions", "segment_ids", "bidirectional", "labels",
                  "masked_labels")}
        return PackedBatch(**moved, placements=self.placements, document_rows=self.document_rows)

    def payload_placements(self) -> list[Placement]:
        """The placements whose segment carries a PAYLOAD target (diffusion/regression), in layout order."""
        return [p for p in self.placements if p.segment.target == PAYLOAD]

    def dense_mask(self) -> torch.Tensor:
        """The attention rule as a boolean mask (R, 1, L, L), True = may attend."""
        return attention_rule_dense(self.document_ids, self.segment_ids, self.bidirectional)

    def block_mask(self):
        """The attention rule as a FlexAttention BlockMask (for CUDA tensors)."""
        return attention_rule_block_mask(self.document_ids, self.segment_ids, self.bidirectional)

    def document_spans(self) -> "DocumentSpans":
        """The documents' (row, start, end) extents, for causal-only batches (see `DocumentSpans`)."""
        return DocumentSpans.of(self.document_ids)

    def attention_mask(self):
        """The fastest mask form for the batch's device: a BlockMask on CUDA; on CPU, document spans
        when every segment is causal (attention then runs per document, never over the
        cross-document pairs a dense mask would compute and discard), else the dense mask."""
        if self.document_ids.is_cuda:
            return self.block_mask()
        return self.dense_mask() if bool(self.bidirectional.any()) else self.document_spans()


@dataclass(frozen=True)
class DocumentSpans:
    """Causal attention within each document of packed rows, as (row, start, end) spans.

    The CPU form of the attention rule when no segment is bidirectional: `polymodal.nn.attention`
    runs one fused causal SDPA call per span (variable-length attention), so the cost follows
    sum(len^2) over documents instead of rows x L^2. Positions outside every span (row padding)
    get zero outputs. rows, length: the (R, L) shape the spans lay in.
    """

    spans: tuple[tuple[int, int, int], ...]
    rows: int
    length: int

    @classmethod
    def of(cls, document_ids: torch.Tensor) -> "DocumentSpans":
        """Spans of maximal runs of one document id >= 0 in (R, L) `document_ids`."""
        ids = document_ids.cpu()
        rows, length = ids.shape
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        row, start = starts.nonzero(as_tuple=True)  # run starts in row-major order
        end = torch.full_like(start, length)  # a run ends where the next one in its row starts
        end[:-1] = torch.where(row[1:] == row[:-1], start[1:], length)
        real = ids[row, start] >= 0
        return cls(tuple(zip(row[real].tolist(), start[real].tolist(), end[real].tolist())), rows, length)


def attention_rule_dense(document_ids: torch.Tensor, segment_ids: torch.Tensor,
                         bidirectional: torch.Tensor) -> torch.Tensor:
    """Dense form of the attention rule. Inputs (R, L) -> bool (R, 1, L, L).

    Padding positions (document id -1) see each other, so no query row is empty (an empty row
    makes softmax return NaN); nothing real ever sees them.
    """
    length = document_ids.shape[1]
    idx = torch.arange(length, device=document_ids.device)
    causal = idx[None, :, None] >= idx[None, None, :]  # (1, L, L): key not after query
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    same_bidir = (segment_ids[:, :, None] == segment_ids[:, None, :]) & bidirectional[:, :, None]
    return (same_doc & (causal | same_bidir)).unsqueeze(1)


def attention_rule_block_mask(document_ids: torch.Tensor, segment_ids: torch.Tensor, bidirectional: torch.Tensor):
    """FlexAttention form of the attention rule for (R, L) CUDA tensors."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, k):
        same_doc = document_ids[b, q] == document_ids[b, k]
        same_bidir = (segment_ids[b, q] == segment_ids[b, k]) & bidirectional[b, q]
        return same_doc & ((k <= q) | same_bidir)

    rows, length = document_ids.shape
    return create_block_mask(mask_mod, rows, None, length, length, device=document_ids.device)


def pack_documents(documents: list[Document], max_tokens: int, pad_id: int = 0,
                   truncate: bool = False) -> PackedBatch:
    """Pack whole documents into rows of at most `max_tokens` positions, first-fit decreasing.

    Rows are padded only at their tail to the longest row. A document longer than `max_tokens`
    is an error naming it, unless `truncate` (then it is cut, dropping continuous segments that
    no longer fit whole). Returns a `PackedBatch`.
    """
    documents = [_truncated(d, max_tokens, i) if truncate else d for i, d in enumerate(documents)]
    for i, doc in enumerate(documents):
        if len(doc) > max_tokens:
            raise ValueError(f"document {i} has {len(doc)} positions > max_tokens {max_tokens}; pass truncate=True")
        if len(doc) == 0:
            raise ValueError(f"document {i} is empty")
    order = sorted(range(len(documents)), key=lambda i: -len(documents[i]))
    row_fill: list[int] = []
    row_docs: list[list[int]] = []
    for i in order:
        n = len(documents[i])
        row = next((r for r, used in enumerate(row_fill) if used + n <= max_tokens), None)
        if row is None:
            row_fill.append(0)
            row_docs.append([])
            row = len(row_fill) - 1
        row_docs[row].append(i)
        row_fill[row] += n
    for docs in row_docs:
        docs.sort()  # keep input order inside a row: deterministic and easy to read
    return _lay_out(documents, row_docs, max(row_fill), pad_id)


def _lay_out(documents: list[Document], row_docs: list[list[int]], length: int, pad_id: int) -> PackedBatch:
    rows = len(row_docs)
    token_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    document_ids = torch.full((rows, length), -1, dtype=torch.long)
    positions = torch.zeros((rows, length), dtype=torch.long)
    segment_ids = torch.full((rows, length), -1, dtype=torch.long)
    bidirectional = torch.zeros((rows, length), dtype=torch.bool)
    next_target = torch.zeros((rows, length), dtype=torch.bool)  # the position's token is predicted from t-1
    masked_labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    placements: list[Placement] = []
    document_rows: list[tuple[int, int]] = [(0, 0)] * len(documents)
    for r, docs in enumerate(row_docs):
        start, segment_counter = 0, 0
        for d in docs:
            document_rows[d] = (r, start)
            doc_len = len(documents[d])
            document_ids[r, start:start + doc_len] = d
            positions[r, start:start + doc_len] = torch.arange(doc_len)
            cursor = start
            for seg in documents[d].segments:
                span = slice(cursor, cursor + seg.length)
                segment_ids[r, span] = segment_counter
                bidirectional[r, span] = seg.bidirectional
                if seg.tokens is not None:
                    token_ids[r, span] = seg.tokens
                    next_target[r, span] = seg.target == NEXT_TOKEN
                if seg.target == MASKED_TOKEN:
                    masked_labels[r, span] = seg.targets.masked_fill(~seg.masked, IGNORE_INDEX)
                if seg.data is not None or seg.tokens is None:
                    placements.append(Placement(r, cursor, seg.length, d, seg))
                cursor += seg.length
                segment_counter += 1
            start += doc_len
    labels = _next_token_labels(token_ids, document_ids, next_target)
    return PackedBatch(token_ids, document_ids, positions, segment_ids, bidirectional, labels, masked_labels,
                       placements, document_rows)


def _next_token_labels(token_ids: torch.Tensor, document_ids: torch.Tensor, target_ok: torch.Tensor) -> torch.Tensor:
    """labels[t] = token_ids[t+1] when t+1 is in the same document and is a loss-bearing token."""
    labels = torch.full_like(token_ids, IGNORE_INDEX)
    same_doc = (document_ids[:, 1:] == document_ids[:, :-1]) & (document_ids[:, 1:] >= 0)
    valid = same_doc & target_ok[:, 1:]
    labels[:, :-1] = torch.where(valid, token_ids[:, 1:], labels[:, :-1])
    return labels


def _truncated(doc: Document, max_tokens: int, index: int) -> Document:
    if len(doc) <= max_tokens:
        return doc
    kept, room = [], max_tokens
    for seg in doc.segments:
        if room == 0:
            break
        if seg.length <= room:
            kept.append(seg)
            room -= seg.length
        elif seg.tokens is not None and seg.data is None:  # a payload's placeholders are all or nothing
            cut = {"masked": seg.masked[:room], "targets": seg.targets[:room]} if seg.target == MASKED_TOKEN else {}
            kept.append(Segment(seg.modality, tokens=seg.tokens[:room], bidirectional=seg.bidirectional,
                                target=seg.target, **cut))
            room = 0
        else:
            break
    if not kept:
        raise ValueError(f"document {index}: its first segment ({doc.segments[0].length} positions) cannot be truncated to {max_tokens}")
    return Document(kept)
