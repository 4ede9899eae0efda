"""``evaluate`` metric modules shipped with koala_hf (the Hub's metric scripts cannot always be fetched)."""

from pathlib import Path

TOP_K_ERROR = str(Path(__file__).resolve().parent / "top_k_error")
