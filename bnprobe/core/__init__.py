"""The torch-free base: errors, file and format names, data set facts, model names, settings, options and
measures. Imports nothing of bnprobe above it."""
