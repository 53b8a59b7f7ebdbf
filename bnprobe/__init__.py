"""bnprobe: study what BatchNorm's gamma and beta can do on their own."""

__version__ = "0.1.0"
