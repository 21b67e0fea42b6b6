"""The `resources:` section of a task, SkyPilot's field names and meanings, and the resolved candidates.

What Sortie does with each SkyPilot resources field:
- infra / cloud / region / zone, cpus, memory, accelerators, instance_type, use_spot, disk_size, labels,
  job_recovery, any_of, ordered: used (they make the candidates).
- disk_tier, network_tier, ports, image_id, accelerator_args: parsed, checked and carried on each candidate
  (`--dryrun --json` shows them); what a cloud cannot do yet is listed by `Task.unsupported_features()` so
  the launcher refuses it clearly, before anything is submitted.
- autostop: accepted and ignored, as for SkyPilot's managed jobs: a job's cluster is torn down when it ends.
- priority, volumes, max_hourly_cost and other SkyPilot fields: a load error that names the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from orchestrator.spec import fields, values
from orchestrator.spec.values import kind

DEFAULT_DISK_SIZE_GB = 256  # SkyPilot's default OS disk



@dataclass(frozen=True)
class JobRecoverySpec:
    """How a managed job recovers: SkyPilot's job_recovery, resolved."""

    strategy: str | None
    max_restarts_on_errors: int
    recover_on_exit_codes: tuple[int, ...]
    max_duration_s: float | None = None
    backoff_initial_s: float | None = None
    backoff_max_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "max_restarts_on_errors": self.max_restarts_on_errors,
            "recover_on_exit_codes": list(self.recover_on_exit_codes),
            "max_duration_s": self.max_duration_s,
            "backoff_initial_s": self.backoff_initial_s,
            "backoff_max_s": self.backoff_max_s,
        }


@dataclass(frozen=True)
class Candidate:
    """One fully-resolved resource alternative of a task."""

    infra: str | None
    cloud: str | None
    region: str | None
    zone: str | None
    cpus: str | None
    memory: str | None
    accelerators: dict[str, float] = field(default_factory=dict)
    instance_type: str | None = None
    use_spot: bool = False
    disk_size: int = DEFAULT_DISK_SIZE_GB
    labels: dict[str, str] = field(default_factory=dict)
    job_recovery: JobRecoverySpec | None = None
    disk_tier: str | None = None
    network_tier: str | None = None
    ports: tuple[str, ...] = ()
    image_id: str | tuple[tuple[str, str], ...] | None = None  # one image, or (region, image) pairs
    accelerator_args: tuple[tuple[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "infra": self.infra,
            "cloud": self.cloud,
            "region": self.region,
            "zone": self.zone,
            "cpus": self.cpus,
            "memory": self.memory,
            "accelerators": dict(self.accelerators),
            "instance_type": self.instance_type,
            "use_spot": self.use_spot,
            "disk_size": self.disk_size,
            "job_recovery": self.job_recovery.to_json() if self.job_recovery else None,
            "disk_tier": self.disk_tier,
            "network_tier": self.network_tier,
            "ports": list(self.ports),
            "image_id": dict(self.image_id) if isinstance(self.image_id, tuple) else self.image_id,
            "labels": dict(self.labels),
            "accelerator_args": dict(self.accelerator_args),
        }

    def num_gpus(self) -> float:
        """How many of the accelerator each node gets; 0 when there is none."""
        return float(sum(self.accelerators.values()))

    def summary(self) -> str:
        """The hardware in a few characters: `H100:8`, `CPU:2+`, `cpus=4, mem=16+`."""
        if self.accelerators:
            ((name, count),) = self.accelerators.items()
            return values.format_accelerator(name, count)
        if self.cpus and self.memory:
            return f"cpus={self.cpus}, mem={self.memory}"
        if self.memory:
            return f"mem={self.memory}"
        if self.instance_type:
            return self.instance_type
        return f"CPU:{self.cpus or '1+'}"

    def _key(self) -> str:
        return json.dumps([self.to_json(), sorted(self.labels.items())], sort_keys=True)

    def __hash__(self) -> int:
        return hash(self._key())


class Backoff(BaseModel):
    """Sortie's backoff between rounds of capacity retries (exponential, capped, jittered)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    initial: Annotated[fields.Duration, Field(description="The first wait (default 30s).")] = None
    max: Annotated[fields.Duration, Field(description="The longest wait (default 10m).")] = None


class JobRecovery(BaseModel):
    """SkyPilot's `job_recovery` mapping."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Annotated[
        fields.Strategy,
        Field(description="Recovery strategy: FAILOVER (retry where it ran, then elsewhere) or EAGER_NEXT_REGION "
              "(move to the next region first). Case-insensitive; null keeps the default (EAGER_NEXT_REGION)."),
    ] = None
    max_restarts_on_errors: Annotated[
        StrictInt,
        Field(ge=0, description="How many times to restart the job after it fails with a user error "
              "(non-zero exit); 0 means failures are final."),
    ] = 0
    recover_on_exit_codes: Annotated[
        fields.ExitCodes,
        Field(description="Exit codes (0-255) that always trigger a recovery, without counting against "
              "max_restarts_on_errors: one code or a list."),
    ] = Field(default_factory=list)
    max_duration: Annotated[
        fields.Duration,
        Field(description="Sortie: give up waiting for capacity after this long (90s, 30m, 2h) as "
              "FAILED_NO_RESOURCE; default: wait indefinitely, as SkyPilot does."),
    ] = None
    backoff: Annotated[
        Backoff | None,
        Field(description="Sortie: the wait between rounds of capacity retries, exponential from initial to max."),
    ] = None

    @model_validator(mode="after")
    def _backoff_order(self) -> JobRecovery:
        if self.backoff and self.backoff.initial and self.backoff.max and self.backoff.initial > self.backoff.max:
            raise fields.fail(f"initial ({self.backoff.initial:g}s) is longer than max ({self.backoff.max:g}s); "
                              "make initial at most max", ".backoff")
        return self

    def spec(self) -> JobRecoverySpec:
        backoff = self.backoff or Backoff()
        return JobRecoverySpec(self.strategy, self.max_restarts_on_errors, tuple(self.recover_on_exit_codes),
                               self.max_duration, backoff.initial, backoff.max)


