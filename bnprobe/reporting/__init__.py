"""The report (torch-free): collecting runs, the worker pool, figures, PDF output and rendering."""
