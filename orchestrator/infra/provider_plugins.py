"""Infra, Pulumi provider plugins: `pulumi-resource-kubernetes`, the official release first, else built here.

A user's machine gets the plugin the way Pulumi does: `pulumi plugin install resource kubernetes <version>` (the
engine's own download), checked by the plugin handshake (`orchestrator/infra/releases.py`). When that cannot be had
(no internet: the host does not answer within seconds), it is built from the Go module proxy, as follows.

The plugin is built like the engine, from a throwaway main module under the cache
(`${XDG_CACHE_HOME:-~/.cache}/sortie/plugin-build/kubernetes/v<version>`) that requires the provider's Go module
(`github.com/pulumi/pulumi-kubernetes/provider/v4`) at a version the Go module proxy serves. The provider's own
`main.go` embeds `schema-embed.json` and `terraform-mapping-embed.json`, which its `go generate` writes and which
are not in the module zip, so our `main.go` embeds copies written here the way that generator does (the schema
with its `version` set, both re-marshalled compactly) and calls `provider.Serve`. The version stamped with `-X`
is the installed `pulumi-kubernetes` Python SDK's: the SDK asks the engine for exactly that plugin version.

The binary lands in `${XDG_CACHE_HOME:-~/.cache}/sortie/plugins/kubernetes/v<version>/` beside a `VERSION`
stamp; `engine_env` puts that folder on the engine's PATH, where the engine finds plugins before its plugin cache.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from orchestrator.errors import EngineError, UsageError
from orchestrator.infra.engine import Progress, cache_dir, find_engine
from orchestrator.infra.go_build import install_atomically, module_file, run_go
from orchestrator.infra.releases import ReleaseUnavailable, install_plugin_release

PROVIDER_MODULE = "github.com/pulumi/pulumi-kubernetes/provider/v4"
# The proxy serves no tagged v4.x of provider/v4 (its go.mod carries a `replace`), only pseudo-versions; this one
# (2026-01-15) resolves and builds. A tag equal to the SDK's version is tried first, should the proxy serve it.
PROVIDER_PSEUDO_VERSION = "v4.0.0-20260115033456-f47bc2d6f199"
PLUGINS = {"kubernetes": ("pulumi-kubernetes", "pulumi-resource-kubernetes")}

_GO_MOD = """module sortie.local/pluginbuild

go 1.24.7

require {module} {version}
"""

_MAIN_GO = """// Written by `sortie engine install --plugin kubernetes`: the provider's main, generated files embedded.
package main

import (
\t_ "embed"

\t"{module}/pkg/provider"
\t"{module}/pkg/version"
)

//go:embed schema-embed.json
var pulumiSchema []byte

//go:embed terraform-mapping-embed.json
var terraformMapping []byte

func main() {{
\tprovider.Serve("kubernetes", version.Version, pulumiSchema, terraformMapping)
}}
"""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    version: str
    path: Path


def sdk_version(name: str) -> str | None:
    """The installed Python SDK's version for a plugin (None: its extra is not installed)."""
    try:
        return metadata.version(PLUGINS[name][0])
    except metadata.PackageNotFoundError:
        return None


def plugin_dir(name: str, version: str) -> Path:
    return cache_dir() / "plugins" / name / f"v{version}"


def find_plugin(name: str) -> PluginInfo | None:
    """The plugin built for the installed SDK's version, if any."""
    version = sdk_version(name)
    if version is None:
        return None
    folder = plugin_dir(name, version)
    binary = folder / PLUGINS[name][1]
    stamp = folder / "VERSION"
    if binary.is_file() and os.access(binary, os.X_OK) and stamp.is_file() and stamp.read_text().strip() == version:
        return PluginInfo(name, version, binary)
    return None


def plugin_path_dirs() -> list[str]:
    """Folders to put on the engine's PATH: every built plugin of an installed SDK's version."""
    return [str(info.path.parent) for name in PLUGINS if (info := find_plugin(name)) is not None]


def embedded_files(source: Path, version: str, out: Path) -> None:
    """What the provider's `go generate` writes: the schema with its version set, and the mapping, both compact."""
    schema = json.loads((source / "schema.json").read_text())
    schema["version"] = version
    (out / "schema-embed.json").write_text(json.dumps(schema, separators=(",", ":")))
    mapping = json.loads((source / "terraform-mapping.json").read_text())
    (out / "terraform-mapping-embed.json").write_text(json.dumps(mapping, separators=(",", ":")))


def _official(name: str, version: str, folder: Path, log: Path, report: Progress) -> PluginInfo | None:
    """The plugin from its official release (`pulumi plugin install`), verified; None when it cannot be had."""
    engine = find_engine()
    try:
        if engine is None:
            raise ReleaseUnavailable("no engine installed to run `pulumi plugin install`")
        install_plugin_release(engine.path, name, version, PLUGINS[name][1], folder / PLUGINS[name][1], log, report)
    except ReleaseUnavailable as exc:
        with log.open("a") as fh:
            fh.write(f"official release: {exc}\n")
        report(f"no official release ({exc}); building v{version} from the Go module proxy (about 6 minutes)")
        return None
    (folder / "VERSION").write_text(version + "\n")
    return PluginInfo(name, version, folder / PLUGINS[name][1])


def install_plugin(name: str, force: bool = False, progress: Progress | None = None) -> tuple[PluginInfo, str]:
    """Install the plugin if it is not there: the official release, else a build from the Go module proxy. Returns
    it and how (present/official/built)."""
    report = progress or (lambda _msg: None)
    if name not in PLUGINS:
        raise UsageError(f"--plugin {name!r}: Sortie builds only {', '.join(PLUGINS)}")
    version = sdk_version(name)
    if version is None:
        raise UsageError(f"--plugin {name}: the Python SDK is not installed; run: pip install 'sortie[{name}]'")
    existing = None if force else find_plugin(name)
    if existing is not None:
        return existing, "present"
    what = f"the {name} provider plugin v{version}"
    build_dir = cache_dir() / "plugin-build" / name / f"v{version}"
    build_dir.mkdir(parents=True, exist_ok=True)
    folder = plugin_dir(name, version)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "install.log"
    log.write_text(f"sortie engine install --plugin {name} (v{version})\n")
    official = _official(name, version, folder, log, report)
    if official is not None:
        return official, "official"
    failures = []
    for ref in dict.fromkeys((f"v{version}", PROVIDER_PSEUDO_VERSION)):
        (build_dir / "go.mod").write_text(_GO_MOD.format(module=PROVIDER_MODULE, version=ref))
        (build_dir / "go.sum").unlink(missing_ok=True)
        try:
            source = module_file(PROVIDER_MODULE, ref, build_dir, log, report, what)
        except EngineError as exc:
            failures.append(str(exc))
            continue
        break
    else:
        raise EngineError("; ".join(failures))
    embedded_files(source / "cmd" / "pulumi-resource-kubernetes", version, build_dir)
    (build_dir / "main.go").write_text(_MAIN_GO.format(module=PROVIDER_MODULE))
    run_go(["mod", "tidy"], build_dir, log, report, "resolving the provider's dependencies", what)
    binary = folder / PLUGINS[name][1]
    building = binary.with_name(binary.name + ".building")
    ldflags = f"-s -w -X {PROVIDER_MODULE}/pkg/version.Version={version}"
    run_go(["build", "-v", "-trimpath", "-ldflags", ldflags, "-o", str(building), "."], build_dir, log, report,
           f"compiling {PLUGINS[name][1]}", what)
    install_atomically(building, binary)
    (folder / "VERSION").write_text(version + "\n")
    return PluginInfo(name, version, binary), "built"