def _job_recovery_input(value: Any) -> Any:
    """A strategy name stands for {strategy: name}; strategy `none` turns recovery off (SkyPilot's rule)."""
    if isinstance(value, str):
        return None if value.strip().lower() == "none" else {"strategy": value}
    if isinstance(value, dict):
        strategy = value.get("strategy")
        if isinstance(strategy, str) and strategy.strip().lower() == "none":
            return None
        return value
    if value is None or isinstance(value, JobRecovery):
        return value
    raise fields.fail(
        "must be a strategy name (FAILOVER or EAGER_NEXT_REGION) or a mapping with strategy, "
        f"max_restarts_on_errors and recover_on_exit_codes, not {kind(value)}"
    )


def _job_recovery_schema(schema: dict[str, Any]) -> None:
    ref = {key: schema.pop(key) for key in list(schema) if key in ("$ref", "anyOf", "allOf")}
    schema["anyOf"] = [{"type": "string", "enum": [*values.RECOVERY_STRATEGIES, "none"]}, ref]


class AcceleratorArgs(BaseModel):
    """SkyPilot's accelerator_args (TPU settings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runtime_version: Annotated[StrictStr | None, Field(description="TPU runtime version.")] = None
    tpu_name: Annotated[StrictStr | None, Field(description="Name of an existing TPU to use.")] = None
    tpu_vm: Annotated[StrictBool | None, Field(description="Use a TPU VM (default true).")] = None
    gcp_queued_resource: Annotated[StrictBool | None, Field(description="Ask for the TPU as a queued resource.")] = None


class _ResourceFields(BaseModel):
    """The fields one resource alternative can set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    infra: Annotated[
        fields.Infra,
        Field(description="Where to run: `local[/region]`, `aws[/region[/zone]]`, `gcp/...`, `azure/...`, "
              "`k8s` or `kubernetes[/context]`; `*` for any part. Cannot be combined with cloud/region/zone."),
    ] = None
    cloud: Annotated[
        fields.CloudName, Field(description="Cloud to run on (older form of infra), like aws or local."),
    ] = None
    region: Annotated[StrictStr | None, Field(description="Region to run in (older form of infra).")] = None
    zone: Annotated[StrictStr | None, Field(description="Zone to run in (older form of infra).")] = None
    cpus: Annotated[
        fields.Cpus, Field(description="vCPUs per node: a number like 4 or a minimum like 4+."),
    ] = None
    memory: Annotated[
        fields.Memory,
        Field(description="Memory per node in GiB: a number like 16, a minimum like 16+, or a size like 32GB."),
    ] = None
    instance_type: Annotated[
        StrictStr | None, Field(description="Cloud instance type, like p4d.24xlarge."),
    ] = None
    use_spot: Annotated[
        StrictBool | None, Field(description="Use spot (preemptible) instances; default false."),
    ] = None
    job_recovery: Annotated[
        JobRecovery | None,
        BeforeValidator(_job_recovery_input),
        Field(description="How the managed job recovers from preemptions and failures: a strategy name, "
              "`none`, or a mapping.", json_schema_extra=_job_recovery_schema),
    ] = None
    disk_size: Annotated[
        fields.DiskSize, Field(description=f"OS disk size in GiB (default {DEFAULT_DISK_SIZE_GB}), or like 1TB."),
    ] = None
    disk_tier: Annotated[
        fields.DiskTier, Field(description="OS disk performance tier (low, medium, high, ultra, best), mapped per "
                               "cloud to a volume type; offers that cannot serve it are left out."),
    ] = None
    network_tier: Annotated[
        fields.NetworkTier, Field(description="Network tier: standard, or best (only instance types with the "
                                  "cloud's fast network: EFA, GPUDirect, InfiniBand)."),
    ] = None
    ports: Annotated[
        fields.Ports, Field(description="Ports to open: 8080, \"8000-8010\" or a list: the cloud firewall admits "
                            "them from cloud.ports_cidr; on the local cloud they are on the node's loopback."),
    ] = None
    image_id: Annotated[
        fields.ImageId,
        Field(description="Machine image (AMI, GCP image, Azure image ID), or a mapping region -> image; "
              "docker:<image> (a container) is not supported yet."),
    ] = None
    labels: Annotated[
        dict[Annotated[StrictStr, Field(max_length=values.MAX_LABEL_KEY)],
             Annotated[StrictStr, Field(max_length=values.MAX_LABEL_VALUE)]] | None,
        Field(max_length=values.MAX_LABELS,
              description="Labels (tags) for the instances; an any_of/ordered entry adds to these."),
    ] = None
    accelerator_args: Annotated[
        AcceleratorArgs | None, Field(description="TPU settings (runtime_version, tpu_vm, ...); with "
                                      "accelerators: tpu-..., which only GCP offers."),
    ] = None
    autostop: Annotated[
        fields.Autostop,
        Field(description="Accepted for SkyPilot compatibility and ignored: a managed job's cluster is always "
              "torn down when the job ends."),
    ] = None


