"""Node side: code that runs on the nodes, not on the controller (the bottom layer; imports nothing above it).

The node agent and what it imports (`agent`, `agent_files`, `watch`, `container`, `agent_http`, `node_view`) are
standard library only: they ship to cloud VMs and pods as one zipapp (`orchestrator.infra.agent_bundle`) and run
there without Sortie installed. `node_storage` (bucket work on a node) is the exception: it runs with Sortie
installed on the node (`python -m orchestrator.node.node_storage`, `spec.node_package`) and is not in the zipapp.
`isolation` probes, on the controller's machine, whether local-cloud nodes can get a path view.
"""
