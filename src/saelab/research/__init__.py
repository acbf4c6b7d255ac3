"""Research workspaces: try SAE ideas against a base, paired by seed, with an append-only experiment log."""

from saelab.research.log import ExperimentLog, LogRead
from saelab.research.workspace import Workspace, init_workspace, load_workspace

__all__ = ["ExperimentLog", "LogRead", "Workspace", "init_workspace", "load_workspace"]
