"""One colour per model family, shared by every chart and badge (plots, dashboard, scripts).

Adapters report a family (``vit``, ``hybrid``, ``resnet``, ``hierarchical``, ``cnn``); a family keeps
its colour in every figure, so a reader who learnt "hybrid is violet" on one chart can trust it on the
next. The hex values are Streamlit's own named colours, so a chart's trace and the page's badge match.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["FAMILY_BADGES", "FAMILY_COLOURS", "OTHER_COLOUR", "family_badge_colour", "family_colour",
           "family_styles"]

# family -> (hex for plotly, Streamlit's colour name for badges and coloured text)
_PALETTE = {
    "vit": ("#1c83e1", "blue"),
    "hybrid": ("#803df5", "violet"),
    "resnet": ("#ff8700", "orange"),
    "hierarchical": ("#21c354", "green"),
    "cnn": ("#ff4b4b", "red"),
}
FAMILY_COLOURS: dict[str, str] = {family: hex_ for family, (hex_, _) in _PALETTE.items()}
FAMILY_BADGES: dict[str, str] = {family: name for family, (_, name) in _PALETTE.items()}
OTHER_COLOUR = ("#808495", "gray")  # a family no adapter reports (or none known)

# A second model of the same family keeps the family's colour and differs by line dash or bar pattern.
_DASHES = ("solid", "dash", "dot", "dashdot", "longdash")
_PATTERNS = ("", "/", ".", "x", "+")


def family_colour(family: str | None) -> str:
    """The hex colour of ``family`` (grey for an unknown one)."""
    return FAMILY_COLOURS.get(str(family or "").lower(), OTHER_COLOUR[0])


def family_badge_colour(family: str | None) -> str:
    """Streamlit's colour name for ``family``'s badge, the same hue as :func:`family_colour`."""
    return FAMILY_BADGES.get(str(family or "").lower(), OTHER_COLOUR[1])


def family_styles(families: Sequence[str | None]) -> list[dict[str, str]]:
    """Per model, in order: ``colour`` of its family, and ``dash`` / ``pattern`` telling same-family models apart."""
    seen: dict[str, int] = {}
    out = []
    for family in families:
        key = str(family or "").lower()
        k = seen.get(key, 0)
        seen[key] = k + 1
        out.append({"colour": family_colour(key), "dash": _DASHES[k % len(_DASHES)],
                    "pattern": _PATTERNS[k % len(_PATTERNS)]})
    return out