class ResourceOption(_ResourceFields):
    """One entry of `any_of` or `ordered`: fields here override those of the enclosing resources."""

    accelerators: Annotated[
        fields.OneAccelerator,
        Field(description="One accelerator per node, like H100:8 or {H100: 8}."),
    ] = None


class Resources(_ResourceFields):
    """A task's `resources:` section (SkyPilot's field names; `gpus` is accepted as an alias of accelerators)."""

    accelerators: Annotated[
        fields.Accelerators,
        Field(description="Accelerators per node: `H100:8`, `{H100: 8}`, a list of ordered alternatives "
              "`[A100:1, T4:1]`, or a set of alternatives `{'A100:1', 'T4:1'}`. Counts may be fractions."),
    ] = None
    any_of: Annotated[
        list[ResourceOption] | None,
        Field(min_length=1, max_length=values.MAX_ALTERNATIVES,
              description="Alternatives, any of which will do: each overrides fields of this section."),
    ] = None
    ordered: Annotated[
        list[ResourceOption] | None,
        Field(min_length=1, max_length=values.MAX_ALTERNATIVES,
              description="Alternatives in order of preference: each overrides fields of this section."),
    ] = None

    @model_validator(mode="after")
    def _combinations(self) -> Resources:
        if self.any_of is not None and self.ordered is not None:
            raise fields.fail("any_of and ordered cannot both be given; use one")
        _check_placement(self, None, "")
        options = self.any_of if self.any_of is not None else self.ordered
        section = "any_of" if self.any_of is not None else "ordered"
        for index, option in enumerate(options or []):
            _check_placement(option, self, f".{section}[{index}]")
        several = values.accelerator_alternatives(self.accelerators)
        if len(several) > 1 and self.ordered:
            raise fields.fail("several accelerators cannot be combined with ordered; put each in an ordered entry",
                              ".accelerators")
        if len(several) > 1 and self.any_of and isinstance(self.accelerators, list) \
                and not isinstance(self.accelerators, values.AcceleratorSet):
            raise fields.fail("an ordered list of accelerators cannot be combined with any_of; "
                              "use a set {'A100:1', 'T4:1'} or put each in an any_of entry", ".accelerators")
        self._check_one_recovery()
        return self

    def _check_one_recovery(self) -> None:
        """SkyPilot refuses alternatives whose job_recovery differ: a job recovers one way."""
        merged_list = self._merged_options()
        recoveries = [merged["job_recovery"] for merged in merged_list]
        if len({json.dumps(r.spec().to_json() if r else None, sort_keys=True) for r in recoveries}) > 1:
            section = "any_of" if self.any_of is not None else "ordered"
            firsts: dict[str, int] = {}
            for index, r in enumerate(recoveries):
                firsts.setdefault(json.dumps(r.spec().to_json() if r else None, sort_keys=True), index)
            a, b = list(firsts.values())[:2]
            raise fields.fail(f"{section}[{a}] and {section}[{b}] have different job_recovery; a job recovers one "
                              "way: give job_recovery once, in resources")

    def options(self) -> list[ResourceOption] | None:
        return self.any_of if self.any_of is not None else self.ordered

    def is_ordered(self) -> bool:
        """Whether the candidates are in strict preference order (ordered, or a list of accelerators)."""
        if self.ordered is not None:
            return True
        return (self.any_of is None and isinstance(self.accelerators, list) and len(self.accelerators) > 1
                and not isinstance(self.accelerators, values.AcceleratorSet))

    def candidates(self) -> list[Candidate]:
        """Every alternative, in preference order; duplicates dropped. Each any_of/ordered entry overrides the
        fields it sets (a null leaves the section's value, so a stored task re-validates to the same candidates);
        its labels are added to the section's."""
        out: list[Candidate] = []
        for merged in self._merged_options():
            for accelerators in values.accelerator_alternatives(merged["accelerators"]):
                candidate = _candidate(merged, accelerators)
                if candidate not in out:
                    out.append(candidate)
        return out

    def _merged_options(self) -> list[dict[str, Any]]:
        """Each any_of/ordered entry merged over this section (the section alone when there is none)."""
        base = {name: getattr(self, name) for name in _ResourceFields.model_fields}
        base["accelerators"] = self.accelerators
        merged_list = []
        options: list[Any] = list(self.options() or [])
        if not options:
            options = [None]
        for option in options:
            merged = dict(base)
            if option is not None:
                for name in (*_ResourceFields.model_fields, "accelerators"):
                    value = getattr(option, name)
                    if value is None:
                        continue
                    if name == "labels":
                        value = {**(merged["labels"] or {}), **value}
                    merged[name] = value
            merged_list.append(merged)
        return merged_list


