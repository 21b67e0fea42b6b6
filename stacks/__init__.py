"""Pulumi programs of Sortie: a cluster (`cluster_program`) and a pool worker (`pool_program`).

Programs are inline (no language host): the stack driver runs them in a worker process from a
picklable `StackProgram`. Infra-specific resources come from builders in `stacks.builders`.
"""
