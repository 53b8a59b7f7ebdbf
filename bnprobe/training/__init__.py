"""Training: the epoch loop with its checkpoints and resume, the step (eager or CUDA graphs), telemetry,
regularisers, evaluation and data-parallel processes."""
