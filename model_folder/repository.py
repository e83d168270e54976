"""A model repository: models by folder name, their numbered versions, and which to serve.

    repository/
      shapes/                 one model, named by its folder
        config.json           optional: {"version_policy": "latest:2",
        1/  2/  3/                       "labels": {"stable": 2, "canary": 3}}
      digits/                 a model folder itself: one version
        model.json ...

The layout is TF Serving's and Triton's. Only folders named by a number are versions, so a
version being written under any other name (training stages in `.staging-*`) is never seen.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from model_folder.errors import ModelFolderError
from model_folder.files import METADATA, MODEL_JSON
from model_folder.json_file import read_json
from model_folder.metadata import Metadata

CONFIG = "config.json"
POLICY_FORMS = "latest, latest:N, all or specific:V1,V2,..."


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model to serve, as TF Serving's model_version_policy."""

    kind: str = "latest"  # "latest", "all" or "specific"
    count: int = 1  # of "latest"
    versions: frozenset[int] = frozenset()  # of "specific"

    @classmethod
    def parse(cls, text: str, source: str = "MODEL_VERSION_POLICY") -> VersionPolicy:
        """Parse `latest`, `latest:N`, `all` or `specific:1,3`; name `source` if malformed."""
        kind, _, argument = text.strip().partition(":")
        try:
            if kind == "all" and not argument:
                return cls("all")
            if kind == "latest":
                count = int(argument) if argument else 1
                if count >= 1:
                    return cls("latest", count=count)
            if kind == "specific":
                versions = frozenset(int(v) for v in argument.split(","))
                if versions and min(versions) >= 0:
                    return cls("specific", versions=versions)
        except ValueError:
            pass
        raise ModelFolderError(f"{source}: version policy {text!r} is not one of {POLICY_FORMS}")

    def select(self, available: Iterable[int]) -> list[int]:
        """Return the versions of `available` this policy serves, oldest first."""
        ordered = sorted(set(available))
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.count :]

    def __str__(self) -> str:
        if self.kind == "specific":
            return "specific:" + ",".join(map(str, sorted(self.versions)))
        if self.kind == "all":
            return "all"
        return "latest" if self.count == 1 else f"latest:{self.count}"


@dataclass(frozen=True)
class ModelConfig:
    """A model's config.json: its version policy (None: the service's) and version labels."""

    version_policy: VersionPolicy | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> ModelConfig:
        """Read config.json at `path`; a missing file is the default config."""
        if not path.exists():
            return cls()
        document = read_json(path)
        if not isinstance(document, dict) or set(document) - {"version_policy", "labels"}:
            raise ModelFolderError(f'{path}: must be {{"version_policy": ..., "labels": {{...}}}}')
        policy = document.get("version_policy")
        if policy is not None and not isinstance(policy, str):
            raise ModelFolderError(f"{path}: version_policy must be a string ({POLICY_FORMS})")
        labels = document.get("labels", {})
        if not isinstance(labels, dict) or not all(
            isinstance(label, str) and label and str(version).isdigit()
            for label, version in labels.items()
        ):
            raise ModelFolderError(f'{path}: labels must map names to versions: {{"stable": 1}}')
        return cls(
            VersionPolicy.parse(policy, str(path)) if policy else None,
            {label: str(int(version)) for label, version in labels.items()},
        )


@dataclass(frozen=True)
class VersionFolder:
    """One version of a model on disk, and a fingerprint that changes when its files do."""

    version: str
    path: Path
    fingerprint: tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class ModelEntry:
    """One model of a repository as found on disk (nothing loaded or vetted yet)."""

    name: str
    folder: Path
    versions: Mapping[str, VersionFolder]  # by version, e.g. "3"
    config: ModelConfig = field(default_factory=ModelConfig)
    config_error: str = ""  # config.json is unreadable: the model keeps what it serves

    def served_versions(self, default: VersionPolicy, refused: Iterable[str] = ()) -> list[str]:
        """Return the versions to serve, oldest first: the policy applied to the versions
        on disk, less `refused` ones (which failed to load), so that a broken newest version
        leaves the one before it served, at start-up as after a reload."""
        policy = self.config.version_policy or default
        candidates = set(self.versions) - set(refused)
        return [str(v) for v in policy.select(int(v) for v in candidates)]


def scan_model(folder: Path, name: str | None = None) -> ModelEntry:
    """Return the model in `folder`: a model folder itself, or a folder of numbered versions.

    A model folder itself is one version: its metadata.json's version, else "1".
    """
    folder = Path(folder)
    name = name or folder.name
    config, config_error = ModelConfig(), ""
    try:
        config = ModelConfig.read(folder / CONFIG)
    except ModelFolderError as exc:
        config_error = str(exc)
    if (folder / MODEL_JSON).exists():
        try:
            version = Metadata.read(folder / METADATA).version or "1"
        except ModelFolderError:
            version = "1"  # the load reports the broken metadata.json
        found = {version: _version_folder(version, folder)}
    else:
        found = {}
        for child in _children(folder):
            if child.name.isdigit() and child.is_dir():
                version = str(int(child.name))
                found[version] = _version_folder(version, child)
    return ModelEntry(name, folder, found, config, config_error)


def scan_model_dir(folder: Path, name: str | None = None) -> ModelEntry:
    """Return the one model of MODEL_DIR, named `name`, else by its newest version's
    metadata.json, else by the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: model folder does not exist")
    entry = scan_model(folder, name)
    if name is None and entry.versions:
        newest = max(entry.versions.values(), key=lambda f: version_key(f.version))
        try:
            metadata_name = Metadata.read(newest.path / METADATA).name
        except ModelFolderError:
            metadata_name = None  # the load reports it
        if metadata_name:
            entry = replace(entry, name=metadata_name)
    return entry


def version_key(version: str) -> tuple[int, str]:
    """Sort versions by number (a version that is no number sorts first, by name)."""
    return (int(version), "") if version.isdigit() else (-1, version)


def scan_repository(repository: Path) -> dict[str, ModelEntry]:
    """Return every model of `repository`, by name (hidden folders are not models)."""
    repository = Path(repository)
    if not repository.is_dir():
        raise ModelFolderError(f"{repository}: model repository does not exist")
    return {
        child.name: scan_model(child)
        for child in _children(repository)
        if child.is_dir() and not child.name.startswith(".")
    }


def next_version(parent: Path) -> int:
    """Return one more than the highest numbered folder in `parent` (1 if none)."""
    numbers = [int(p.name) for p in _children(parent) if p.name.isdigit() and p.is_dir()]
    return max(numbers, default=0) + 1


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []  # removed meanwhile, or unreadable: nothing in it


def _version_folder(version: str, path: Path) -> VersionFolder:
    files = []
    for root, _dirs, names in os.walk(path):
        for file_name in names:
            full = Path(root) / file_name
            try:
                stat = full.stat()
            except OSError:
                continue  # removed meanwhile
            files.append((str(full.relative_to(path)), stat.st_size, stat.st_mtime_ns))
    return VersionFolder(version, path, tuple(sorted(files)))
