"""`sortie catalog update`: refresh a catalog's prices from the cloud's public price list.

The refreshed catalog keeps the instance set of the one in use (the same instance types; their regions, plus any
region among those looked up where the source now lists one of those types): only prices change. It is written
atomically to `<SORTIE_HOME>/catalog/<cloud>.csv`, with a header citing the source URLs and the fetch date; from
then on it wins over the shipped file. Rows the source does not price keep their previous values.

- Azure: the Retail Prices API (no credentials), one filtered query per region, following `NextPageLink`.
  `priceType` Consumption meters, Windows and Low Priority skipped; a meter named `... Spot` gives the spot price.
- AWS: the Price List bulk API offer file of each region (large: its products and OnDemand terms are walked
  member by member, never built as one object). Spot prices need credentials (EC2 DescribeSpotPriceHistory
  through boto3); without them the previous spot prices are kept, and the result says so.
- GCP: the Cloud Billing Catalog API needs an API key: SKUs of service Compute Engine are per vCPU-hour,
  per GiB-hour and per GPU-hour, summed over each shape (plus the local SSD that a2-ultragpu/a3 shapes bundle).

Every HTTP request goes through one injectable `fetch(url) -> bytes`, so tests pass recorded responses. The
price-list readers live in `price_lists.py`; this module merges their prices into the catalog and writes it.
"""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from orchestrator.catalog.catalog import (
    CLOUDS,
    CatalogError,
    Offering,
    catalog_path,
    check_cloud,
    load_catalog,
    parse_catalog,
    render_catalog,
    user_path,
)
from orchestrator.catalog.price_lists import (
    FETCH_TIMEOUT_S,
    GCP_NO_KEY,
    Fetch,
    PriceList,
    SpotHistory,
    aws_prices,
    azure_prices,
    boto3_spot_history,
    gcp_prices,
)

__all__ = ["GCP_NO_KEY", "UpdateResult", "update_all", "update_catalog", "urllib_fetch"]


def urllib_fetch(url: str, timeout: float = FETCH_TIMEOUT_S) -> bytes:
    """GET `url` and return the body; HTTP errors raise `urllib.error.HTTPError`."""
    request = urllib.request.Request(url, headers={"User-Agent": "sortie-catalog-update", "Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


@dataclass(frozen=True)
class UpdateResult:
    """What one `update_catalog` did."""

    cloud: str
    path: Path
    updated: int  # rows whose on-demand or spot price changed
    added: int  # rows for a catalog instance type in a region the catalog did not list it in
    unpriced: int  # rows the source did not price (kept as they were)
    notes: tuple[str, ...] = ()

    def line(self) -> str:
        text = f"{self.cloud}: updated {self.updated}, added {self.added}"
        if self.unpriced:
            text += f", kept {self.unpriced} the source does not price"
        text += f" ({self.path})"
        return "; ".join([text, *self.notes])


def update_catalog(cloud: str, *, fetch: Fetch | None = None, api_key: str | None = None,
                   regions: Iterable[str] | None = None, spot_history: SpotHistory | None = None,
                   today: date | None = None) -> UpdateResult:
    """Refresh `cloud`'s catalog from its public price list and write it to the user's catalog directory.

    `regions` adds regions to look up besides those of the catalog in use. `api_key` (GCP; default
    `GOOGLE_API_KEY`). `spot_history` (AWS; default boto3 with the ambient credentials). `fetch` (default
    `urllib_fetch`). Raises a one-line `CatalogError` when the source cannot be read; the catalog in use is then
    left as it was."""
    check_cloud(cloud)
    fetch = fetch or urllib_fetch
    previous = catalog_path(cloud)
    current = load_catalog(cloud)
    types = tuple(dict.fromkeys(o.instance_type for o in current))
    wanted_regions = tuple(dict.fromkeys([*(o.region for o in current), *(regions or ())]))
    if cloud == "azure":
        prices = azure_prices(fetch, types, wanted_regions)
    elif cloud == "aws":
        prices = aws_prices(fetch, types, wanted_regions, spot_history or boto3_spot_history)
    else:
        key = api_key or os.environ.get("GOOGLE_API_KEY")
        if not key:
            raise CatalogError(GCP_NO_KEY)
        prices = gcp_prices(fetch, current, wanted_regions, key)

    rows, updated, added, unpriced = _merge(cloud, current, types, prices)
    day = (today or datetime.now(UTC).date()).isoformat()
    header = [f"Sortie instance catalog: {cloud}, refreshed by `sortie catalog update` on {day} (fetch date, UTC).",
              *(f"Source: {url}" for url in prices.sources), *prices.header,
              f"Rows the source does not price keep their values from the previous catalog ({previous})."]
    text = render_catalog(header, rows)
    target = user_path(cloud)
    parse_catalog(cloud, text, str(target))  # what is written must load
    _write_atomic(target, text)
    return UpdateResult(cloud, target, updated, added, unpriced, prices.notes)


def _merge(cloud: str, current: tuple[Offering, ...], types: tuple[str, ...],
           prices: PriceList) -> tuple[list[Offering], int, int, int]:
    rows: list[Offering] = []
    updated = unpriced = 0
    for row in current:
        key = (row.instance_type, row.region)
        if key not in prices.on_demand:
            unpriced += 1
            rows.append(row)
            continue
        price = round(prices.on_demand[key], 4)
        spot = row.spot_price if prices.spot is None else _rounded(prices.spot.get(key))
        new = replace(row, price=price, spot_price=spot)
        if new != row:
            updated += 1
        rows.append(new)
    listed = {(o.instance_type, o.region) for o in current}
    template = {o.instance_type: o for o in reversed(current)}
    order = {t: i for i, t in enumerate(types)}
    new_keys = sorted((k for k in prices.on_demand if k not in listed and k[0] in template),
                      key=lambda k: (order[k[0]], k[1]))
    for instance_type, region in new_keys:
        spot = None if prices.spot is None else _rounded(prices.spot.get((instance_type, region)))
        rows.append(replace(template[instance_type], cloud=cloud, region=region, zone=None,
                            price=round(prices.on_demand[(instance_type, region)], 4), spot_price=spot))
    return rows, updated, len(new_keys), unpriced


def _rounded(value: float | None) -> float | None:
    return None if value is None or value <= 0 else round(value, 4)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def update_all(clouds: Iterable[str] | None = None, **kwargs: Any) -> list[UpdateResult | CatalogError]:
    """`update_catalog` for each cloud (default: all); a cloud that fails gives its error, the others go on."""
    results: list[UpdateResult | CatalogError] = []
    for cloud in CLOUDS if clouds is None else clouds:
        try:
            results.append(update_catalog(cloud, **kwargs))
        except CatalogError as exc:
            results.append(exc)
    return results
