"""Analysis of trained models: loading a checkpoint as a model, probes (forward and static), clamp ablations,
findings over seeds, inspect, and export."""
