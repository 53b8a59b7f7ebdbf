"""bnprobe.pdf: WeasyPrint draws each one-position SVG text of a figure as one piece, at the place and with the
text its own letter-by-letter drawing gives (compared in the PDF's content streams), and only while bnprobe renders."""

from __future__ import annotations

import io
import re
import sys

import pytest

weasyprint = pytest.importorskip("weasyprint", reason="PDF output needs WeasyPrint")
pypdf = pytest.importorskip("pypdf")

from bnprobe import pdf  # noqa: E402

TEXTS = ["Accuracy per epoch", "optimizer step", "0.0001", "|γ| < τ"]
SPACED = "spaced"  # letter-spacing: drawn letter by letter either way
SVG = f"""<svg xmlns="http://www.w3.org/2000/svg" width="300" height="200" viewBox="0 0 300 200">
<text x="10" y="20" font-size="10px" font-family="DejaVu Sans">{TEXTS[0]}</text>
<text x="150" y="60" font-size="8px" font-family="DejaVu Sans" text-anchor="middle">{TEXTS[1]}</text>
<text x="290" y="100" font-size="8px" font-family="DejaVu Sans" text-anchor="end">{TEXTS[2]}</text>
<text transform="rotate(-90 20 150)" x="20" y="150" font-size="8px" font-family="DejaVu Sans"
      text-anchor="middle">|γ| &lt; τ</text>
<text x="10" y="180" font-size="8px" font-family="DejaVu Sans" letter-spacing="2">{SPACED}</text>
</svg>"""
HTML = f"<html><body>{SVG}</body></html>"
PLACED = re.compile(r"1 0 0 -1 (-?[\d.]+) (-?[\d.]+) Tm")  # where a text object starts
ANCHORED = re.compile(r"1 0 0 1 (-?[\d.]+) 0 cm\s+/\w+ Do")  # a middle/end anchored text's shift


def _content(pdf_bytes: bytes) -> tuple[str, str]:
    """(every content stream of page 1, its forms included; the page's extracted text)."""
    page = pypdf.PdfReader(io.BytesIO(pdf_bytes)).pages[0]
    streams = [page.get_contents().get_data()]
    streams += [form.get_object().get_data() for form in page["/Resources"].get("/XObject", {}).values()]
    return "\n".join(s.decode("latin-1") for s in streams), page.extract_text()


def _weasyprint_alone() -> bytes:
    return weasyprint.HTML(string=HTML).write_pdf()


def _bnprobe() -> bytes:
    document = pdf.render(HTML, ".")
    buffer = io.BytesIO()
    pdf.write(document, buffer)
    return buffer.getvalue()


def test_one_position_texts_are_drawn_as_one_piece_at_the_same_place():
    plain, plain_text = _content(_weasyprint_alone())
    ours, our_text = _content(_bnprobe())
    assert our_text == plain_text and all(t in our_text for t in TEXTS[:3])
    # One text object per text, plus the letter-spaced one's letters; WeasyPrint alone places every letter
    # (a space it skips).
    assert len(PLACED.findall(ours)) == len(TEXTS) + len(SPACED)
    assert len(PLACED.findall(plain)) == sum(len(t.replace(" ", "")) for t in TEXTS) + len(SPACED)
    # Each text starts where WeasyPrint starts its first letter, and anchored texts shift by the same width
    # (a whole string is kerned, letters one by one are not: within half a point).
    starts = {tuple(map(float, m)) for m in PLACED.findall(ours)}
    assert starts <= {tuple(map(float, m)) for m in PLACED.findall(plain)}
    shifts = [float(x) for x in ANCHORED.findall(ours)]
    assert len(shifts) == 3
    assert shifts == pytest.approx([float(x) for x in ANCHORED.findall(plain)], abs=0.5)


def test_weasyprint_is_left_as_it_was():
    svg = sys.modules["weasyprint.svg"]
    original = svg.TAGS["text"]
    with pdf.svg_text_in_one_piece():
        assert svg.TAGS["text"] is not original and svg.TAGS["tspan"] is svg.TAGS["text"] is svg.text
    assert svg.TAGS["text"] is svg.TAGS["tspan"] is svg.text is original
    assert _content(_weasyprint_alone()) == _content(weasyprint.HTML(string=HTML).write_pdf())