def _check_placement(option: _ResourceFields, section: Resources | None, at: str) -> None:
    """SkyPilot refuses infra together with cloud/region/zone, also across a section and its entries."""
    legacy = [name for name in ("cloud", "region", "zone") if getattr(option, name) is not None]
    if option.infra is not None and legacy:
        raise fields.fail(f"infra and {'/'.join(legacy)} cannot both be given; use infra, like aws/us-east-1", at)
    if section is None:
        return
    section_legacy = [name for name in ("cloud", "region", "zone") if getattr(section, name) is not None]
    if option.infra is not None and section_legacy:
        raise fields.fail(f"infra here and {'/'.join(section_legacy)} in resources cannot be combined; "
                          "use infra in both", at)
    if legacy and section.infra is not None:
        raise fields.fail(f"{'/'.join(legacy)} here and infra in resources cannot be combined; "
                          "use infra in both", at)


def _candidate(merged: dict[str, Any], accelerators: dict[str, float]) -> Candidate:
    if merged["infra"] is not None:
        parts = values.parse_infra(merged["infra"])
        cloud, region, zone = parts.cloud, parts.region, parts.zone
    else:
        cloud, region, zone = merged["cloud"], merged["region"], merged["zone"]
    if cloud is None and any(name.lower().startswith("tpu-") for name in accelerators):
        cloud = "gcp"  # TPUs are GCP's: SkyPilot's loader sets the cloud of a TPU request to GCP
    recovery: JobRecovery | None = merged["job_recovery"]
    return Candidate(
        infra=values.format_infra(cloud, region, zone),
        cloud=cloud,
        region=region,
        zone=zone,
        cpus=merged["cpus"],
        memory=merged["memory"],
        accelerators=dict(accelerators),
        instance_type=merged["instance_type"],
        use_spot=bool(merged["use_spot"]),
        disk_size=merged["disk_size"] if merged["disk_size"] is not None else DEFAULT_DISK_SIZE_GB,
        labels=dict(merged["labels"] or {}),
        job_recovery=recovery.spec() if recovery is not None else None,
        disk_tier=merged["disk_tier"],
        network_tier=merged["network_tier"],
        ports=tuple(merged["ports"] or ()),
        image_id=tuple(sorted(image.items())) if isinstance(image := merged["image_id"], dict) else image,
        accelerator_args=tuple(sorted(args.model_dump(exclude_none=True).items()))
        if (args := merged["accelerator_args"]) is not None else (),
    )


__all__ = ["AcceleratorArgs", "Candidate", "JobRecovery", "JobRecoverySpec", "ResourceOption", "Resources"]
