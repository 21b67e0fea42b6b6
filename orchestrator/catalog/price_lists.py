"""Catalog, below `update.py`: the clouds' public price lists read into prices by (instance type, region).

- Azure: the Retail Prices API (no credentials), one filtered query per region, following `NextPageLink`.
- AWS: the Price List bulk API offer file of each region, walked member by member; spot prices through boto3.
- GCP: the Cloud Billing Catalog API (an API key), SKUs summed over each shape.

Every request goes through an injected `fetch(url) -> bytes` (`update.urllib_fetch` by default)."""

from __future__ import annotations

import http.client
import json
import re
import statistics
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from orchestrator.catalog.catalog import (
    CatalogError,
    Offering,
)

Fetch = Callable[[str], bytes]
# (region, instance types) -> {instance type: spot price}, or None when there are no credentials to ask with.
SpotHistory = Callable[[str, tuple[str, ...]], Mapping[str, float] | None]

AZURE_PRICES_URL = "https://prices.azure.com/api/retail/prices"
AWS_OFFER_URL = "https://pricing.us-east-1.amazonaws.com/offers/v1.0/aws/AmazonEC2/current/{region}/index.json"
GCP_COMPUTE_SERVICE = "6F81-5844-456A"
GCP_SKUS_URL = f"https://cloudbilling.googleapis.com/v1/services/{GCP_COMPUTE_SERVICE}/skus"
GCP_NO_KEY = "gcp: the price list needs an API key (GOOGLE_API_KEY); the shipped catalog is kept"
FETCH_TIMEOUT_S = 120.0
MAX_PAGES = 2000
HOURS_PER_MONTH = 730.0

# Catalog accelerator name -> how Compute Engine SKU descriptions name the GPU ("Nvidia Tesla A100 GPU ...").
GCP_GPU_LABELS = {"A100": "a100", "A100-80GB": "a100 80gb", "H100": "h100 80gb", "L4": "l4", "T4": "t4",
                  "V100": "v100", "P100": "p100", "P4": "p4"}
# Local SSD (GiB) that a shape's list price includes.
GCP_BUNDLED_SSD_GIB = {"a2-ultragpu-1g": 375, "a2-ultragpu-2g": 750, "a2-ultragpu-4g": 1500,
                       "a2-ultragpu-8g": 3000, "a3-highgpu-8g": 6000}



@dataclass(frozen=True)
class PriceList:
    """Prices read from a source, by (instance type, region). `spot` None: the source had none (keep the old)."""

    on_demand: dict[tuple[str, str], float]
    spot: dict[tuple[str, str], float] | None
    sources: tuple[str, ...]
    header: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()



# --- fetching ---------------------------------------------------------------------------------------------------

def _redact(url: str) -> str:
    return re.sub(r"([?&]key=)[^&]*", r"\1***", url)


def _get(fetch: Fetch, cloud: str, url: str) -> bytes:
    try:
        return fetch(url)
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code} {exc.reason}".strip()
    except urllib.error.URLError as exc:
        reason = str(exc.reason)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
    raise CatalogError(f"{cloud}: could not fetch {_redact(url)}: {reason}")


def _get_json(fetch: Fetch, cloud: str, url: str) -> dict[str, Any]:
    body = _get(fetch, cloud, url)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{cloud}: {_redact(url)} did not return JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{cloud}: {_redact(url)} did not return a JSON object")
    return data


def _shape_error(cloud: str, url: str, what: str) -> CatalogError:
    return CatalogError(f"{cloud}: {_redact(url)} is not the expected price list ({what})")


# --- Azure ------------------------------------------------------------------------------------------------------

def azure_query_url(region: str) -> str:
    query = (f"serviceName eq 'Virtual Machines' and armRegionName eq '{region}' "
             f"and priceType eq 'Consumption'")
    return f"{AZURE_PRICES_URL}?$filter={urllib.parse.quote(query, safe='')}"


