"""Priced instance catalogs: one CSV per cloud, one row per instance type and region (or zone).

The package ships `aws.csv`, `gcp.csv` and `azure.csv`; `sortie catalog update` writes a refreshed copy to
`<SORTIE_HOME>/catalog/<cloud>.csv`, which wins over the shipped file from then on. Lines starting with `#` are
comments (the shipped files cite where their prices come from); then a header row with `COLUMNS`, in that order.
An empty `zone` means any zone of the region; an empty `spot_price` means spot is not offered there.

Loading is the csv module and a cache keyed on the file's path, size and modification time, so a refreshed
copy is read again and an unchanged one is parsed once.
"""

from __future__ import annotations

import csv
import functools
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import SortieError

CLOUDS = ("aws", "gcp", "azure")
COLUMNS = ("instance_type", "vcpus", "memory_gib", "accelerator_name", "accelerator_count", "region", "zone",
           "price", "spot_price")
SHIPPED_DIR = Path(__file__).resolve().parent


class CatalogError(SortieError):
    """A catalog is missing, malformed, or could not be refreshed."""


@dataclass(frozen=True)
class Offering:
    """One catalog row: an instance type in a region (or one zone of it) of a cloud, with its hourly prices."""

    cloud: str
    instance_type: str
    vcpus: float
    memory_gib: float
    accelerator_name: str | None
    accelerator_count: float
    region: str
    zone: str | None
    price: float
    spot_price: float | None


def check_cloud(cloud: str) -> str:
    if cloud not in CLOUDS:
        raise CatalogError(f"no catalog for cloud {cloud!r}; catalogs: {', '.join(CLOUDS)}")
    return cloud


def user_catalog_dir() -> Path:
    """Where `catalog update` writes: `<SORTIE_HOME>/catalog` (the home as `orchestrator.config.sortie_home`
    resolves it, without creating it: reading a catalog leaves no trace)."""
    home = Path(os.environ.get("SORTIE_HOME") or Path.home() / ".sortie").expanduser().resolve()
    return home / "catalog"


def shipped_path(cloud: str) -> Path:
    return SHIPPED_DIR / f"{check_cloud(cloud)}.csv"


def user_path(cloud: str) -> Path:
    return user_catalog_dir() / f"{check_cloud(cloud)}.csv"


def catalog_path(cloud: str) -> Path:
    """The file in use for `cloud`: the user's refreshed copy if there is one, else the shipped file."""
    user = user_path(cloud)
    return user if user.is_file() else shipped_path(cloud)


def load_catalog(cloud: str, catalog_dir: Path | None = None) -> tuple[Offering, ...]:
    """Every row of `cloud`'s catalog: `catalog_dir/<cloud>.csv` if given, else the file `catalog_path` names."""
    path = Path(catalog_dir) / f"{check_cloud(cloud)}.csv" if catalog_dir is not None else catalog_path(cloud)
    try:
        stat = path.stat()
    except OSError as exc:
        raise CatalogError(f"{cloud}: cannot read the catalog {path}: {exc.strerror or exc}") from None
    return _load_cached(cloud, str(path), stat.st_size, stat.st_mtime_ns)


def all_offerings(clouds: Iterable[str] | None = None) -> tuple[Offering, ...]:
    """The rows of every catalog in `clouds` (default: all of them), cloud by cloud."""
    found: list[Offering] = []
    for cloud in CLOUDS if clouds is None else clouds:
        found.extend(load_catalog(cloud))
    return tuple(found)


@functools.lru_cache(maxsize=32)
def _load_cached(cloud: str, path: str, _size: int, _mtime_ns: int) -> tuple[Offering, ...]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{cloud}: cannot read the catalog {path}: {exc}") from None
    return parse_catalog(cloud, text, path)


def parse_catalog(cloud: str, text: str, source: str = "<catalog>") -> tuple[Offering, ...]:
    """Parse catalog text; raise a one-line `CatalogError` naming the file and line of the first bad row."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")), None)
    if first is None:
        raise CatalogError(f"{source}: no header row ({','.join(COLUMNS)})")
    reader = csv.reader(io.StringIO("\n".join(lines[first:])))
    header = tuple(cell.strip() for cell in next(reader))
    if header != COLUMNS:
        raise CatalogError(f"{source}: line {first + 1}: the header must be {','.join(COLUMNS)}")
    rows: list[Offering] = []
    for offset, cells in enumerate(reader, start=first + 2):
        if not cells or (len(cells) == 1 and not cells[0].strip()) or cells[0].startswith("#"):
            continue
        try:
            rows.append(_row(cloud, cells))
        except ValueError as exc:
            raise CatalogError(f"{source}: line {offset}: {exc}") from None
    return tuple(rows)


def _number(name: str, value: str, *, positive: bool = False) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} {value!r} is not a number") from None
    if number != number or number in (float("inf"), float("-inf")) or number < 0 or (positive and number == 0):
        raise ValueError(f"{name} {value!r} must be a {'positive' if positive else 'non-negative'} number")
    return number


def _row(cloud: str, cells: list[str]) -> Offering:
    if len(cells) != len(COLUMNS):
        raise ValueError(f"expected {len(COLUMNS)} columns, found {len(cells)}")
    instance_type, vcpus, memory, acc_name, acc_count, region, zone, price, spot = (c.strip() for c in cells)
    if not instance_type or not region:
        raise ValueError("instance_type and region must not be empty")
    count = _number("accelerator_count", acc_count or "0")
    if bool(acc_name) != (count > 0):
        raise ValueError("accelerator_name and a positive accelerator_count go together (empty and 0 for CPU)")
    return Offering(cloud=cloud, instance_type=instance_type, vcpus=_number("vcpus", vcpus),
                    memory_gib=_number("memory_gib", memory), accelerator_name=acc_name or None,
                    accelerator_count=count, region=region, zone=zone or None,
                    price=_number("price", price, positive=True),
                    spot_price=_number("spot_price", spot, positive=True) if spot else None)


def format_number(value: float) -> str:
    """A price or size as the catalogs write it: at most 4 decimals, no trailing zeros."""
    if float(value).is_integer():
        return str(int(value))
    return f"{round(value, 4):.4f}".rstrip("0").rstrip(".")


def render_catalog(comments: Iterable[str], offerings: Iterable[Offering]) -> str:
    """Catalog text: `# ` comment lines, the header row, one row per offering."""
    out = io.StringIO()
    for line in comments:
        out.write(f"# {line}".rstrip() + "\n")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for o in offerings:
        writer.writerow([o.instance_type, format_number(o.vcpus), format_number(o.memory_gib),
                         o.accelerator_name or "", format_number(o.accelerator_count), o.region, o.zone or "",
                         format_number(o.price), "" if o.spot_price is None else format_number(o.spot_price)])
    return out.getvalue()
