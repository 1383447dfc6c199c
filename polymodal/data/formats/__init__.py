"""Readers of real data formats; each yields plain dataclass records and skips bad samples loudly.

- `LlavaReader`: LLaVA conversation JSON/JSONL → `ConversationRecord`
- `CocoCaptionsReader`: COCO captions JSON → `CocoRecord` / `CaptionPair`
- `WebDatasetReader`: WebDataset tar shards → `WebDatasetRecord` (rank/worker sharded)
- `ImageFolderReader`: one folder per class → `FolderRecord`
- `PairsReader`: image–text JSONL/CSV → `PairRecord`
- `read_idx`, `FashionMNIST`: IDX arrays and the Fashion-MNIST set → `FashionMNISTRecord`
"""

from polymodal.data.formats.coco import CaptionPair, CocoCaptionsReader, CocoRecord
from polymodal.data.formats.folder import FolderRecord, ImageFolderReader
from polymodal.data.formats.idx import (
    FASHION_MNIST_CLASSES,
    FashionMNIST,
    FashionMNISTRecord,
    fashion_mnist_dir,
    read_idx,
)
from polymodal.data.formats.llava import ConversationRecord, LlavaReader
from polymodal.data.formats.pairs import PairRecord, PairsReader
from polymodal.data.formats.webdataset import WebDatasetReader, WebDatasetRecord

__all__ = [
    "FASHION_MNIST_CLASSES",
    "CaptionPair",
    "CocoCaptionsReader",
    "CocoRecord",
    "ConversationRecord",
    "FashionMNIST",
    "FashionMNISTRecord",
    "FolderRecord",
    "ImageFolderReader",
    "LlavaReader",
    "PairRecord",
    "PairsReader",
    "WebDatasetReader",
    "WebDatasetRecord",
    "fashion_mnist_dir",
    "read_idx",
]