def azure_prices(fetch: Fetch, types: Collection[str], regions: Iterable[str]) -> PriceList:
    wanted = set(types)
    on_demand: dict[tuple[str, str], tuple[str, float]] = {}  # key -> (effectiveStartDate, price)
    spot: dict[tuple[str, str], tuple[str, float]] = {}
    sources = []
    for region in regions:
        url: str | None = azure_query_url(region)
        first = url
        sources.append(first)
        seen: set[str] = set()
        while url:
            if url in seen or len(seen) >= MAX_PAGES:
                raise CatalogError(f"azure: {first}: NextPageLink does not end (stopped after {len(seen)} pages)")
            seen.add(url)
            page = _get_json(fetch, "azure", url)
            items = page.get("Items")
            if not isinstance(items, list):
                raise _shape_error("azure", url, "no Items list")
            for item in items:
                _azure_item(item, wanted, on_demand, spot)
            url = page.get("NextPageLink") or None
    return PriceList(
        on_demand={k: v[1] for k, v in on_demand.items()}, spot={k: v[1] for k, v in spot.items()},
        sources=tuple(s for s in sources if s),
        header=("On-demand: Linux pay-as-you-go meters (priceType Consumption; Windows and Low Priority skipped);",
                "spot: the same query's meters with 'Spot' in meterName; empty where there is none."))


def _azure_item(item: Any, wanted: set[str], on_demand: dict[tuple[str, str], tuple[str, float]],
                spot: dict[tuple[str, str], tuple[str, float]]) -> None:
    if not isinstance(item, dict) or item.get("armSkuName") not in wanted:
        return
    meter = str(item.get("meterName", ""))
    names = f"{meter} {item.get('skuName', '')} {item.get('productName', '')}".lower()
    if (item.get("type", "Consumption") != "Consumption" or "windows" in names or "low priority" in names
            or item.get("unitOfMeasure", "1 Hour") != "1 Hour" or item.get("currencyCode", "USD") != "USD"):
        return
    try:
        price = float(item.get("retailPrice", item.get("unitPrice")))
    except (TypeError, ValueError):
        return
    if price <= 0 or not item.get("armRegionName"):
        return
    key = (str(item["armSkuName"]), str(item["armRegionName"]))
    target = spot if "spot" in meter.lower() else on_demand
    entry = (str(item.get("effectiveStartDate", "")), price)
    known = target.get(key)
    # The newest meter wins; of two equally new ones, the cheaper.
    if known is None or entry[0] > known[0] or (entry[0] == known[0] and price < known[1]):
        target[key] = entry


# --- AWS --------------------------------------------------------------------------------------------------------

def aws_prices(fetch: Fetch, types: Collection[str], regions: Iterable[str], spot_history: SpotHistory) -> PriceList:
    on_demand: dict[tuple[str, str], float] = {}
    sources = []
    regions = tuple(regions)
    for region in regions:
        url = AWS_OFFER_URL.format(region=region)
        sources.append(url)
        for instance_type, price in parse_aws_offer(_get(fetch, "aws", url), types, url).items():
            on_demand[(instance_type, region)] = price
    notes: list[str] = []
    spot: dict[tuple[str, str], float] | None = {}
    header = ["On-demand: Linux, shared tenancy, no pre-installed software, capacitystatus Used, OnDemand terms (USD)."]
    for region in regions:
        try:
            found = spot_history(region, tuple(sorted(types)))
        except CatalogError as exc:
            notes.append(f"spot prices not read ({exc}); the previous spot prices are kept")
            spot = None
            break
        if found is None:
            notes.append("spot prices need AWS credentials (EC2 DescribeSpotPriceHistory); "
                         "the previous spot prices are kept")
            spot = None
            break
        assert spot is not None
        spot.update({(t, region): p for t, p in found.items()})
    if spot is None:
        header.append("Spot: kept from the previous catalog (reading them needs AWS credentials).")
    else:
        header.append("Spot: EC2 DescribeSpotPriceHistory, Linux/UNIX, the median of the zones' current prices.")
    return PriceList(on_demand, spot, tuple(sources), tuple(header), tuple(notes))


