"""bnprobe.reporting.pdf: WeasyPrint draws each one-position SVG text of a figure as one piece, at the place and with the
text its own letter-by-letter drawing gives (compared in the PDF's content streams), and only while bnprobe renders."""

from __future__ import annotations

import base64
import io
import re
import sys

import pytest

weasyprint = pytest.importorskip("weasyprint", reason="PDF output needs WeasyPrint")
pypdf = pytest.importorskip("pypdf")

from bnprobe.reporting import pdf  # noqa: E402

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


# Lengths in every form an SVG may write them: plain, exponent, signed, units, percentages, none at all.
LENGTHS_SVG = """<svg xmlns="http://www.w3.org/2000/svg" width="300" height="200" viewBox="0 0 300 200">
<path d="M 10 20 L 1e2 30.5 L -5 +7 C 1.5e1 2 3 4 50 60 z" stroke="#000" stroke-width="0.5"/>
<rect x="10%" y="2em" width="3mm" height="" fill="#f00"/>
<circle cx="150" cy="100" r="1.5ex" stroke-width="1pt" stroke="#00f"/>
<circle cx="100px" cy="1e2px" r=" 4px" stroke-width="0.5 px" stroke="#0ff"/>
<text x="20px" y="190" font-size="6.5px" font-family="DejaVu Sans">px</text>
<line x1="0" y1="0" x2="50%" y2="100%" stroke="#0f0" stroke-width=".5"/>
</svg>"""


def test_svg_numbers_the_short_way_draw_the_same_and_weasyprint_is_left_as_it_was():
    html = f"<html><body>{LENGTHS_SVG}</body></html>"
    utils = sys.modules["weasyprint.svg.utils"]
    original = utils.size
    plain = _content(weasyprint.HTML(string=html).write_pdf())
    with pdf.svg_numbers_the_short_way():
        assert utils.size is not original and sys.modules["weasyprint.svg"].size is utils.size
        assert utils.size("12.5") == 12.5 and utils.size("") == 0 and utils.size("50%", None, 10) == 5
        assert utils.size("6.5px") == 6.5 and utils.size("2em", 10) == 20
        for length in ("12.5", "-3", "+4px", "1e-3px", ".5px", "6.5 px", " 4px", "1E2", "", "3mm", "50%", "x"):
            assert utils.size(length, 10, 100) == original(length, 10, 100), length
        short = _content(weasyprint.HTML(string=html).write_pdf())
    assert short == plain and "re" in plain[0]  # drawn, and drawn the same
    assert utils.size is original and sys.modules["weasyprint.svg"].size is original


def test_a_late_figure_is_drawn_in_its_stand_in_place():
    # The stand-in has the figure's size; the document is laid out around it and the figure drawn in its place
    # when the page is painted: the same page as the figure embedded from the start.
    from bnprobe.reporting.figures import late_figure

    figure = SVG.replace('width="300" height="200" viewBox="0 0 300 200"',
                         'width="504pt" height="360pt" viewBox="0 0 504 360"')
    stand_in = late_figure("run:a", 0, 5.0)
    page = '<html><body><p>before</p><img style="width: 100%" src="{}"><p>after</p></body></html>'
    embedded = "data:image/svg+xml;base64," + base64.b64encode(figure.encode()).decode()
    asked = []

    def finished() -> str:
        asked.append(True)
        return figure

    assert pdf.can_draw_late()
    images = sys.modules["weasyprint.images"]
    original = images.SVGImage.draw
    late = io.BytesIO()
    pdf.write(pdf.render(page.format(stand_in.data_uri), "."), late, late={stand_in.data_uri: finished})
    first = io.BytesIO()
    pdf.write(pdf.render(page.format(embedded), "."), first)
    assert asked == [True]
    ours, text = _content(late.getvalue())
    assert (ours, text) == _content(first.getvalue()) and all(t in text for t in TEXTS[:3] + ["before", "after"])
    assert images.SVGImage.draw is original  # WeasyPrint's own again
