"""The per-layer tables are measured on the rows that decide their width (probe_tables.widest_rows): the same
width as the whole table, for names and cells of any length, markup escapes and wide characters included."""

from __future__ import annotations

import random

from rich import box
from rich.table import Table

from bnprobe.analysis.probe_tables import _table_width, shown, widest_rows


def make(rows, only=None) -> Table:
    t = Table(box=box.SIMPLE_HEAD, collapse_padding=True, show_edge=False, pad_edge=False)
    t.add_column("#", justify="right", no_wrap=True)
    t.add_column("layer", overflow="fold")
    for header in ("median", "<0.01", "off"):
        t.add_column(header, justify="right", no_wrap=True)
    for i in range(len(rows)) if only is None else only:
        t.add_row(*rows[i])
    return t


def test_the_widest_rows_measure_as_the_whole_table():
    generator = random.Random(0)
    words = ["model", "layers", "input_layernorm", "[x]", "γ", "深層", "a b c", "post_attention_layernorm"]
    for _ in range(50):
        rows = []
        for i in range(generator.randint(1, 60)):
            name = ".".join(generator.choice(words) for _ in range(generator.randint(1, 6)))
            rows.append([str(i), shown(name), f"{generator.random() * 10 ** generator.randint(0, 6):.3g}",
                         f"{generator.randint(0, 100)}%", str(generator.randint(0, 10 ** generator.randint(0, 7)))])
        picked = widest_rows(rows)
        assert len(picked) <= 2 * len(rows[0])
        assert _table_width(make(rows, picked)) == _table_width(make(rows))