_WS = re.compile(r"[ \t\n\r]*")


class _Members:
    """Walk a JSON object's members in `text` from the `{` at `pos`, one at a time: yields (key, value position).
    A consumer that decodes the value itself sets `value_end`; otherwise the value is decoded to be skipped."""

    def __init__(self, text: str, pos: int, decoder: json.JSONDecoder) -> None:
        self.text, self.decoder = text, decoder
        self.pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
        if text[self.pos:self.pos + 1] != "{":
            raise ValueError(f"expected an object at {self.pos}")
        self.value_end: int | None = None
        self.end: int | None = None

    def _skip(self, pos: int) -> int:
        return _WS.match(self.text, pos).end()  # type: ignore[union-attr]

    def __iter__(self) -> Iterator[tuple[str, int]]:
        text, pos = self.text, self._skip(self.pos + 1)
        if text[pos:pos + 1] == "}":
            self.end = pos + 1
            return
        while True:
            key, pos = self.decoder.raw_decode(text, pos)
            pos = self._skip(pos)
            if text[pos:pos + 1] != ":":
                raise ValueError(f"expected ':' at {pos}")
            value_pos = self._skip(pos + 1)
            self.value_end = None
            yield str(key), value_pos
            if self.value_end is None:
                _, self.value_end = self.decoder.raw_decode(text, value_pos)
            pos = self._skip(self.value_end)
            if text[pos:pos + 1] == ",":
                pos = self._skip(pos + 1)
                continue
            if text[pos:pos + 1] == "}":
                self.end = pos + 1
                return
            raise ValueError(f"expected ',' or '}}' at {pos}")


def parse_aws_offer(data: bytes, types: Collection[str], source: str = "<offer file>") -> dict[str, float]:
    """{instance type: hourly on-demand USD} from an AmazonEC2 region offer file, for the Linux, shared-tenancy,
    no-software, capacity-Used products of `types`. Walks the file member by member."""
    wanted = set(types)
    try:
        text = data.decode("utf-8")
        decoder = json.JSONDecoder()
        sku_type: dict[str, str] = {}
        sku_price: dict[str, float] = {}
        seen_products = False
        top = _Members(text, 0, decoder)
        for key, pos in top:
            if key == "products":
                products = _Members(text, pos, decoder)
                for sku, ppos in products:
                    product, products.value_end = decoder.raw_decode(text, ppos)
                    instance_type = _aws_product_type(product, wanted)
                    if instance_type:
                        sku_type[sku] = instance_type
                top.value_end, seen_products = products.end, True
            elif key == "terms":
                terms = _Members(text, pos, decoder)
                for term_kind, tpos in terms:
                    if term_kind == "OnDemand":
                        offers = _Members(text, tpos, decoder)
                        for sku, opos in offers:
                            if seen_products and sku not in sku_type:
                                continue  # skipped: each SKU's terms are small
                            term, offers.value_end = decoder.raw_decode(text, opos)
                            price = _aws_hourly_usd(term)
                            if price is not None:
                                sku_price[sku] = price
                        terms.value_end = offers.end
                        break  # the other terms (Reserved) are not needed
                if seen_products:
                    break  # products and OnDemand terms read: the rest of the file is not needed
                top.value_end = terms.end
    except (ValueError, UnicodeDecodeError) as exc:
        raise CatalogError(f"aws: {source} is not a readable offer file: {exc}") from None
    if not seen_products:
        raise _shape_error("aws", source, "no products")
    prices: dict[str, float] = {}
    for sku, instance_type in sku_type.items():
        price = sku_price.get(sku)
        if price is not None and (instance_type not in prices or price < prices[instance_type]):
            prices[instance_type] = price
    return prices


