"""Training: the trainer, schedules, the L0 autotuner, data sources and runs."""
