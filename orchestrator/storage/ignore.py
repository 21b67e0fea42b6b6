"""Which files of an upload `.skyignore` and `.gitignore` exclude.

SkyPilot's rule: a top-level `.skyignore` replaces `.gitignore`. Without one, every `.gitignore` in the tree
applies to its own directory and below, with git's semantics (pathspec's gitwildmatch): within a file the last
matching pattern wins, a deeper file overrides a shallower one, `!pattern` re-includes, and nothing inside an
excluded directory can be re-included. `.git` directories are never uploaded while ignore files are used
(SkyPilot excludes `.git/*` from bucket uploads too).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pathspec.patterns.gitwildmatch import GitWildMatchPattern

SKYIGNORE = ".skyignore"
GITIGNORE = ".gitignore"


def _read_patterns(path: Path) -> list[GitWildMatchPattern]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    patterns = []
    for line in lines:
        try:
            pattern = GitWildMatchPattern(line)
        except ValueError:  # a malformed line is skipped, as git does
            continue
        if pattern.include is not None:
            patterns.append(pattern)
    return patterns


@dataclass(frozen=True)
class _Rules:
    """The patterns of one ignore file, relative to `base` (a posix path under the root, "" for the root)."""

    base: str
    patterns: tuple[GitWildMatchPattern, ...]

    def verdict(self, rel: str, is_dir: bool) -> bool | None:
        """True: excluded, False: re-included, None: no pattern matches."""
        if self.base:
            if not rel.startswith(self.base + "/"):
                return None
            rel = rel[len(self.base) + 1 :]
        candidate = rel + "/" if is_dir else rel
        result: bool | None = None
        for pattern in self.patterns:
            found = pattern.match_file(candidate)
            if found is not None and not _through_parent(found.match, candidate):
                result = bool(pattern.include)
        return result


def _through_parent(match: re.Match[str], candidate: str) -> bool:
    """Whether a gitwildmatch regex matched only a parent directory of `candidate` (its "ps_d" group marks
    the slash after a matched directory). Parents are decided when the walk reaches them, so such a match
    must not decide the entry: `!*/` re-includes directories, not every file inside them."""
    if "ps_d" not in match.re.groupindex or match.start("ps_d") < 0:
        return False
    return match.end("ps_d") < len(candidate)


@dataclass
class IgnoreRules:
    """The exclusion rules of one upload tree. Walk the tree top-down, calling `enter` on each directory
    before asking `excluded` about its entries."""

    root: Path
    enabled: bool = True
    skyignore: bool = False
    _rules: dict[str, _Rules] = field(default_factory=dict)

    @classmethod
    def for_tree(cls, root: Path, *, enabled: bool = True) -> IgnoreRules:
        rules = cls(root=root, enabled=enabled)
        if enabled and (root / SKYIGNORE).is_file():
            rules.skyignore = True
            rules._rules[""] = _Rules("", tuple(_read_patterns(root / SKYIGNORE)))
        return rules

    @property
    def source(self) -> str:
        """What the rules come from, for messages."""
        if not self.enabled:
            return "no ignore files"
        return SKYIGNORE if self.skyignore else GITIGNORE

    def enter(self, rel_dir: str, path: Path) -> None:
        """Load the `.gitignore` of a directory (posix path `rel_dir` under the root, "" for the root)."""
        if not self.enabled or self.skyignore:
            return
        gitignore = path / GITIGNORE
        if gitignore.is_file():
            patterns = _read_patterns(gitignore)
            if patterns:
                self._rules[rel_dir] = _Rules(rel_dir, tuple(patterns))

    def excluded(self, rel: str, is_dir: bool) -> bool:
        """Whether the entry at posix path `rel` under the root is left out. Its parent directories are
        assumed not excluded (the walk prunes excluded directories)."""
        if not self.enabled:
            return False
        if is_dir and rel.rsplit("/", 1)[-1] == ".git":
            return True
        parts = rel.split("/")
        # The deepest ignore file with a matching pattern decides; root first, so later ones override.
        bases = [""] + ["/".join(parts[:i]) for i in range(1, len(parts))]
        result = False
        for base in bases:
            rules = self._rules.get(base)
            if rules is not None:
                verdict = rules.verdict(rel, is_dir)
                if verdict is not None:
                    result = verdict
        return result
