"""Model families: one module per family, each registering itself in `registry` on import."""
from polymodal.models import lm, mmllm, vit  # noqa: F401  (registration side effects)
