"""Policy, which `config.docker.run_options` a task may give its container (image_id: docker:... on the local
cloud; issue 28, item 2).

An allow-list: only options that shape the container's resources or its own insides are accepted (`SAFE`);
everything else (a host path mounted, a device, a capability, a namespace of the host, another user, confinement
switched off, an option this module does not know) is refused at launch and at `--dryrun` in one line naming the
option, unless the operator lists it in `docker.allowed_run_options` (config.yaml). A deny-list would let the next
engine release's new option through; an allow-list closes the class.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

# Safe options that take a value, and safe flags (long names, as `docker run --help` spells them).
SAFE_VALUED = frozenset({
    "--shm-size", "--ulimit", "--env", "--label", "--memory", "--memory-reservation", "--memory-swap",
    "--memory-swappiness", "--cpus", "--cpu-shares", "--cpuset-cpus", "--cpuset-mems", "--cpu-period",
    "--cpu-quota", "--pids-limit", "--workdir", "--tmpfs", "--stop-signal", "--stop-timeout", "--gpus", "--tz",
})
SAFE_FLAGS = frozenset({"--init", "--read-only", "--rm", "--tty", "--interactive", "--no-healthcheck"})
SAFE = SAFE_VALUED | SAFE_FLAGS

# Options known to take a value though they are not safe: parsed right, so `-v /a:/b` names `-v`, not `/a:/b`.
OTHER_VALUED = frozenset({
    "--volume", "--mount", "--device", "--cap-add", "--cap-drop", "--security-opt", "--pid", "--ipc", "--userns",
    "--user", "--network", "--net", "--uts", "--group-add", "--sysctl", "--env-file", "--annotation", "--uidmap",
    "--gidmap", "--volumes-from", "--hostname", "--publish", "--add-host", "--dns", "--entrypoint", "--name",
    "--cgroupns", "--cgroup-parent", "--device-cgroup-rule", "--oom-score-adj", "--log-driver", "--log-opt",
    "--pod", "--platform", "--pull", "--runtime", "--hooks-dir", "--subuidname", "--subgidname",
    "--secret", "--mac-address", "--ip", "--expose", "--link", "--cidfile", "--label-file", "--attach",
})
VALUED = SAFE_VALUED | OTHER_VALUED

SHORT = {"e": "--env", "l": "--label", "m": "--memory", "c": "--cpu-shares", "w": "--workdir", "t": "--tty",
         "i": "--interactive", "v": "--volume", "u": "--user", "p": "--publish", "h": "--hostname",
         "P": "--publish-all", "d": "--detach", "a": "--attach"}

WHY = {  # what a refused option would do, in a few words
    "--volume": "mounts a host path into the container", "--mount": "mounts a host path into the container",
    "--volumes-from": "mounts another container's volumes", "--device": "gives the container a host device",
    "--device-cgroup-rule": "gives the container host devices", "--cap-add": "adds capabilities",
    "--privileged": "turns off the container's confinement", "--security-opt": "changes the container's confinement",
    "--pid": "shares a process namespace", "--ipc": "shares an IPC namespace (use --shm-size for shared memory)",
    "--userns": "changes the user namespace", "--uts": "shares the host's UTS namespace",
    "--network": "changes the node's network (containers use the node's, as plain runs do)",
    "--net": "changes the node's network (containers use the node's, as plain runs do)",
    "--user": "chooses the container's user (Sortie runs it as the node's own user)",
    "--group-add": "adds host groups to the container's user", "--uidmap": "changes the user namespace",
    "--gidmap": "changes the user namespace", "--sysctl": "changes kernel settings",
    "--env-file": "reads a file of the node's", "--env-host": "copies the node agent's environment",
    "--hooks-dir": "runs hooks on the node", "--annotation": "can trigger hooks on the node",
    "--cgroup-parent": "moves the container's cgroup", "--cgroupns": "shares a cgroup namespace",
    "--oom-score-adj": "changes how the node's memory killer treats it", "--runtime": "changes the runtime",
    "--entrypoint": "replaces Sortie's entrypoint", "--name": "replaces Sortie's container name",
    "--rootfs": "runs a host directory as the container", "--secret": "reads the engine's secrets",
}
ALLOW_HINT = "remove it, or ask the operator to allow it (docker.allowed_run_options in config.yaml)"


def long_name(name: str) -> str:
    """`-v` -> `--volume`; a long name as is."""
    return SHORT.get(name[1:], name) if len(name) == 2 and name[0] == "-" and name[1] != "-" else name


def _refusal(name: str, shown: str, where: str) -> str:
    if name in WHY:
        return f"{where}: {shown} is refused ({WHY[name]}); {ALLOW_HINT}"
    return f"{where}: {shown} is not an option Sortie lets a task give its container; {ALLOW_HINT}"


def _env_problem(value: str, where: str) -> str | None:
    if "=" not in value:  # `-e NAME` copies NAME from the node agent's own environment
        return f"{where}: --env {value} must be NAME=VALUE (a bare NAME would copy the node agent's environment)"
    return None


def problems(options: Sequence[str], allowed: Collection[str] = (), where: str = "config.docker.run_options"
             ) -> list[str]:
    """One line per refused option (empty when every option may be given); `allowed` are long names the
    operator allows besides `SAFE`."""
    ok = SAFE | {long_name(a) for a in allowed}
    found: list[str] = []
    tokens = list(options)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        for name, shown, value in _split(token, tokens, index):
            if value is not None and value[1]:
                index += 1  # the value was the next token
            if name is None:
                found.append(f"{where}: {shown!r} is not an option (options start with -, like --shm-size=16g)")
            elif name not in ok:
                found.append(_refusal(name, shown, where))
            elif name == "--env" and value is not None and (trouble := _env_problem(value[0], where)):
                found.append(trouble)
            elif name in VALUED and value is None:
                found.append(f"{where}: {shown} needs a value")
    return found


def _split(token: str, tokens: list[str], index: int) -> Iterable[tuple[str | None, str, tuple[str, bool] | None]]:
    """The options in one token: (long name or None for a stray word, as written, (value, taken from the next
    token) or None)."""
    following = tokens[index] if index < len(tokens) else None
    if token.startswith("--") and len(token) > 2:
        name, eq, inline = token.partition("=")
        if eq:
            yield name, name, (inline, False)
        elif name in VALUED or (name not in SAFE_FLAGS and following is not None and not following.startswith("-")
                                and name not in WHY):
            yield name, name, ((following, True) if following is not None else None)
        else:
            yield name, name, None
        return
    if not token.startswith("-") or len(token) < 2:
        yield None, token, None
        return
    letters = token[1:]
    for at, letter in enumerate(letters):  # `-it`, `-eNAME=1`, `-e NAME=1`
        name = SHORT.get(letter, f"-{letter}")
        rest = letters[at + 1:]
        if name in VALUED:
            if rest:
                yield name, f"-{letter}", (rest.removeprefix("="), False)
            else:
                yield name, f"-{letter}", ((following, True) if following is not None else None)
            return
        yield name, f"-{letter}", None


def task_problems(tasks: Sequence[Any], allowed: Collection[str]) -> list[str]:
    """`problems` of each task's config.docker.run_options (named by task when there are several)."""
    from orchestrator.policy.cloud_features import config_features

    found: list[str] = []
    for index, task in enumerate(tasks):
        options = config_features({"config": task.config or {}})["container_options"]
        prefix = f"task[{index}] ({task.name or '-'}): " if len(tasks) > 1 else ""
        found += [prefix + line for line in problems(options, allowed)]
    return found
