"""The priced instance catalogs: the shipped CSVs, the user's refreshed copy, and `catalog update` against recorded
price-list responses (tests/support/fixtures/catalog)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
from datetime import date
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.catalog import catalog_app
from orchestrator.catalog import (
    CLOUDS,
    COLUMNS,
    CatalogError,
    Offering,
    all_offerings,
    catalog_path,
    load_catalog,
    shipped_path,
    user_path,
)
from orchestrator.catalog.price_lists import GCP_NO_KEY, aws_prices, azure_query_url, parse_aws_offer
from orchestrator.catalog.update import update_catalog
from orchestrator.errors import SortieError, UsageError

FIXTURES = Path(__file__).parents[1] / "support" / "fixtures" / "catalog"
GPU_NAMES = {"V100", "A100", "A100-80GB", "H100", "T4", "A10G", "A10", "L4", "H200", "L40S", "B200", "GB200",
             "MI300X", "Trainium", "Inferentia2", "tpu-v4-8", "tpu-v5litepod-1", "tpu-v5litepod-4",
             "tpu-v5litepod-8", "tpu-v5p-8", "tpu-v6e-1", "tpu-v6e-4", "tpu-v6e-8"}
HEADER = ",".join(COLUMNS)


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def rows_of(cloud: str, instance_type: str, region: str | None = None) -> list[Offering]:
    return [o for o in load_catalog(cloud) if o.instance_type == instance_type and region in (None, o.region)]


def write_user_copy(cloud: str, *lines: str) -> Path:
    path = user_path(cloud)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# a previous refresh\n" + HEADER + "\n" + "".join(f"{line}\n" for line in lines))
    return path


@pytest.fixture(autouse=True)
def _home(sortie_home: Path) -> Path:
    """Every test gets its own Sortie home, so the shipped catalogs are the ones in use unless a test writes a copy."""
    return sortie_home


@pytest.fixture
def no_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


# --- the shipped catalogs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cloud", CLOUDS)
def test_every_shipped_catalog_parses_and_cites_its_sources(cloud: str) -> None:
    text = shipped_path(cloud).read_text()
    comments = [line for line in text.splitlines() if line.startswith("#")]
    cited = " ".join(comments).lower()
    assert "on-demand prices:" in cited and "spot prices:" in cited and "2025" in cited
    assert {"aws": "offers/v1.0/aws/amazonec2", "gcp": "6f81-5844-456a", "azure": "prices.azure.com"}[cloud] in cited
    assert text.splitlines()[len(comments)] == HEADER
    rows = load_catalog(cloud, catalog_dir=shipped_path(cloud).parent)
    assert len(rows) > 80 and all(o.cloud == cloud for o in rows)
    assert len({(o.instance_type, o.region, o.zone) for o in rows}) == len(rows)  # no duplicate rows


@pytest.mark.parametrize("cloud", CLOUDS)
def test_shipped_prices_are_positive_and_spot_is_cheaper(cloud: str) -> None:
    for o in load_catalog(cloud):
        assert o.price > 0 and o.vcpus > 0 and o.memory_gib > 0, o
        assert o.spot_price is None or 0 < o.spot_price < o.price, o
        assert (o.accelerator_name is None) == (o.accelerator_count == 0), o
        assert o.accelerator_name is None or o.accelerator_name in GPU_NAMES, o
        # A GPU instance costs more than the same size without one would, roughly: no price is a typo by 100x.
        assert 0.005 < o.price / max(o.vcpus, 1) < 2.0, o


def test_required_families_and_regions_are_present() -> None:
    def gpus(cloud: str, instance_type: str, region: str) -> tuple[str | None, float]:
        (row,) = rows_of(cloud, instance_type, region)
        return row.accelerator_name, row.accelerator_count

    assert gpus("aws", "p5.48xlarge", "us-east-1") == ("H100", 8)
    assert gpus("aws", "p4d.24xlarge", "us-west-2") == ("A100", 8)
    assert gpus("aws", "p3.2xlarge", "eu-west-1") == ("V100", 1)
    assert gpus("aws", "g4dn.12xlarge", "us-east-2") == ("T4", 4)
    assert gpus("aws", "g5.48xlarge", "us-east-1") == ("A10G", 8)
    assert gpus("aws", "g6.xlarge", "ap-northeast-1") == ("L4", 1)
    assert gpus("gcp", "a3-highgpu-8g", "us-central1") == ("H100", 8)
    assert gpus("gcp", "a2-highgpu-8g", "us-central1") == ("A100", 8)
    assert gpus("gcp", "a2-ultragpu-8g", "us-central1") == ("A100-80GB", 8)
    assert gpus("gcp", "g2-standard-96", "us-central1") == ("L4", 8)
    assert gpus("azure", "Standard_ND96isr_H100_v5", "eastus") == ("H100", 8)
    assert gpus("azure", "Standard_ND96asr_v4", "eastus") == ("A100", 8)
    assert gpus("azure", "Standard_NC24ads_A100_v4", "eastus") == ("A100-80GB", 1)
    assert gpus("azure", "Standard_NC6s_v3", "westeurope") == ("V100", 1)
    assert gpus("azure", "Standard_NV36ads_A10_v5", "southeastasia") == ("A10", 1)
    assert gpus("azure", "Standard_NC64as_T4_v3", "eastus2") == ("T4", 4)

    regions = {cloud: {o.region for o in load_catalog(cloud)} for cloud in CLOUDS}
    assert regions["aws"] == {"us-east-1", "us-east-2", "us-west-2", "eu-west-1", "ap-northeast-1"}
    assert regions["gcp"] == {"us-central1", "us-east1", "us-west1", "europe-west4", "asia-east1"}
    assert regions["azure"] == {"eastus", "eastus2", "westus2", "westeurope", "southeastasia"}
    types = {cloud: {o.instance_type for o in load_catalog(cloud)} for cloud in CLOUDS}
    for family in ("m6i", "c6i", "r6i"):
        assert {f"{family}.{s}" for s in ("large", "xlarge", "2xlarge", "4xlarge", "8xlarge")} <= types["aws"]
    assert {f"g6.{s}" for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge", "24xlarge",
                                "48xlarge")} <= types["aws"]
    assert {f"n2-standard-{n}" for n in (2, 4, 8, 16, 32)} | {f"e2-standard-{n}" for n in (2, 4, 8, 16)} \
        <= types["gcp"]
    assert {"a2-highgpu-1g", "a2-highgpu-2g", "a2-highgpu-4g", "a2-ultragpu-1g"} <= types["gcp"]
    assert {f"Standard_{f}{n}s_v5" for f in "DE" for n in (2, 4, 8, 16, 32)} <= types["azure"]
    # Known list prices (USD/hour), as a guard against a mangled table.
    assert rows_of("aws", "p3.2xlarge", "us-east-1")[0].price == 3.06
    assert rows_of("aws", "m6i.large", "us-east-1")[0].price == 0.096
    assert rows_of("azure", "Standard_NC6s_v3", "eastus")[0].price == 3.06
    assert rows_of("gcp", "a2-highgpu-1g", "us-central1")[0].price == pytest.approx(3.6734, abs=1e-3)


def test_all_offerings_spans_the_clouds_asked_for() -> None:
    every = all_offerings()
    assert {o.cloud for o in every} == set(CLOUDS)
    assert len(every) == sum(len(load_catalog(c)) for c in CLOUDS)
    assert {o.cloud for o in all_offerings(["gcp"])} == {"gcp"}
    with pytest.raises(CatalogError, match="no catalog for cloud 'ibm'"):
        load_catalog("ibm")


def test_the_users_copy_wins_over_the_shipped_file(sortie_home: Path) -> None:
    assert catalog_path("aws") == shipped_path("aws")
    path = write_user_copy("aws", "p5.48xlarge,192,2048,H100,8,us-east-1,use1-az2,50.5,")
    assert path == sortie_home / "catalog" / "aws.csv" and catalog_path("aws") == path
    (row,) = load_catalog("aws")
    assert (row.price, row.spot_price, row.zone, row.accelerator_count) == (50.5, None, "use1-az2", 8)
    # A changed copy is read again (the cache is keyed on the file's size and mtime).
    path.write_text(f"{HEADER}\np5.48xlarge,192,2048,H100,8,us-east-1,,51,20\n"
                    "p5.48xlarge,192,2048,H100,8,us-east-2,,51,\n")
    assert [o.price for o in load_catalog("aws")] == [51, 51]
    # An explicit directory overrides both.
    assert len(load_catalog("aws", catalog_dir=shipped_path("aws").parent)) > 100


def test_a_malformed_catalog_is_one_clear_line() -> None:
    path = write_user_copy("gcp", "n2-standard-2,2,8,,0,us-central1,,free,")
    with pytest.raises(CatalogError) as err:
        load_catalog("gcp")
    assert str(err.value) == f"{path}: line 3: price 'free' is not a number" and isinstance(err.value, SortieError)
    path.write_text("instance_type,price\nx,1\n")
    with pytest.raises(CatalogError, match=r"line 1: the header must be instance_type,vcpus,"):
        load_catalog("gcp")
    write_user_copy("gcp", "n2-standard-2,2,8,L4,0,us-central1,,0.1,")
    with pytest.raises(CatalogError, match="accelerator_name and a positive accelerator_count go together"):
        load_catalog("gcp")


# --- update: Azure ------------------------------------------------------------------------------------------------

class Recorded:
    """A fetch that serves recorded responses by URL and remembers what was asked."""

    def __init__(self, routes: dict[str, bytes]) -> None:
        self.routes, self.calls = routes, []

    def __call__(self, url: str) -> bytes:
        self.calls.append(url)
        for needle, body in self.routes.items():
            if needle in urllib.parse.unquote(url):
                return body
        raise urllib.error.HTTPError(url, 404, "Not Found", None, None)  # type: ignore[arg-type]


def azure_fetch() -> Recorded:
    # Page 1's NextPageLink carries `$skip=100`; the needles are matched in order against the unquoted URL.
    return Recorded({"$skip=100": fixture("azure_retail_eastus_page2.json"),
                     "armRegionName eq 'eastus'": fixture("azure_retail_eastus_page1.json"),
                     "armRegionName eq 'westus2'": fixture("azure_retail_empty.json")})


def test_azure_update_follows_pages_changes_prices_and_cites_the_source(sortie_home: Path) -> None:
    write_user_copy("azure",
                    "Standard_NC6s_v3,6,112,V100,1,eastus,,3.366,0.4378",
                    "Standard_D2s_v5,2,8,,0,eastus,,0.096,0.0144",
                    "Standard_ND96isr_H100_v5,96,1900,H100,8,eastus,,98.32,",
                    "Standard_NC24ads_A100_v4,24,220,A100-80GB,1,eastus,,3.673,0.4444",
                    "Standard_NV36ads_A10_v5,36,440,A10,1,westus2,,3.2,0.8")
    fetch = azure_fetch()
    result = update_catalog("azure", fetch=fetch, today=date(2026, 1, 15))

    first = azure_query_url("eastus")
    assert fetch.calls[0] == first and json.loads(fixture("azure_retail_eastus_page1.json"))["NextPageLink"] \
        in fetch.calls  # the NextPageLink was followed
    assert len(fetch.calls) == 3  # eastus: two pages; westus2: one
    assert (result.updated, result.added, result.unpriced) == (1, 1, 2)
    assert result.path == sortie_home / "catalog" / "azure.csv" and catalog_path("azure") == result.path
    by_key = {(o.instance_type, o.region): o for o in load_catalog("azure")}
    # The newest Linux meter wins (not the Windows or Low Priority one, nor the older 3.366 meter); spot from 'Spot'.
    nc6 = by_key[("Standard_NC6s_v3", "eastus")]
    assert (nc6.price, nc6.spot_price) == (3.06, 0.3978)
    assert by_key[("Standard_ND96isr_H100_v5", "eastus")].spot_price is None
    # The source lists NV36ads_A10_v5 in eastus too: a new row, its size copied from the westus2 one.
    added = by_key[("Standard_NV36ads_A10_v5", "eastus")]
    assert (added.vcpus, added.memory_gib, added.accelerator_name, added.price, added.spot_price) == \
        (36, 440, "A10", 3.2, 0.8)
    # Not priced by the source: kept as it was.
    assert by_key[("Standard_NC24ads_A100_v4", "eastus")].price == 3.673
    assert "F2s" not in result.path.read_text()  # only the catalog's instance types
    header = result.path.read_text().splitlines()
    assert header[0].startswith("# Sortie instance catalog: azure, refreshed by `sortie catalog update` on 2026-01-15")
    assert f"# Source: {first}" in header
    assert result.line().startswith("azure: updated 1, added 1, kept 2 the source does not price")


def test_a_fetch_error_is_one_line_naming_the_cloud_and_the_url() -> None:
    def offline(url: str) -> bytes:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    with pytest.raises(CatalogError) as err:
        update_catalog("azure", fetch=offline)
    message = str(err.value)
    assert message == (f"azure: could not fetch {azure_query_url('eastus')}: "
                       "[Errno -3] Temporary failure in name resolution")
    assert "\n" not in message
    assert catalog_path("azure") == shipped_path("azure")  # nothing written


def test_a_page_that_is_not_a_price_list_is_a_clear_error() -> None:
    with pytest.raises(CatalogError, match=r"^azure: https://prices\.azure\.com/.* did not return JSON"):
        update_catalog("azure", fetch=lambda url: b"<html>maintenance</html>")


# --- update: AWS --------------------------------------------------------------------------------------------------

def test_aws_offer_file_gives_linux_shared_on_demand_prices() -> None:
    prices = parse_aws_offer(fixture("aws_offer_us-east-1.json"), {"p5.48xlarge", "m6i.large", "g6.xlarge"})
    # Not the Windows, Dedicated, unused-reservation or SQL Web products; not the Reserved term.
    assert prices == {"p5.48xlarge": 55.04, "m6i.large": 0.096}
    with pytest.raises(CatalogError, match=r"^aws: x is not a readable offer file"):
        parse_aws_offer(b'{"products": {"A": ', {"m6i.large"}, "x")


def test_aws_update_without_credentials_keeps_spot_prices_and_says_so(no_aws_credentials: None) -> None:
    write_user_copy("aws",
                    "p5.48xlarge,192,2048,H100,8,us-east-1,,98.32,19.264",
                    "m6i.large,2,8,,0,us-east-1,,0.1,0.0403",
                    "g6.xlarge,4,16,L4,1,us-east-1,,0.8048,0.4024")
    fetch = Recorded({"/AmazonEC2/current/us-east-1/index.json": fixture("aws_offer_us-east-1.json")})
    result = update_catalog("aws", fetch=fetch)
    assert fetch.calls == ["https://pricing.us-east-1.amazonaws.com/offers/v1.0/aws/AmazonEC2/current/us-east-1/"
                           "index.json"]
    assert (result.updated, result.added, result.unpriced) == (2, 0, 1)
    assert any("spot prices need AWS credentials" in note and "kept" in note for note in result.notes)
    assert "spot prices need AWS credentials" in result.line()
    rows = {o.instance_type: o for o in load_catalog("aws")}
    assert (rows["p5.48xlarge"].price, rows["p5.48xlarge"].spot_price) == (55.04, 19.264)
    assert (rows["m6i.large"].price, rows["m6i.large"].spot_price) == (0.096, 0.0403)
    assert "Spot: kept from the previous catalog" in result.path.read_text()


def test_aws_spot_prices_come_from_the_spot_history_when_it_can_be_read() -> None:
    fetch = Recorded({"/us-east-1/index.json": fixture("aws_offer_us-east-1.json")})
    asked: list[tuple[str, tuple[str, ...]]] = []

    def history(region: str, types: tuple[str, ...]) -> dict[str, float]:
        asked.append((region, types))
        return {"p5.48xlarge": 17.5}

    prices = aws_prices(fetch, ["p5.48xlarge", "m6i.large"], ["us-east-1"], history)
    assert asked == [("us-east-1", ("m6i.large", "p5.48xlarge"))]
    assert prices.spot == {("p5.48xlarge", "us-east-1"): 17.5} and not prices.notes


# --- update: GCP --------------------------------------------------------------------------------------------------

def test_gcp_update_without_an_api_key_is_the_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(CatalogError) as err:
        update_catalog("gcp", fetch=lambda url: pytest.fail("fetched without a key"))
    assert str(err.value) == GCP_NO_KEY == \
        "gcp: the price list needs an API key (GOOGLE_API_KEY); the shipped catalog is kept"


def test_gcp_update_prices_shapes_from_core_ram_gpu_and_ssd_skus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_API_KEY", "AIza-test-key")
    write_user_copy("gcp",
                    "n2-standard-4,4,16,,0,us-central1,,0.2,0.05",
                    "a3-highgpu-8g,208,1872,H100,8,us-central1,,90,27",
                    "g2-standard-4,4,16,L4,1,us-central1,,0.7,0.28",
                    "e2-standard-2,2,8,,0,us-central1,,0.067,0.02")
    fetch = Recorded({"pageToken=CgQIARAFGgwI9s6yxAYQgJDa7AI": fixture("gcp_skus_page2.json"),
                      "/services/6F81-5844-456A/skus?key=AIza-test-key": fixture("gcp_skus_page1.json")})
    result = update_catalog("gcp", fetch=fetch)
    assert len(fetch.calls) == 2  # the nextPageToken was followed
    rows = {o.instance_type: o for o in load_catalog("gcp")}
    n2 = rows["n2-standard-4"]
    assert n2.price == round(4 * 0.031611 + 16 * 0.004237, 4)
    assert n2.spot_price == round(4 * 0.00765 + 16 * 0.001026, 4)
    a3 = rows["a3-highgpu-8g"]  # cores + RAM + 8 GPUs (not the DWS SKU) + the bundled 6000 GiB of local SSD
    assert a3.price == round(208 * 0.02066 + 1872 * 0.002759 + 8 * 9.79655 + 6000 * 0.08 / 730, 4)
    assert a3.spot_price == round(208 * 0.00624 + 1872 * 0.00085 + 8 * 2.9926 + 6000 * 0.048 / 730, 4)
    assert rows["g2-standard-4"].price == round(4 * 0.024988 + 16 * 0.002927 + 0.56, 4)
    assert rows["e2-standard-2"].price == 0.067  # no E2 SKU in the recording: kept
    assert (result.updated, result.added, result.unpriced) == (3, 0, 1)
    text = result.path.read_text()
    assert "AIza-test-key" not in text and "skus?key=***" in text  # the key is never written down


def test_gcp_fetch_errors_do_not_show_the_key() -> None:
    def denied(url: str) -> bytes:
        raise urllib.error.HTTPError(url, 403, "Forbidden", None, None)  # type: ignore[arg-type]

    with pytest.raises(CatalogError) as err:
        update_catalog("gcp", fetch=denied, api_key="AIza-secret")
    assert str(err.value).startswith("gcp: could not fetch https://cloudbilling.googleapis.com/v1/services/"
                                     "6F81-5844-456A/skus?key=***&")
    assert str(err.value).endswith(": HTTP 403 Forbidden") and "AIza-secret" not in str(err.value)


# --- the command line ---------------------------------------------------------------------------------------------

def test_cli_show_lists_rows_cheapest_first_and_filters_by_gpu() -> None:
    out = CliRunner().invoke(catalog_app, ["show", "--gpu", "h100:8"])
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert lines[0].split() == ["CLOUD", "INSTANCE", "VCPUS", "MEM_GIB", "ACCELERATORS", "REGION", "ZONE",
                                "PRICE/H", "SPOT/H"]
    assert all("H100:8" in line for line in lines[1:]) and len(lines) > 8
    prices = [float(line.split()[7]) for line in lines[1:]]
    assert prices == sorted(prices)
    assert {line.split()[0] for line in lines[1:]} == set(CLOUDS)
    cpu = CliRunner().invoke(catalog_app, ["show", "--cloud", "azure"])
    assert cpu.exit_code == 0 and "Standard_D2s_v5" in cpu.output and "p5.48xlarge" not in cpu.output


def test_cli_errors_are_one_line_sortie_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    unknown_gpu = runner.invoke(catalog_app, ["show", "--cloud", "aws", "--gpu", "Z900"])
    assert isinstance(unknown_gpu.exception, UsageError)
    assert str(unknown_gpu.exception).startswith("no instance in the aws catalog has Z900; accelerators there: A100")
    unknown_cloud = runner.invoke(catalog_app, ["show", "--cloud", "ibm"])
    assert isinstance(unknown_cloud.exception, UsageError) and "ibm" in str(unknown_cloud.exception)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    no_key = runner.invoke(catalog_app, ["update", "--cloud", "gcp"])
    assert isinstance(no_key.exception, CatalogError) and str(no_key.exception) == GCP_NO_KEY


def test_cli_update_prints_one_line_per_cloud(monkeypatch: pytest.MonkeyPatch, no_aws_credentials: None) -> None:
    from orchestrator.catalog import update

    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    routes = Recorded({"armRegionName eq 'eastus'": fixture("azure_retail_eastus_page2.json"),
                       "prices.azure.com": fixture("azure_retail_empty.json")})
    monkeypatch.setattr(update, "urllib_fetch", routes)
    out = CliRunner().invoke(catalog_app, ["update"])
    assert out.exit_code == 1
    lines = out.output.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("aws: could not fetch https://pricing.us-east-1.amazonaws.com/offers/v1.0/aws/"
                               "AmazonEC2/current/us-east-1/index.json: HTTP 404 Not Found")
    assert lines[1] == GCP_NO_KEY
    # eastus lists ND96isr and NV36ads at their catalog prices and NC6s_v3 at another price; other regions nothing.
    assert lines[2].startswith("azure: updated 1, added 0, kept ")
