"""Infrastructure: what touches engines, clouds and nodes from the controller's side (below the controller).

The stack driver and its Pulumi implementation (a detached worker process per operation, `_stack_worker`,
`detached_ops`), the engine and provider-plugin installers, the local cloud, Kubernetes capacity, cloud
credentials, the node agent's HTTP client and the agent bundle shipped to nodes. Imports only `node/`, `policy/`
and the shared base modules (`config`, `errors`), never the controller or the services.
"""
