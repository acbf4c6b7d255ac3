"""A run: open the data, train the SAEs, evaluate them and record everything in a run folder.

This sits above both `training` and `metrics`, so the trainer never imports a metric."""

from saelab.runs.config import RunConfig
from saelab.runs.run import RunResult, build_run_saes, check_resume_config, run_training

__all__ = ["RunConfig", "RunResult", "build_run_saes", "check_resume_config", "run_training"]
