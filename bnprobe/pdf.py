"""PDF output through WeasyPrint, imported only when a PDF is asked for.

WeasyPrint draws an SVG `<text>` one character at a time (each placed on its own, for SVG's per-letter
`x`/`y`/`rotate` lists): one Pango layout and one PDF text object per letter, about half of the time it
spends on a report's figures. Matplotlib's texts have one position each, so while bnprobe renders, such a
text is handed to WeasyPrint's own text function as a single piece (its letter loop then runs once, on the
whole string): the same glyphs at the same place, shaped together as any HTML text is. Texts with per-letter
attributes, and WeasyPrint versions laid out otherwise, are drawn as WeasyPrint draws them.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator

from bnprobe.errors import BnprobeError, first_line

PER_LETTER = ("dx", "dy", "rotate", "letter-spacing", "word-spacing", "textLength")


def weasyprint():
    try:
        import weasyprint
    except ImportError:
        raise BnprobeError("PDF output needs WeasyPrint (a bnprobe dependency): pip install weasyprint, or write .html")
    except OSError as exc:  # the Python package is there, its system libraries (Pango) are not
        raise BnprobeError(f"WeasyPrint cannot load its system libraries ({first_line(exc)}); install Pango, or write .html")
    return weasyprint


def render(html: str, base_url: str) -> Any:
    """The laid-out document of `html` (a weasyprint.Document: its pages, ready to write)."""
    with svg_text_in_one_piece():
        return weasyprint().HTML(string=html, base_url=base_url).render()


def write(document: Any, target: BinaryIO) -> None:
    with svg_text_in_one_piece():
        document.write_pdf(target=target)


class _OneChunk(str):
    """A string that iterates as one piece: WeasyPrint's SVG text function loops `for char in node.text`."""

    def __iter__(self) -> Iterator[str]:
        yield str(self)


class _InOnePiece:
    """An SVG text node as WeasyPrint's text function sees it, its text in one piece; everything else (the
    bounding box it sets, its attributes) is the node's own."""

    def __init__(self, node: Any):
        object.__setattr__(self, "_node", node)

    @property
    def text(self) -> str:
        return _OneChunk(self._node.text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._node, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._node, name, value)


def _one_position(node: Any) -> bool:
    if not isinstance(node.text, str) or len(node.text) < 2 or any(node.get(k) is not None for k in PER_LETTER):
        return False
    return all(len(str(node.get(k) or "").replace(",", " ").split()) <= 1 for k in ("x", "y"))


@contextmanager
def svg_text_in_one_piece() -> Iterator[None]:
    """While inside, WeasyPrint draws each SVG text that has one position as one piece (see the module)."""
    weasyprint()  # loaded, so that its svg module is there to look at
    svg = sys.modules.get("weasyprint.svg")
    tags = getattr(svg, "TAGS", {})
    original = tags.get("text")
    # The layout this was written against (WeasyPrint 60-70): one function draws <text> and <tspan>, and
    # draw_node recognises text nodes by comparing with the module's `text`. Anything else is left alone.
    if original is None or tags.get("tspan") is not original or getattr(svg, "text", None) is not original:
        yield
        return

    def text(svg_drawing: Any, node: Any, font_size: float) -> Any:
        return original(svg_drawing, _InOnePiece(node) if _one_position(node) else node, font_size)

    tags["text"] = tags["tspan"] = svg.text = text
    try:
        yield
    finally:
        tags["text"] = tags["tspan"] = svg.text = original
