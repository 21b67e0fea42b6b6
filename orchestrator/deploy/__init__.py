"""Deploying the controller (issue 27: not the runtime controller): `remote.py` the controller VM and its status,
SSH target and program; `kubernetes.py` the controller's replicas as a Kubernetes Deployment. The services reach
them through `orchestrator.controller_service`."""
