"""tokenizers package."""
