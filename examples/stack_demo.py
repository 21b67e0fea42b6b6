"""The stack demo (`make demo`): a 2-node cluster on the local cloud as a real Pulumi stack.

Brings the cluster up through the Automation API, runs a command on both nodes through their
agents, preempts one node and lets `refresh` find it gone, then destroys the stack and checks that
nothing is left.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console

from orchestrator.config import sortie_home
from orchestrator.errors import SortieError
from orchestrator.infra.agent_client import AgentClient
from orchestrator.infra.local_cloud import LocalCloud
from orchestrator.infra.pulumi_driver import PulumiStackDriver
from orchestrator.infra.stack_driver import stack_name
from stacks.spec import ClusterSpec, StackProgram, new_cluster_token

console = Console(highlight=False)


def run_demo() -> None:
    home = sortie_home()
    driver = PulumiStackDriver(home)
    name = stack_name(driver.config.pulumi.stack_prefix, "demo", int(time.time()), 1)
    spec = ClusterSpec(name=name, num_nodes=2, token=new_cluster_token())
    console.print(f"[bold]1. pulumi up[/bold] {name}: 2 nodes on local/{driver.config.local.regions[0].name}")
    started = time.monotonic()
    try:
        up = driver.up(name, StackProgram("cluster", spec))
        console.print(f"   up in {time.monotonic() - started:.1f}s; outputs: {up.public_outputs()['nodes']}")
        console.print("[bold]2. run[/bold] a command on every node through its agent")
        for node in up.outputs["nodes"]:
            client = AgentClient(node["url"], up.outputs["token"])
            env = {"SKYPILOT_NODE_RANK": str(node["rank"]), "SKYPILOT_NUM_NODES": str(up.outputs["num_nodes"])}
            run_id = client.run('echo "hello from rank $SKYPILOT_NODE_RANK of $SKYPILOT_NUM_NODES in $PWD"', env)
            status = client.wait(run_id, timeout=30)
            output, _ = client.log(run_id)
            console.print(f"   node {node['rank']}: exit {status.exit_code}: {output.decode().strip()}")
        console.print("[bold]3. preempt[/bold] node 1, then pulumi refresh")
        LocalCloud(home / "local").preempt_cluster(name, rank=1)
        refreshed = driver.refresh(name)
        console.print(f"   alive: {[r.name for r in refreshed.alive]}  gone: {[r.name for r in refreshed.gone]}")
    finally:
        console.print(f"[bold]4. pulumi destroy[/bold] {name}")
        started = time.monotonic()
        driver.destroy(name)
        console.print(f"   destroyed in {time.monotonic() - started:.1f}s")
    left = LocalCloud(home / "local").leftovers() + [s for s in driver.list_stacks() if s == name]
    if left:
        raise SortieError(f"left behind: {left}")
    console.print(f"[green]done[/green]: nothing left behind; engine log: {Path(driver.log_path(name))}")


if __name__ == "__main__":
    try:
        run_demo()
    except SortieError as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(1)
