"""The colour of each expert, shared by the message view (token colouring) and the expert panel,
and the text colour that stays readable on each."""

from __future__ import annotations

from functools import lru_cache

EXPERT_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
                 "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000"]

BLACK, WHITE = "#000000", "#ffffff"
AA_CONTRAST = 4.5  # WCAG 2 level AA for normal text


def expert_color(e: int) -> str:
    return EXPERT_COLORS[e % len(EXPERT_COLORS)]


def relative_luminance(color: str) -> float:
    """WCAG 2's relative luminance of a "#rrggbb" colour (0 black, 1 white)."""
    channels = [int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a: str, b: str) -> float:
    """WCAG 2's contrast ratio of two colours, from 1 (same) to 21 (black on white)."""
    hi, lo = sorted((relative_luminance(a), relative_luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


@lru_cache(maxsize=64)
def text_color(background: str) -> str:
    """Black or white, whichever contrasts more with `background`. One of them always reaches
    4.58:1 (they tie at a luminance of about 0.18), so every background gets AA-readable text."""
    return BLACK if contrast_ratio(background, BLACK) >= contrast_ratio(background, WHITE) else WHITE


def expert_text_color(e: int) -> str:
    return text_color(expert_color(e))
