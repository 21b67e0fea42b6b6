"""`sortie check`, `sortie show-gpus` and the "Considered resources" table: clouds, catalogs and the optimizer."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from cli.output import get_console, plain_table

if TYPE_CHECKING:
    pass

from orchestrator.launch_plan import CLOUD_NAMES, considered_tables  # noqa: F401 - re-exported for callers


def register(app: typer.Typer) -> None:
    app.command("check")(check)
    app.command("show-gpus")(show_gpus)


def check(as_json: bool = typer.Option(False, "--json", help="JSON, for scripts.")) -> None:
    """Which clouds are enabled, and why the others are not (offline: SDK extras and credentials)."""
    from orchestrator.config import load_config
    from orchestrator.infra.clouds import check as check_clouds

    found = check_clouds(load_config())
    if as_json:
        print(json.dumps([{"cloud": c.cloud, "enabled": c.enabled, "reason": c.reason} for c in found], indent=2))
        return
    console = get_console()
    for c in found:
        mark = "[green]enabled[/green] " if c.enabled else "[dim]disabled[/dim]"
        console.print(f"  {c.cloud:<11} {mark}  {escape(c.reason)}", markup=True)
    enabled = [c.cloud for c in found if c.enabled]
    console.print(f"Enabled clouds: {', '.join(enabled)}")
    if "local" in enabled:
        from orchestrator.node.isolation import container_isolation, local_isolation
        from orchestrator.policy.cloud_features import local_container_engine

        _isolated, how = local_isolation()
        console.print(f"Local-cloud isolation: {escape(how)}", markup=True)
        containers = container_isolation(local_container_engine(), load_config().docker.allowed_run_options)
        console.print(f"Local-cloud containers: {escape(containers)}", markup=True)


def show_gpus(
    name: str = typer.Argument(None, help="An accelerator (H100, A100, ...): its offers with prices."),
    cloud: str = typer.Option(None, "--cloud", help="Only this cloud."),
    region: str = typer.Option(None, "--region", help="Only this region."),
    as_json: bool = typer.Option(False, "--json", help="JSON, for scripts."),
) -> None:
    """Accelerators in the catalogs: without NAME, each with its counts per instance and clouds; with NAME, every
    instance offering it per cloud and region with on-demand and spot prices (cheapest first)."""
    from orchestrator.config import load_config
    from orchestrator.errors import UsageError
    from orchestrator.policy.optimizer import catalog_offers, local_offers

    offers = local_offers(load_config()) + catalog_offers(["aws", "gcp", "azure"])
    offers = [o for o in offers if o.accelerators and (not cloud or o.cloud == cloud)
              and (not region or o.region == region)]
    if name is None:
        summary: dict[str, dict[str, Any]] = {}
        for o in offers:
            for acc, count in o.accelerators.items():
                entry = summary.setdefault(acc, {"counts": set(), "clouds": set()})
                entry["counts"].add(count)
                entry["clouds"].add(o.cloud)
        rows = [[acc, ", ".join(f"{c:g}" for c in sorted(v["counts"])), ", ".join(sorted(v["clouds"]))]
                for acc, v in sorted(summary.items())]
        if as_json:
            print(json.dumps([{"accelerator": r[0], "counts": r[1], "clouds": r[2]} for r in rows], indent=2))
            return
        get_console().print(escape(plain_table(["GPU", "QTY", "CLOUDS"], rows)))
        return
    matching = sorted((o for o in offers if any(k.lower() == name.lower() for k in o.accelerators)),
                      key=lambda o: (o.price, o.cloud, o.region))
    if not matching:
        known = sorted({k for o in offers for k in o.accelerators})
        raise UsageError(f"no accelerator {name!r} in the catalogs; known: {', '.join(known)}")
    rows = [[o.cloud, o.instance_type, next(f"{k}:{v:g}" for k, v in o.accelerators.items()), f"{o.vcpus:g}",
             f"{o.memory_gib:g}", f"$ {o.price:.3f}", f"$ {o.spot_price:.3f}" if o.spot_price is not None else "-",
             o.region] for o in matching]
    if as_json:
        print(json.dumps([dict(zip(["cloud", "instance_type", "accelerators", "vcpus", "memory_gib", "price",
                                    "spot_price", "region"], r, strict=True)) for r in rows], indent=2))
        return
    get_console().print(escape(plain_table(["CLOUD", "INSTANCE", "GPUS", "vCPUs", "Mem(GB)", "HOURLY_PRICE",
                                         "HOURLY_SPOT_PRICE", "REGION"], rows)))
