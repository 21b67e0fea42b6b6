"""Sortie's orchestrator: specs, controller, recovery, pools, optimizer, the node agent and the stack driver."""

__version__ = "0.1.0"
