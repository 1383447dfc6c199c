"""polymodal: multimodal foundation models as compositions of five parts.

Start with `polymodal.load(path)` (a polymodal checkpoint, an HF folder or a GGUF file) or the
`polymodal` command line (`polymodal --help`).
"""

__version__ = "0.1.0"

from polymodal.api import Loaded, load  # noqa: E402

__all__ = ["load", "Loaded", "__version__"]
