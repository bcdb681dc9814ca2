"""Model-weight registry: the JSON model list (model card + SHA-256 per version), checksum
verification and the weight cache outside the install. Never downloads anything.

Cache: ``$SPINEKIT_HOME/models`` when SPINEKIT_HOME is set, else ``~/.spinekit/models``;
weights live in ``<cache>/<model id>/<version>/<file>`` (or ``<cache>/<model id>/<file>``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from ..errors import InputError, MissingDependencyError

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


# --- a small JSON-schema validator (the subset models.schema.json uses) -----------------------
_TYPES = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
    "number": (int, float), "integer": int,
}


def _is_type(value: Any, name: str) -> bool:
    if name in ("number", "integer") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[name])


def validate(instance: Any, schema: dict, path: str = "$") -> list[str]:
    """Errors ("path: problem") of ``instance`` against a JSON schema using type, enum,
    required, properties, additionalProperties (bool), items, minItems, minLength, pattern.
    (``jsonschema`` is not a dependency; this covers what the model list needs.)"""
    errors: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        if not any(_is_type(instance, t) for t in names):
            return [f"{path}: expected {' or '.join(names)}, got {type(instance).__name__}"]
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: {instance!r} is not one of {schema['enum']}")
    if isinstance(instance, str):
        if len(instance) < schema.get("minLength", 0):
            errors.append(f"{path}: shorter than {schema['minLength']} characters")
        if "pattern" in schema and not re.search(schema["pattern"], instance):
            errors.append(f"{path}: {instance!r} does not match {schema['pattern']}")
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(instance):
                errors += validate(item, schema["items"], f"{path}[{i}]")
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                errors.append(f"{path}: missing '{key}'")
        props = schema.get("properties", {})
        for key, value in instance.items():
            if key in props:
                errors += validate(value, props[key], f"{path}.{key}")
            elif schema.get("additionalProperties", True) is False:
                errors.append(f"{path}: unexpected key '{key}'")
    return errors


# --- the registry -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelVersion:
    version: str
    url: str         # "" = the user provides the file
    sha256: str      # "" = the checksum comes from the user (sha256sum file or explicit value)
    file: str


@dataclass(frozen=True)
class ModelEntry:
    id: str
    title: str
    task: str
    license: str
    modality: str
    inputs: dict
    outputs: dict
    versions: tuple[ModelVersion, ...]
    model_card: str
    trained_on: str
    reference: str = ""
    extra: dict = field(default_factory=dict)

    def version(self, version: Optional[str] = None) -> ModelVersion:
        """A version by name; the last listed one when None."""
        if version is None:
            return self.versions[-1]
        for v in self.versions:
            if v.version == version:
                return v
        known = ", ".join(v.version for v in self.versions)
        raise InputError(f"model '{self.id}' has no version '{version}' (known: {known}).")


def _data_file(name: str) -> Path:
    return Path(str(resources.files("spinekit") / "data" / name))


def registry_path() -> Path:
    return _data_file("models.json")


def schema_path() -> Path:
    return _data_file("models.schema.json")


def load_registry(path: str | Path | None = None) -> dict[str, ModelEntry]:
    """Model list (id -> ModelEntry), validated against models.schema.json.

    ``path`` defaults to the shipped spinekit/data/models.json; an invalid file raises
    InputError naming it and the first problems."""
    path = Path(path) if path is not None else registry_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such model list.") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path.name} is not valid JSON (line {exc.lineno}: {exc.msg}).") from None
    schema = json.loads(schema_path().read_text())
    errors = validate(data, schema)
    if errors:
        raise InputError(f"{path.name} does not follow the model list schema: {'; '.join(errors[:3])}.")
    out: dict[str, ModelEntry] = {}
    for m in data["models"]:
        if m["id"] in out:
            raise InputError(f"{path.name} lists model '{m['id']}' twice.")
        out[m["id"]] = ModelEntry(
            id=m["id"], title=m["title"], task=m["task"], license=m["license"], modality=m["modality"],
            inputs=dict(m["inputs"]), outputs=dict(m["outputs"]),
            versions=tuple(ModelVersion(**v) for v in m["versions"]),
            model_card=m["model_card"], trained_on=m["trained_on"], reference=m.get("reference", ""),
        )
    return out


def get_entry(model_id: str, registry: Optional[dict[str, ModelEntry]] = None) -> ModelEntry:
    registry = registry if registry is not None else load_registry()
    if model_id not in registry:
        raise InputError(f"unknown model '{model_id}' (known: {', '.join(sorted(registry))}).")
    return registry[model_id]


# --- checksums and the cache ------------------------------------------------------------------
def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (weights can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_weights(path: str | Path, expected_sha256: str) -> str:
    """Check a weight file against its expected SHA-256; returns the digest.

    InputError (naming the file) when the file is missing, the expected value is not a
    SHA-256, or the digests differ."""
    path = Path(path)
    expected = (expected_sha256 or "").strip().lower()
    if not SHA256_RE.match(expected):
        raise InputError(f"expected checksum for {path.name} is not a SHA-256 (64 hex digits): '{expected_sha256}'.")
    if not path.is_file():
        raise InputError(f"{path}: no such weight file.")
    actual = sha256_file(path)
    if actual != expected:
        raise InputError(f"{path.name} has SHA-256 {actual[:16]}... but {expected[:16]}... was expected; "
                         "the file is corrupt or not the registered weights.")
    return actual


def read_sha256sum(folder: str | Path, filename: str) -> Optional[str]:
    """The checksum of ``filename`` from a ``sha256sum``/``SHA256SUMS`` file (format of the
    ``sha256sum`` tool) or ``<filename>.sha256`` in ``folder``; None when none lists it."""
    folder = Path(folder)
    side = folder / f"{filename}.sha256"
    if side.is_file():
        token = side.read_text().split()
        if token and SHA256_RE.match(token[0].lower()):
            return token[0].lower()
    for name in ("sha256sum", "sha256sum.txt", "SHA256SUMS"):
        f = folder / name
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            parts = line.strip().split(maxsplit=1)
            if len(parts) == 2 and SHA256_RE.match(parts[0].lower()):
                listed = parts[1].lstrip("*").strip()
                if listed == filename or Path(listed).name == Path(filename).name:
                    return parts[0].lower()
    return None


def default_cache_dir() -> Path:
    """$SPINEKIT_HOME/models, else ~/.spinekit/models (outside the install, per user)."""
    home = os.environ.get("SPINEKIT_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".spinekit") / "models"


def find_weights(model_id: str, cache_dir: str | Path | None = None, version: Optional[str] = None,
                 registry: Optional[dict[str, ModelEntry]] = None) -> Path:
    """Path of a model's verified weight file in the cache; never downloads.

    The checksum is the registry's, or for user-provided weights the one in a sha256sum file
    next to them. MissingDependencyError says where to put a missing file; InputError when
    the checksum is missing or differs."""
    entry = get_entry(model_id, registry)
    ver = entry.version(version)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    candidates = [root / entry.id / ver.version / ver.file, root / entry.id / ver.file]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        source = f" from {ver.url}" if ver.url else " (no public weights: bring or train your own)"
        raise MissingDependencyError(
            f"weights for '{entry.id}' are not installed: put {ver.file}{source} in {candidates[0].parent}.")
    expected = ver.sha256 or read_sha256sum(path.parent, path.name)
    if not expected:
        raise InputError(f"{path} has no checksum to verify: add a sha256sum file next to it "
                         f"(`sha256sum {path.name} > sha256sum`).")
    verify_weights(path, expected)
    return path


def load_state_dict(path: str | Path, expected_sha256: Optional[str] = None, map_location: str = "cpu") -> dict:
    """A verified state dict; ``torch.load(weights_only=True)`` so a weight file cannot run code."""
    import torch  # optional dependency, imported on use

    if expected_sha256:
        verify_weights(path, expected_sha256)
    try:
        state = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle / zip errors from a wrong file
        raise InputError(f"{Path(path).name} is not a loadable weights file ({type(exc).__name__}).") from None
    if not isinstance(state, dict):
        raise InputError(f"{Path(path).name} does not hold a state dict.")
    return state