def _aws_product_type(product: Any, wanted: set[str]) -> str | None:
    attrs = product.get("attributes") if isinstance(product, dict) else None
    if not isinstance(attrs, dict) or attrs.get("instanceType") not in wanted:
        return None
    checks = {"operatingSystem": "Linux", "tenancy": "Shared", "preInstalledSw": "NA", "capacitystatus": "Used"}
    if any(attrs.get(name) != value for name, value in checks.items()):
        return None
    if attrs.get("marketoption", "OnDemand") != "OnDemand" or attrs.get("licenseModel", "No License required") != \
            "No License required":
        return None
    return str(attrs["instanceType"])


def _aws_hourly_usd(term: Any) -> float | None:
    if not isinstance(term, dict):
        return None
    for offer in term.values():
        dimensions = offer.get("priceDimensions", {}) if isinstance(offer, dict) else {}
        for dim in dimensions.values() if isinstance(dimensions, dict) else ():
            if not isinstance(dim, dict) or dim.get("unit") not in ("Hrs", "Hours"):
                continue
            try:
                price = float(dim.get("pricePerUnit", {}).get("USD"))
            except (TypeError, ValueError):
                continue
            if price > 0:
                return price
    return None


def boto3_spot_history(region: str, types: tuple[str, ...]) -> dict[str, float] | None:
    """Current spot prices of `types` in `region` (median over its zones), or None without AWS credentials."""
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return None
    session = boto3.session.Session(region_name=region)
    if session.get_credentials() is None:
        return None
    by_zone: dict[tuple[str, str], float] = {}
    try:
        paginator = session.client("ec2").get_paginator("describe_spot_price_history")
        for page in paginator.paginate(InstanceTypes=list(types), ProductDescriptions=["Linux/UNIX"],
                                       StartTime=datetime.now(UTC)):
            for item in page.get("SpotPriceHistory", []):
                by_zone.setdefault((item["InstanceType"], item["AvailabilityZone"]), float(item["SpotPrice"]))
    except (BotoCoreError, ClientError) as exc:
        raise CatalogError(f"aws: DescribeSpotPriceHistory in {region}: {exc}") from None
    zones: dict[str, list[float]] = {}
    for (instance_type, _zone), price in by_zone.items():
        zones.setdefault(instance_type, []).append(price)
    return {t: statistics.median(p) for t, p in zones.items()}


# --- GCP --------------------------------------------------------------------------------------------------------

_GCP_CORE = re.compile(r"^(?:spot preemptible )?(?P<family>[a-z0-9]+) instance core running in ")
_GCP_RAM = re.compile(r"^(?:spot preemptible )?(?P<family>[a-z0-9]+) instance ram running in ")
_GCP_GPU = re.compile(r"^(?:spot preemptible )?nvidia (?:tesla )?(?P<gpu>.+?) gpu running in ")
_GCP_SSD = re.compile(r"^(?:spot preemptible )?ssd backed local storage"
                      r"(?: attached to spot preemptible vms)?(?: in .*)?$")
_GCP_SKIP = ("commit", "reserv", "sole tenancy", "custom", "dws", "calendar", "flex", "premium", "extended")


def gcp_skus_url(api_key: str, page_token: str | None = None) -> str:
    params = {"key": api_key, "currencyCode": "USD", "pageSize": "5000"}
    if page_token:
        params["pageToken"] = page_token
    return f"{GCP_SKUS_URL}?{urllib.parse.urlencode(params)}"


