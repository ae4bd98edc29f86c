"""The model registry: versioned model files per model name, one version active.

Layout under the registry folder (``[models] registry`` in config.toml)::

    t1-to-t2/
        v1.pt        a model file (weights and card, see pipeline.model.card)
        v1.json      the same card, readable (written beside each model)
        ACTIVE       the active version's name, e.g. "v1"

Activation rewrites ACTIVE atomically, so a running worker sees either the old or the new
version and picks the new one up before its next job.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.files import write_atomically

if TYPE_CHECKING:
    from pipeline.model.card import ModelCard

MODEL_SUFFIX = ".pt"
ACTIVE_FILE = "ACTIVE"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RegistryError(Exception):
    """The registry cannot answer: the message says what is missing and how to fix it."""


class ModelRegistry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def versions(self, name: str) -> list[str]:
        folder = self._folder(name)
        found = [p.stem for p in folder.glob("*" + MODEL_SUFFIX)] if folder.is_dir() else []
        return sorted(found, key=_version_key)

    def active_version(self, name: str) -> str:
        marker = self._folder(name) / ACTIVE_FILE
        try:
            version = marker.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise RegistryError(
                f"model {name!r} has no active version: no {marker} "
                f"(train one with `dicomnode train`, or `dicomnode models activate`)"
            ) from None
        except (OSError, UnicodeDecodeError) as error:
            if self.root.exists() and not self.root.is_dir():
                raise RegistryError(
                    f"the model registry {self.root} is a file, not a folder"
                ) from None
            raise RegistryError(f"model {name!r}: {marker} cannot be read ({error})") from None
        if not self.path(name, version).is_file():
            raise RegistryError(
                f"model {name!r}: active version {version!r} has no file {self.path(name, version)}"
            )
        return version

    def active_versions(self) -> dict[str, str]:
        """Each model's active version, for the models that have one."""
        versions = {}
        for name in self.names():
            try:
                versions[name] = self.active_version(name)
            except RegistryError:
                continue
        return versions

    def active_path(self, name: str) -> Path:
        return self.path(name, self.active_version(name))

    def find(self, spec: str) -> Path:
        """A model file named by ``spec``: a file itself, else NAME (its active version) or
        NAME:VERSION in this registry. Raises RegistryError when there is none."""
        if Path(spec).is_file():
            return Path(spec)
        if spec.endswith(MODEL_SUFFIX) or "/" in spec:
            raise RegistryError(f"no model file {spec}")
        name, _, version = spec.partition(":")
        return self.path(name, version) if version else self.active_path(name)

    def path(self, name: str, version: str) -> Path:
        _check_name(version, "version")
        return self._folder(name) / (version + MODEL_SUFFIX)

    def activate(self, name: str, version: str) -> None:
        """Make ``version`` the one jobs use, after checking its file loads."""
        if name not in self.names():
            known = ", ".join(self.names()) or "none"
            raise RegistryError(f"no model named {name!r} in {self.root} (models: {known})")
        path = self.path(name, version)
        if not path.is_file():
            known = ", ".join(self.versions(name)) or "none"
            raise RegistryError(f"model {name!r} has no version {version!r} (versions: {known})")
        from pipeline.model.card import load_model  # torch: only when a model is activated

        load_model(path)  # raises ModelFileError for a damaged file: never activate one
        write_atomically(self._folder(name) / ACTIVE_FILE, (version + "\n").encode())

    def next_version(self, name: str) -> str:
        numbers = [int(v[1:]) for v in self.versions(name) if re.fullmatch(r"v\d+", v)]
        return f"v{max(numbers, default=0) + 1}"

    def read_card(self, name: str, version: str) -> dict[str, Any]:
        """A version's card as plain data: the readable copy beside its file, else the
        file's own. Raises ModelFileError for a damaged file without a readable copy."""
        readable = self.path(name, version).with_suffix(".json")
        if readable.is_file():
            try:
                return json.loads(readable.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                from pipeline.model.card import ModelFileError  # torch: only for a damaged card

                raise ModelFileError(f"{readable} is not a readable model card: {error}") from None
        from pipeline.model.card import card_dict, load_model  # torch: only without a copy

        return card_dict(load_model(self.path(name, version)).card)

    def write_card(self, name: str, card: ModelCard) -> Path:
        """The readable copy of a card, beside its model file."""
        from pipeline.model.card import card_dict  # torch: only where a card is written

        path = self._folder(name) / f"{card.version}.json"
        write_atomically(path, (json.dumps(card_dict(card), indent=2) + "\n").encode())
        return path

    def _folder(self, name: str) -> Path:
        _check_name(name, "model name")
        return self.root / name


def _check_name(value: str, what: str) -> None:
    # Names become paths: no separators, no "..", nothing a shell would mangle.
    if not _NAME.match(value) or ".." in value:
        raise RegistryError(f"{what} {value!r} must be letters, digits, '-', '_' or '.'")


def _version_key(version: str) -> tuple[int, str]:
    match = re.fullmatch(r"v(\d+)", version)
    return (int(match.group(1)), "") if match else (10**9, version)
