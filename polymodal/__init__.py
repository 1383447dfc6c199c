"""polymodal: multimodal foundation models as compositions of five parts."""

__version__ = "0.1.0"
