"""Priced instance catalogs of AWS, GCP and Azure: what each instance type offers, where, at what hourly price.

`load_catalog`/`all_offerings` read the shipped CSVs (or the user's refreshed copies, see `catalog_path`);
`update_catalog` refreshes one from the cloud's public price list (`orchestrator.catalog.update`, imported lazily:
loading a catalog does not pull in the HTTP and JSON machinery).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.catalog.catalog import (
    CLOUDS,
    COLUMNS,
    CatalogError,
    Offering,
    all_offerings,
    catalog_path,
    load_catalog,
    parse_catalog,
    shipped_path,
    user_catalog_dir,
    user_path,
)

if TYPE_CHECKING:
    from orchestrator.catalog.update import UpdateResult, update_catalog

__all__ = ["CLOUDS", "COLUMNS", "CatalogError", "Offering", "UpdateResult", "all_offerings", "catalog_path",
           "load_catalog", "parse_catalog", "shipped_path", "update_catalog", "user_catalog_dir", "user_path"]


def __getattr__(name: str) -> Any:
    if name in ("UpdateResult", "update_catalog"):
        from orchestrator.catalog import update

        return getattr(update, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
