"""The Sortie home and config.yaml: defaults, one-line errors naming the file and field, private secrets."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from orchestrator.config import (
    LocalCloudConfig,
    LocalRegion,
    SortieConfig,
    load_config,
    passphrase_file,
    sortie_home,
)
from orchestrator.errors import SortieError


def _write_config(home: Path, text: str) -> Path:
    path = home / "config.yaml"
    path.write_text(text)
    return path


def _config_error(home: Path) -> str:
    with pytest.raises(SortieError) as err:
        load_config(home)
    message = str(err.value)
    assert "\n" not in message, message
    assert str(home / "config.yaml") in message
    return message


def test_sortie_home_follows_env_and_is_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "nested" / "home"
    monkeypatch.setenv("SORTIE_HOME", str(target))
    assert sortie_home() == target.resolve()
    assert target.is_dir()


def test_defaults_without_a_config_file(sortie_home: Path) -> None:
    config = load_config(sortie_home)
    assert config == SortieConfig()
    assert [r.name for r in config.local.regions] == ["region-a", "region-b"]
    assert all(r.capacity == 16 for r in config.local.regions)  # finite by default (issue 17)
    assert all(r.accelerators == {} for r in config.local.regions)
    assert config.local.region(None) is config.local.regions[0]
    assert config.local.region(None).name == "region-a"
    assert config.local.region("region-b").name == "region-b"
    assert config.pulumi.backend_url is None
    assert config.pulumi.secrets_provider == "passphrase"
    assert not (sortie_home / "config.yaml").exists()


def test_load_config_uses_sortie_home_by_default(sortie_home: Path) -> None:
    _write_config(sortie_home, "local:\n  regions:\n    - name: only-one\n")
    assert [r.name for r in load_config().local.regions] == ["only-one"]


def test_empty_config_file_means_defaults(sortie_home: Path) -> None:
    _write_config(sortie_home, "")
    assert load_config(sortie_home) == SortieConfig()


def test_config_with_regions_capacity_and_accelerators(sortie_home: Path) -> None:
    _write_config(sortie_home, """
pulumi:
  backend_url: file:///tmp/elsewhere
local:
  regions:
    - name: gpu-east
      capacity: 3
      accelerators: {H100: 8}
    - name: cpu-west
""")
    config = load_config(sortie_home)
    assert config.pulumi.backend_url == "file:///tmp/elsewhere"
    assert config.local.regions == [
        LocalRegion(name="gpu-east", capacity=3, accelerators={"H100": 8}),
        LocalRegion(name="cpu-west"),
    ]
    assert config.local.region(None).name == "gpu-east"


def test_unknown_key_names_file_and_field(sortie_home: Path) -> None:
    _write_config(sortie_home, "pulumi:\n  backnd_url: x\n")
    message = _config_error(sortie_home)
    assert "pulumi.backnd_url" in message


def test_unknown_top_level_key(sortie_home: Path) -> None:
    _write_config(sortie_home, "pulumy: {}\n")
    assert "pulumy" in _config_error(sortie_home)


def test_negative_capacity_names_file_and_field(sortie_home: Path) -> None:
    _write_config(sortie_home, "local:\n  regions:\n    - name: region-a\n      capacity: -1\n")
    message = _config_error(sortie_home)
    assert "local.regions.0.capacity" in message
    assert "greater than or equal to 0" in message


def test_bad_region_name_and_empty_region_list(sortie_home: Path) -> None:
    _write_config(sortie_home, "local:\n  regions:\n    - name: Region_A\n")
    assert "local.regions.0.name" in _config_error(sortie_home)
    _write_config(sortie_home, "local:\n  regions: []\n")
    assert "local.regions" in _config_error(sortie_home)


def test_invalid_yaml_is_one_line(sortie_home: Path) -> None:
    _write_config(sortie_home, "pulumi: {backend_url: [unclosed\n  : : :\n")
    message = _config_error(sortie_home)
    assert "not valid YAML" in message


def test_config_that_is_not_a_mapping(sortie_home: Path) -> None:
    _write_config(sortie_home, "- just\n- a list\n")
    assert "mapping" in _config_error(sortie_home)


def test_unknown_region_names_it_and_lists_known() -> None:
    local = LocalCloudConfig()
    with pytest.raises(SortieError) as err:
        local.region("region-z")
    message = str(err.value)
    assert "region-z" in message
    assert "region-a" in message
    assert "region-b" in message
    assert "\n" not in message


def test_passphrase_file_is_private_and_stable(sortie_home: Path) -> None:
    path = passphrase_file(sortie_home)
    assert path == sortie_home / "secrets" / "pulumi-passphrase"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    first = path.read_text()
    assert len(first) >= 32
    assert passphrase_file(sortie_home) == path
    assert path.read_text() == first
    assert passphrase_file() == path  # the home from SORTIE_HOME
    assert sorted(p.name for p in path.parent.iterdir()) == ["pulumi-passphrase"]


def test_passphrase_differs_between_homes(tmp_path: Path) -> None:
    a = passphrase_file(tmp_path / "a").read_text()
    b = passphrase_file(tmp_path / "b").read_text()
    assert a != b