def gcp_prices(fetch: Fetch, current: Iterable[Offering], regions: Iterable[str], api_key: str) -> PriceList:
    # (component, spot?, region) -> USD per unit-hour; component: ("core", family) | ("ram", family) |
    # ("gpu", label) | ("ssd", "")
    rates: dict[tuple[tuple[str, str], bool, str], float] = {}
    token: str | None = None
    pages = 0
    first = gcp_skus_url(api_key)
    while True:
        url = gcp_skus_url(api_key, token)
        page = _get_json(fetch, "gcp", url)
        skus = page.get("skus")
        if not isinstance(skus, list):
            raise _shape_error("gcp", url, "no skus list")
        for sku in skus:
            _gcp_sku(sku, rates)
        token = page.get("nextPageToken") or None
        pages += 1
        if not token:
            break
        if pages >= MAX_PAGES:
            raise CatalogError(f"gcp: {_redact(first)}: nextPageToken does not end (stopped after {pages} pages)")

    wanted_regions = set(regions)
    shapes: dict[str, Any] = {}
    for o in current:
        shapes.setdefault(o.instance_type, o)
    on_demand: dict[tuple[str, str], float] = {}
    spot: dict[tuple[str, str], float] = {}
    priced_regions = {region for (_c, _s, region) in rates} & wanted_regions
    for instance_type, shape in shapes.items():
        for region in priced_regions:
            for is_spot, target in ((False, on_demand), (True, spot)):
                price = _gcp_shape_price(shape, region, is_spot, rates)
                if price is not None:
                    target[(instance_type, region)] = price
    return PriceList(
        on_demand, spot, (_redact(first),),
        header=("Prices: the Compute Engine SKUs (service 6F81-5844-456A), per vCPU-hour, per GiB-hour and per",
                "GPU-hour, summed over each shape, plus the local SSD an a2-ultragpu/a3-highgpu shape bundles;",
                "spot: the 'Spot Preemptible' SKUs; empty where a shape has none."))


def _gcp_sku(sku: Any, rates: dict[tuple[tuple[str, str], bool, str], float]) -> None:
    if not isinstance(sku, dict):
        return
    category = sku.get("category") or {}
    usage = category.get("usageType")
    if usage not in ("OnDemand", "Preemptible"):
        return
    description = str(sku.get("description", "")).lower()
    if any(word in description for word in _GCP_SKIP):
        return
    component: tuple[str, str] | None = None
    if match := _GCP_CORE.match(description):
        component = ("core", match["family"])
    elif match := _GCP_RAM.match(description):
        component = ("ram", match["family"])
    elif match := _GCP_GPU.match(description):
        component = ("gpu", match["gpu"])
    elif _GCP_SSD.match(description):
        component = ("ssd", "")
    if component is None:
        return
    hourly = _gcp_hourly(sku)
    if hourly is None:
        return
    is_spot = usage == "Preemptible"
    for region in sku.get("serviceRegions") or ():
        rates[(component, is_spot, str(region))] = hourly


def _gcp_hourly(sku: dict[str, Any]) -> float | None:
    infos = sku.get("pricingInfo") or []
    if not infos or not isinstance(infos[-1], dict):
        return None
    expression = infos[-1].get("pricingExpression") or {}
    unit = expression.get("usageUnit")
    tiers = expression.get("tieredRates") or []
    if not tiers:
        return None
    rate = next((t for t in tiers if float(t.get("startUsageAmount", 0) or 0) == 0), tiers[0])
    money = rate.get("unitPrice") or {}
    try:
        price = int(money.get("units") or 0) + int(money.get("nanos") or 0) / 1e9
    except (TypeError, ValueError):
        return None
    if unit in ("h", "GiBy.h"):
        return price
    if unit == "GiBy.mo":
        return price / HOURS_PER_MONTH
    return None


def _gcp_shape_price(shape: Offering, region: str, is_spot: bool,
                     rates: Mapping[tuple[tuple[str, str], bool, str], float]) -> float | None:
    family = shape.instance_type.split("-", 1)[0].lower()
    core = rates.get((("core", family), is_spot, region))
    ram = rates.get((("ram", family), is_spot, region))
    if core is None or ram is None:
        return None
    price = shape.vcpus * core + shape.memory_gib * ram
    if shape.accelerator_name:
        label = GCP_GPU_LABELS.get(shape.accelerator_name, shape.accelerator_name.lower())
        gpu = rates.get((("gpu", label), is_spot, region))
        if gpu is None:
            return None
        price += shape.accelerator_count * gpu
    ssd_gib = GCP_BUNDLED_SSD_GIB.get(shape.instance_type)
    if ssd_gib:
        ssd = rates.get((("ssd", ""), is_spot, region), rates.get((("ssd", ""), False, region)))
        if ssd is None:
            return None
        price += ssd_gib * ssd
    return price
