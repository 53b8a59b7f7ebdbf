"""PDF output through WeasyPrint, imported only when a PDF is asked for.

Three things are done differently from a plain `HTML(...).write_pdf()`, each only while bnprobe renders, each
checked against the WeasyPrint at hand (60-70 as written; otherwise WeasyPrint does as it does):

- Late figures: a run's figure may still be being drawn (by another process) while the document is laid out:
  an empty SVG image of its size stands in, and the figure is drawn in its place when its page is painted
  (`write(..., late=...)`). Laying out needs a figure's size only.
- SVG lengths: WeasyPrint parses every number of an SVG path through a function that re-imports its unit table
  on each call; a plain number now takes the short way first, with the same result.
- SVG text, as follows.

WeasyPrint draws an SVG `<text>` one character at a time (each placed on its own, for SVG's per-letter
`x`/`y`/`rotate` lists): one Pango layout and one PDF text object per letter, about half of the time it
spends on a report's figures. Matplotlib's texts have one position each, so while bnprobe renders, such a
text is handed to WeasyPrint's own text function as a single piece (its letter loop then runs once, on the
whole string): the same glyphs at the same place, shaped together as any HTML text is. Texts with per-letter
attributes, and WeasyPrint versions laid out otherwise, are drawn as WeasyPrint draws them.
"""

from __future__ import annotations

import inspect
import re
import sys
from contextlib import ExitStack, contextmanager
from typing import Any, BinaryIO, Callable, Iterator, Mapping

from bnprobe.core.errors import BnprobeError, first_line

PER_LETTER = ("dx", "dy", "rotate", "letter-spacing", "word-spacing", "textLength")
PIXELS = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?px")  # a length WeasyPrint reads as float(number)


def weasyprint():
    try:
        import weasyprint
    except ImportError:
        raise BnprobeError("PDF output needs WeasyPrint (a bnprobe dependency): pip install weasyprint, or write .html")
    except OSError as exc:  # the Python package is there, its system libraries (Pango) are not
        raise BnprobeError(f"WeasyPrint cannot load its system libraries ({first_line(exc)}); install Pango, or write .html")
    return weasyprint


def render(html: str, base_url: str) -> Any:
    """The laid-out document of `html` (a weasyprint.Document: its pages, ready to write). Figures are drawn
    only when it is written (write), so nothing here is done differently."""
    return weasyprint().HTML(string=html, base_url=base_url).render()


def write(document: Any, target: BinaryIO, late: Mapping[str, Callable[[], str]] | None = None) -> None:
    """Write the laid-out `document` to `target`. `late`: image URL -> a function that returns the SVG to draw
    in that image's place (it may wait for it); only where can_draw_late() said so."""
    with ExitStack() as stack:
        stack.enter_context(svg_text_in_one_piece())
        stack.enter_context(svg_numbers_the_short_way())
        if late:
            stack.enter_context(figures_drawn_late(late))
        document.write_pdf(target=target)


def can_draw_late() -> bool:
    """Whether this WeasyPrint's SVG images can be swapped for their real figures when painted: an SVG image
    built as WeasyPrint 60-70 builds one (its URL and its SVG kept on it, drawn by its `draw`)."""
    images = _module("weasyprint.images")
    image_type = getattr(images, "SVGImage", None)
    if image_type is None or not callable(getattr(image_type, "draw", None)):
        return False
    try:
        if list(inspect.signature(image_type.__init__).parameters)[1:] != ["tree", "base_url", "url_fetcher",
                                                                            "context"]:
            return False
        image = image_type(images.ElementTree.fromstring('<svg xmlns="http://www.w3.org/2000/svg"/>'), "probe", None,
                           None)
    except Exception:  # noqa: BLE001 -- any other layout: draw every figure before laying out
        return False
    return image._base_url == "probe" and hasattr(image, "_svg")


@contextmanager
def figures_drawn_late(late: Mapping[str, Callable[[], str]]) -> Iterator[None]:
    """While inside, an SVG image whose URL is a key of `late` is drawn from the SVG late[url]() returns (once:
    the image is then that figure). Only where can_draw_late()."""
    images = _module("weasyprint.images")
    image_type = images.SVGImage
    original = image_type.draw
    waiting = dict(late)

    def draw(image: Any, *args: Any, **kwargs: Any) -> Any:
        source = waiting.pop(getattr(image, "_base_url", None), None)
        if source is not None:
            tree = images.ElementTree.fromstring(source().encode("utf-8"))
            image._svg = image_type(tree, image._base_url, image._url_fetcher, image._context)._svg
        return original(image, *args, **kwargs)

    image_type.draw = draw
    try:
        yield
    finally:
        image_type.draw = original


@contextmanager
def svg_numbers_the_short_way() -> Iterator[None]:
    """While inside, WeasyPrint's SVG length parser reads a plain number (or one in px) with float() before
    anything else, as its own first step does, without re-importing its unit table first (one import statement
    per number: a tenth of a report's painting time)."""
    utils = _module("weasyprint.svg.utils")
    original = getattr(utils, "size", None)
    if original is None or list(inspect.signature(original).parameters) != ["string", "font_size",
                                                                             "percentage_reference"]:
        yield
        return

    def size(string: Any, font_size: Any = None, percentage_reference: Any = None) -> Any:
        if type(string) is str:
            if PIXELS.fullmatch(string):  # "6.5px": a pixel is the unit (times 1)
                return float(string[:-2])
            try:
                return float(string)
            except ValueError:
                pass
        return original(string, font_size, percentage_reference)

    # Every SVG module that imported the parser by name: `from .utils import size`.
    holders = [m for name, m in list(sys.modules.items())
               if name.startswith("weasyprint.svg") and getattr(m, "size", None) is original]
    for module in holders:
        module.size = size
    try:
        yield
    finally:
        for module in holders:
            module.size = original


def _module(name: str) -> Any:
    """WeasyPrint's module `name`, or None where this WeasyPrint has none (then nothing is done differently)."""
    weasyprint()  # loaded first: a missing WeasyPrint is answered as such
    try:
        __import__(name)
    except ImportError:
        return None
    return sys.modules[name]


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
    svg = _module("weasyprint.svg")
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
