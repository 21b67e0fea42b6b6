"""A task (one document of a task YAML) and a pipeline (the whole YAML), with SkyPilot's field names."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    WrapValidator,
    model_validator,
)

from orchestrator.spec import fields, git_workdir, values
from orchestrator.spec.resources import Candidate, Resources
from orchestrator.spec.values import kind

REDACTED = "<redacted>"


def is_bucket_url(text: str) -> bool:
    """`s3://b/p`, `gs://b`, `https://acct.blob.core.windows.net/c`, ...: anything with a URL scheme."""
    return "://" in text


def _storage_source(value: Any) -> str | list[str]:
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        return value
    raise values.Bad(f"must be a path or URL, or a list of them, not {kind(value)}")


class StorageSpec(BaseModel):
    """A storage object under file_mounts (SkyPilot's bucket mount)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[StrictStr | None, Field(description="Bucket name; `${VAR}` from envs is filled in.")] = None
    source: Annotated[
        str | list[str] | None,
        fields.parsed(_storage_source),
        fields.schema({"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}}]}),
        Field(description="Local path(s) to upload, or a bucket URL to mount."),
    ] = None
    store: Annotated[
        StrictStr | None,
        BeforeValidator(lambda v: v if v is None else _choice(v, values.STORE_TYPES, "store", upper=False)),
        Field(description=f"Where the bucket lives: {', '.join(values.STORE_TYPES)}."),
    ] = None
    persistent: Annotated[
        StrictBool | None, Field(description="Keep the bucket after the job (default true)."),
    ] = None
    mode: Annotated[
        StrictStr | None,
        BeforeValidator(lambda v: v if v is None else _choice(v, values.STORAGE_MODES, "mount mode", upper=True)),
        Field(description=f"How to attach it: {', '.join(values.STORAGE_MODES)}."),
    ] = None
    mount_options: Annotated[StrictStr | None, Field(description="Extra options for the mount tool.")] = None
    type: Annotated[StrictStr | None, Field(description="Mount type (SkyPilot's file mount type).")] = None
    config: Annotated[dict[StrictStr, Any] | None, Field(description="Store-specific settings.")] = None

    @model_validator(mode="after")
    def _named_or_sourced(self) -> StorageSpec:
        if self.name is None and self.source is None:
            raise fields.fail("a storage mount needs a name or a source")
        if self.name is None and self.local_sources():
            raise fields.fail("a storage mount with a local source needs a name: the bucket to upload it to")
        if isinstance(self.source, list) and any(is_bucket_url(s) for s in self.source):
            raise fields.fail("a list of sources must be local paths; give one bucket URL as a string", ".source")
        return self

    def local_sources(self) -> list[str]:
        """The local paths of `source` (none when it is a bucket URL)."""
        sources = [self.source] if isinstance(self.source, str) else list(self.source or [])
        return [s for s in sources if not is_bucket_url(s)]


def _choice(value: Any, choices: tuple[str, ...], what: str, *, upper: bool) -> str:
    try:
        return values.parse_choice(value, choices, what, upper=upper)
    except values.Bad as exc:
        raise fields.fail(exc.message) from None


def _storage_object(value: Any, _handler: Any, info: ValidationInfo) -> dict[str, Any]:
    """Check a storage object against StorageSpec, and keep it as given, with local sources made absolute."""
    spec = StorageSpec.model_validate(value)
    kept = dict(value)
    if spec.local_sources():
        resolved = [fields.storage_local_source(s, info) for s in spec.local_sources()]
        kept["source"] = resolved[0] if isinstance(spec.source, str) else resolved
    return kept


class PoolSection(BaseModel):
    """The `pool:` section of a pool YAML (`sortie jobs pool apply`): how many workers, and how they scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workers: Annotated[
        StrictInt | None,
        Field(ge=0, description="Workers to keep (each its own stack). With min_workers/max_workers: where to start."),
    ] = None
    min_workers: Annotated[
        StrictInt | None, Field(ge=0, description="Sortie: autoscaling floor (0 lets an idle pool scale to zero).")
    ] = None
    max_workers: Annotated[
        StrictInt | None, Field(ge=1, description="Sortie: autoscaling ceiling, reached while jobs are pending.")
    ] = None
    idle_timeout: Annotated[
        fields.Duration,
        Field(description="Sortie: an idle worker above min_workers is removed after this long (90s, 5m)."),
    ] = None
    jobs_per_worker: Annotated[
        StrictInt, Field(ge=1, le=64, description="Sortie: jobs a worker runs at once (default 1); accelerators "
                         "are split between them."),
    ] = 1

    @model_validator(mode="after")
    def _consistent(self) -> PoolSection:
        if self.workers is None and self.min_workers is None and self.max_workers is None:
            raise fields.fail("give workers: N (or min_workers/max_workers)")
        low = self.min_workers or 0
        if self.max_workers is not None and low > self.max_workers:
            raise fields.fail(f"min_workers ({low}) is above max_workers ({self.max_workers})")
        if self.workers is not None and self.max_workers is not None and self.workers > self.max_workers:
            raise fields.fail(f"workers ({self.workers}) is above max_workers ({self.max_workers})")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.min_workers is not None or self.max_workers is not None


def _mapping_or_empty(value: Any) -> Any:
    return {} if value is None else value


def _secrets_input(value: Any) -> Any:
    if isinstance(value, list):
        raise fields.fail("must be a mapping NAME: value (references to managed secrets are not supported yet)")
    return {} if value is None else value


def _file_mounts_schema(schema: dict[str, Any]) -> None:
    schema["additionalProperties"] = {"anyOf": [{"type": "string"}, StorageSpec.model_json_schema()]}
    schema.pop("propertyNames", None)


class Task(BaseModel):
    """One task of a task YAML. Relative local paths resolve against the current working directory, as in
    SkyPilot; after a load they are absolute."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[fields.Name, Field(description="Task name (letters, digits, . _ -).")] = None
    workdir: Annotated[
        fields.Workdir,
        Field(description="Local directory synced to every node, or a git repository {url, ref} every node "
              "clones at ref; setup and run start in it."),
    ] = None
    num_nodes: Annotated[
        StrictInt,
        Field(ge=1, le=values.MAX_NUM_NODES, description="Number of nodes (default 1); at most "
              "`jobs.max_num_nodes` and what the chosen infra can hold."),
    ] = 1
    resources: Annotated[
        Resources,
        BeforeValidator(_mapping_or_empty),
        Field(description="What each node needs, and where it may run."),
    ] = Field(default_factory=Resources)
    envs: Annotated[
        fields.EnvMap,
        BeforeValidator(_mapping_or_empty),
        Field(description="Environment variables of setup and run. A null value must be given with --env NAME=..."),
    ] = Field(default_factory=dict)
    secrets: Annotated[
        fields.EnvMap,
        BeforeValidator(_secrets_input),
        Field(description="Like envs, but their values are never shown. A null value must be given with "
              "--secret NAME=..."),
    ] = Field(default_factory=dict)
    file_mounts: Annotated[
        dict[fields.MountDestination, fields.LocalSource],
        Field(max_length=values.MAX_FILE_MOUNTS),
        BeforeValidator(_mapping_or_empty),
        Field(description="Node path -> a local file or directory to copy there, a bucket URL (s3://..., "
              "local://...) to copy, or a storage object {name, source, store, mode, persistent} to mount. "
              "`${VAR}` from envs is filled in.", json_schema_extra=_file_mounts_schema),
    ] = Field(default_factory=dict)
    storage_mounts: Annotated[
        dict[fields.StorageDestination, Annotated[dict[str, Any], WrapValidator(_storage_object)]],
        BeforeValidator(_mapping_or_empty),
        Field(description="Bucket mounts taken from file_mounts, kept as written (not a YAML field)."),
    ] = Field(default_factory=dict)
    setup: Annotated[fields.Command, Field(description="Shell commands run once on every node before run.")] = None
    run: Annotated[fields.Command, Field(description="Shell commands of the job, run on every node.")] = None
    pool: Annotated[
        PoolSection | None,
        Field(description="Only in a pool YAML (`sortie jobs pool apply`): the workers; `run` is then ignored."),
    ] = None
    config: Annotated[
        dict[StrictStr, Any] | None,
        Field(description="Per-task config overrides (SkyPilot's `config:`): kubernetes.pod_config (merged into "
              "the pod spec) and docker.run_options; any other key is refused."),
    ] = None
    inputs: Annotated[
        dict[StrictStr, float] | None,
        Field(description="SkyPilot's optimizer hint (input location and size); accepted and ignored."),
    ] = None
    outputs: Annotated[
        dict[StrictStr, float] | None,
        Field(description="SkyPilot's optimizer hint (output location and size); accepted and ignored."),
    ] = None

    @model_validator(mode="before")
    @classmethod
    def _split_file_mounts(cls, data: Any) -> Any:
        """Bucket URLs and storage objects under file_mounts go to storage_mounts."""
        if not isinstance(data, dict) or not isinstance(data.get("file_mounts"), dict):
            return data
        data = dict(data)
        local: dict[Any, Any] = {}
        storage: dict[Any, Any] = dict(data["storage_mounts"]) if isinstance(data.get("storage_mounts"), dict) else {}
        for destination, source in data["file_mounts"].items():
            if isinstance(source, dict):
                storage[destination] = source
            elif isinstance(source, str) and is_bucket_url(source):
                storage[destination] = {"source": source, "mode": "COPY"}  # a bare URL is copied, as in SkyPilot
            else:
                local[destination] = source
        data["file_mounts"] = local
        if storage or "storage_mounts" in data:
            data["storage_mounts"] = storage
        return data

    def candidates(self) -> list[Candidate]:
        """Every resource alternative, in preference order (see `resources_ordered`)."""
        return self.resources.candidates()

    def resources_ordered(self) -> bool:
        """True when the candidates are in strict preference order (`ordered:` or a list of accelerators);
        False when any of them will do (the optimizer may pick the cheapest)."""
        return self.resources.is_ordered()

    def to_json(self) -> dict[str, Any]:
        """The normalized form `jobs launch --dryrun --json` prints; secret values are redacted. A git workdir
        puts its clone before `setup` (`git_workdir.with_clone`), so every node of every attempt clones it."""
        return git_workdir.with_clone({
            "name": self.name,
            "num_nodes": self.num_nodes,
            "envs": dict(self.envs),
            "secrets": {key: REDACTED for key in self.secrets},
            "setup": self.setup,
            "run": self.run,
            "workdir": self.workdir,
            "file_mounts": dict(self.file_mounts),
            "storage_mounts": {key: dict(value) for key, value in self.storage_mounts.items()},
            "resources": [candidate.to_json() for candidate in self.candidates()],
            "resources_ordered": self.resources_ordered(),
            **({"config": self.config} if self.config else {}),
            **({"pool": self.pool.model_dump(mode="json")} if self.pool else {}),
        })

    def resources_str(self) -> str:
        """A short summary for tables, like SkyPilot's: `1x[CPU:2+]`, `2x[H100:8]`, `1x[A100:1|T4:1, spot]`."""
        candidates = self.candidates()
        parts = list(dict.fromkeys(candidate.summary() for candidate in candidates))
        spot = ", spot" if candidates and all(candidate.use_spot for candidate in candidates) else ""
        return f"{self.num_nodes}x[{'|'.join(parts)}{spot}]"

    def unsupported_features(self) -> list[str]:
        """What this task asks for that Sortie cannot launch yet, one line each naming the YAML path. Empty when
        it can be launched. Loading never fails for these, so `--dryrun` still shows the task."""
        found = [f"file_mounts.{destination}: {problem}" for destination, mount in self.storage_mounts.items()
                 if (problem := _unsupported_store(mount))]
        clouds = dict.fromkeys(c.cloud for c in self.candidates() if c.cloud and c.cloud not in values.SORTIE_CLOUDS)
        found += [f"resources: cloud {cloud} is not supported (Sortie runs on {', '.join(values.SORTIE_CLOUDS)})"
                  for cloud in clouds]
        return found


def _unsupported_store(mount: dict[str, Any]) -> str | None:
    store = mount.get("store")
    source = mount.get("source")
    if isinstance(source, str) and is_bucket_url(source):
        scheme = source.split("://", 1)[0].lower()
        if scheme not in values.SORTIE_STORES:
            return f"{scheme}:// buckets are not supported yet (stores: {', '.join(values.SORTIE_STORES)})"
    if store and store.lower() not in values.SORTIE_STORES:
        return f"store {store} is not supported yet (stores: {', '.join(values.SORTIE_STORES)})"
    return None


def yaml_task_fields() -> list[str]:
    """The fields a task document may hold."""
    return sorted(name for name in Task.model_fields if name != "storage_mounts")


class Pipeline(BaseModel):
    """A loaded task YAML: one task, or a chain of tasks run one after another."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[
        str | None,
        Field(description="From a first document holding only `name:`; for a single task, the task's name."),
    ] = None
    tasks: Annotated[list[Task], Field(min_length=1, max_length=values.MAX_PIPELINE_TASKS,
                                       description="The tasks, in the order they run.")]
    is_pipeline: Annotated[
        bool, Field(description="True when the YAML had several documents (even if one task resulted)."),
    ] = False
    execution: Annotated[
        Literal["serial", "parallel"],
        Field(description="serial: a pipeline, one task after another; parallel: a job group (SkyPilot's "
              "`execution: parallel` header), every task at once on its own cluster."),
    ] = "serial"
    primary_tasks: Annotated[
        list[str] | None,
        Field(description="Job group: the tasks whose end ends the group (default: all of them)."),
    ] = None
    termination_delay: Annotated[
        float | dict[str, float] | None,
        Field(description="Job group: seconds the other tasks keep running after the primary tasks end (one "
              "number, or per task name with `default`)."),
    ] = None
    warnings: Annotated[
        list[str], Field(description="What the load ignored, one line each (a `service:` section, overrides)."),
    ] = Field(default_factory=list)

    @property
    def is_job_group(self) -> bool:
        return self.execution == "parallel"

    def to_json(self) -> dict[str, Any]:
        """The normalized form `jobs launch --dryrun --json` prints."""
        group = {"execution": self.execution, "primary_tasks": self.primary_tasks,
                 "termination_delay": self.termination_delay} if self.is_job_group else {}
        return {"name": self.name, "tasks": [task.to_json() for task in self.tasks], **group}

    _lines: dict[str, int] = PrivateAttr(default_factory=dict)
    _source: str = PrivateAttr(default="")

    def set_lines(self, lines: dict[str, int], source: str) -> None:
        """Where each field was written (the loader's `key_lines`), for messages found after loading."""
        self._lines, self._source = dict(lines), source

    def where(self, field: str) -> str:
        """`field` with the file and line it was written at, when known: `file_mounts./x (task.yaml line 4)`."""
        line = self._lines.get(field)
        return f"{field} ({self._source} line {line})" if line else field
