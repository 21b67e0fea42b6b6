"""Object stores (a local directory store and S3) and moving file trees to and from them.

`import orchestrator.storage` does not import boto3; opening an S3 store does.
"""

from orchestrator.storage.stores import (
    STORES,
    BucketURL,
    LocalStore,
    S3Store,
    StorageError,
    Store,
    UploadTooLarge,
    check_bucket_name,
    open_store,
    parse_bucket_url,
    store_kind,
)
from orchestrator.storage.trees import CachedSync, TreeStats, download_tree, format_size, scan_tree, upload_tree

__all__ = [
    "STORES",
    "BucketURL",
    "CachedSync",
    "LocalStore",
    "S3Store",
    "StorageError",
    "Store",
    "TreeStats",
    "UploadTooLarge",
    "check_bucket_name",
    "download_tree",
    "format_size",
    "open_store",
    "parse_bucket_url",
    "scan_tree",
    "store_kind",
    "upload_tree",
]
