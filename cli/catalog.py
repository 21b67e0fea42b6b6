"""`sortie catalog ...`: the priced instance catalogs: show rows, refresh prices from the clouds' price lists."""

from __future__ import annotations

import typer

catalog_app = typer.Typer(no_args_is_help=True, help="Priced instance catalogs (AWS, GCP, Azure): show, update.")


def _clouds(cloud: str | None) -> tuple[str, ...]:
    from orchestrator.catalog import CLOUDS
    from orchestrator.errors import UsageError

    if cloud is None:
        return CLOUDS
    if cloud.lower() not in CLOUDS:
        raise UsageError(f"unknown cloud {cloud!r}; catalogs: {', '.join(CLOUDS)}")
    return (cloud.lower(),)


def _gpu_filter(gpu: str | None) -> tuple[str, float | None] | None:
    """`--gpu H100` or `--gpu H100:8` as (name, count or None)."""
    from orchestrator.errors import UsageError

    if gpu is None:
        return None
    name, _, count = gpu.partition(":")
    if not name.strip():
        raise UsageError(f"--gpu {gpu!r}: give an accelerator name, e.g. H100 or H100:8")
    try:
        wanted = float(count) if count else None
    except ValueError:
        raise UsageError(f"--gpu {gpu!r}: the count after ':' must be a number") from None
    return name.strip(), wanted


@catalog_app.command("show")
def show(cloud: str | None = typer.Option(None, "--cloud", help="aws, gcp or azure (default: all)."),
         gpu: str | None = typer.Option(None, "--gpu", help="Only instances with this accelerator, e.g. H100 or "
                                                             "H100:8 (name case-insensitive).")) -> None:
    """List catalog rows: instance, size, accelerators, region and hourly prices (cheapest first)."""
    from cli.output import get_console, plain_table
    from orchestrator.catalog import all_offerings
    from orchestrator.catalog.catalog import format_number as fmt
    from orchestrator.errors import UsageError

    clouds = _clouds(cloud)
    rows = list(all_offerings(clouds))
    wanted = _gpu_filter(gpu)
    if wanted is not None:
        name, count = wanted
        known = sorted({o.accelerator_name for o in rows if o.accelerator_name})
        rows = [o for o in rows if o.accelerator_name and o.accelerator_name.lower() == name.lower()
                and (count is None or o.accelerator_count == count)]
        if not rows:
            raise UsageError(f"no instance in the {'/'.join(clouds)} catalog{'s' if len(clouds) > 1 else ''} has "
                             f"{gpu}; accelerators there: {', '.join(known) or 'none'}")
    rows.sort(key=lambda o: (o.price, o.cloud, o.instance_type, o.region, o.zone or ""))
    table = [[o.cloud, o.instance_type, fmt(o.vcpus), fmt(o.memory_gib),
              f"{o.accelerator_name}:{fmt(o.accelerator_count)}" if o.accelerator_name else "-",
              o.region, o.zone or "-", f"{o.price:.4f}", "-" if o.spot_price is None else f"{o.spot_price:.4f}"]
             for o in rows]
    get_console().print(plain_table(["CLOUD", "INSTANCE", "VCPUS", "MEM_GIB", "ACCELERATORS", "REGION", "ZONE",
                                  "PRICE/H", "SPOT/H"], table))


@catalog_app.command("update")
def update(cloud: str | None = typer.Option(None, "--cloud", help="aws, gcp or azure (default: all three)."),
           api_key: str | None = typer.Option(None, "--api-key", help="GCP Cloud Billing API key "
                                                                       "(default: GOOGLE_API_KEY).")) -> None:
    """Refresh catalog prices from the clouds' public price lists into <SORTIE_HOME>/catalog/.

    One line per cloud: rows updated and added, or why it could not. Exits non-zero if any cloud failed."""
    from cli.output import get_console
    from orchestrator.catalog.update import update_all

    clouds = _clouds(cloud)
    results = update_all(clouds, api_key=api_key)
    if len(clouds) == 1 and isinstance(results[0], Exception):
        raise results[0]  # one cloud asked for: its reason is the one-line error
    console = get_console()
    for result in results:
        console.print(str(result) if isinstance(result, Exception) else result.line())
    if any(isinstance(result, Exception) for result in results):
        raise typer.Exit(1)
