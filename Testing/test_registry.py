"""Model-weight registry: schema validation of the shipped model list, checksums, the cache
outside the install, and safe state-dict loading."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest

from spinekit.errors import InputError, MissingDependencyError
from spinekit.models import registry as reg


def _shipped() -> dict:
    return json.loads(reg.registry_path().read_text())


def test_shipped_model_list_follows_its_schema():
    data = _shipped()
    schema = json.loads(reg.schema_path().read_text())
    assert reg.validate(data, schema) == []
    models = reg.load_registry()
    assert len(models) == len(data["models"]) >= 1
    for entry in models.values():
        assert entry.model_card and entry.trained_on and entry.license
        for v in entry.versions:
            # Either a registered checksum or a user-provided file (no URL, no checksum).
            assert v.sha256 == "" or reg.SHA256_RE.match(v.sha256)
            assert v.url == "" or v.sha256, f"{entry.id}: a downloadable version needs its SHA-256"
    assert models["vertebra-segmentation-user"].outputs["labels_convention"] == "verse"


@pytest.mark.parametrize("breakage, message", [
    (lambda d: d["models"][0].pop("license"), "missing 'license'"),
    (lambda d: d["models"][0]["versions"][0].update(sha256="abc"), "does not match"),
    (lambda d: d["models"][0].update(modality="PET"), "is not one of"),
    (lambda d: d["models"][0].update(versions=[]), "fewer than 1 items"),
    (lambda d: d["models"][0].update(title=3), "expected string"),
    (lambda d: d["models"][0].update(colour="red"), "unexpected key 'colour'"),
    (lambda d: d["models"].append(copy.deepcopy(d["models"][0])), "twice"),
])
def test_invalid_model_list_is_refused_naming_the_file(tmp_path, breakage, message):
    data = _shipped()
    breakage(data)
    path = tmp_path / "my_models.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=message) as err:
        reg.load_registry(path)
    assert "my_models.json" in str(err.value)


def test_validator_on_small_schemas():
    schema = {"type": "object", "required": ["a"], "properties": {
        "a": {"type": "integer"}, "b": {"type": ["string", "null"], "pattern": "^x"}}}
    assert reg.validate({"a": 1, "b": None}, schema) == []
    assert reg.validate({"a": True}, schema) == ["$.a: expected integer, got bool"]
    assert reg.validate({"a": 1, "b": "y"}, schema) == ["$.b: 'y' does not match ^x"]
    assert reg.validate([], schema) == ["$: expected object, got list"]


def test_sha256_file_matches_hashlib_across_chunks(tmp_path):
    payload = bytes(range(256)) * 1000
    f = tmp_path / "w.bin"
    f.write_bytes(payload)
    expected = hashlib.sha256(payload).hexdigest()
    assert reg.sha256_file(f) == expected
    assert reg.sha256_file(f, chunk_bytes=7) == expected
    assert reg.verify_weights(f, expected.upper()) == expected


def test_verify_weights_refuses_mismatch_naming_the_file(tmp_path):
    f = tmp_path / "weights.pt"
    f.write_bytes(b"not the registered weights")
    with pytest.raises(InputError, match="weights.pt has SHA-256"):
        reg.verify_weights(f, "0" * 64)
    with pytest.raises(InputError, match="not a SHA-256"):
        reg.verify_weights(f, "1234")
    with pytest.raises(InputError, match="no such weight file"):
        reg.verify_weights(tmp_path / "gone.pt", "0" * 64)


def test_cache_dir_is_outside_the_install(monkeypatch, tmp_path):
    monkeypatch.setenv("SPINEKIT_HOME", str(tmp_path / "home"))
    assert reg.default_cache_dir() == tmp_path / "home" / "models"
    monkeypatch.delenv("SPINEKIT_HOME")
    assert reg.default_cache_dir() == Path.home() / ".spinekit" / "models"
    import spinekit

    assert Path(spinekit.__file__).parent not in reg.default_cache_dir().parents


def _registry_with_sha(tmp_path, sha: str) -> dict:
    data = _shipped()
    data["models"][1]["versions"] = [{"version": "1.0", "url": "https://example.org/w.pt",
                                      "sha256": sha, "file": "bmd_classifier.pt"}]
    path = tmp_path / "models.json"
    path.write_text(json.dumps(data))
    return reg.load_registry(path)


def test_find_weights_never_downloads_and_verifies(monkeypatch, tmp_path):
    monkeypatch.setenv("SPINEKIT_HOME", str(tmp_path / "home"))
    payload = b"\x00weights\x01" * 100
    sha = hashlib.sha256(payload).hexdigest()
    registry = _registry_with_sha(tmp_path, sha)
    # Missing: a sentence saying where to put the file (and where it comes from), no download.
    with pytest.raises(MissingDependencyError, match="put bmd_classifier.pt from https://example.org/w.pt in") as err:
        reg.find_weights("bmd-classifier-pan2024", registry=registry)
    target = tmp_path / "home" / "models" / "bmd-classifier-pan2024" / "1.0"
    assert str(target) in str(err.value)
    target.mkdir(parents=True)
    (target / "bmd_classifier.pt").write_bytes(payload)
    assert reg.find_weights("bmd-classifier-pan2024", registry=registry) == target / "bmd_classifier.pt"
    (target / "bmd_classifier.pt").write_bytes(payload + b"tampered")
    with pytest.raises(InputError, match="bmd_classifier.pt has SHA-256"):
        reg.find_weights("bmd-classifier-pan2024", registry=registry)
    with pytest.raises(InputError, match="unknown model 'nope'"):
        reg.find_weights("nope", registry=registry)


def test_user_weights_need_their_own_checksum(tmp_path):
    folder = tmp_path / "cache" / "spine-age-mri-bazargani2025" / "user"
    folder.mkdir(parents=True)
    f = folder / "spine_age_mri.pt"
    f.write_bytes(b"user weights")
    with pytest.raises(InputError, match="no checksum to verify"):
        reg.find_weights("spine-age-mri-bazargani2025", cache_dir=tmp_path / "cache")
    (folder / "sha256sum").write_text(f"{hashlib.sha256(b'user weights').hexdigest()} *spine_age_mri.pt\n")
    assert reg.find_weights("spine-age-mri-bazargani2025", cache_dir=tmp_path / "cache") == f


def test_state_dicts_load_with_weights_only(tmp_path):
    torch = pytest.importorskip("torch")
    net = torch.nn.Linear(3, 2)
    path = tmp_path / "state.pt"
    torch.save(net.state_dict(), path)
    sha = reg.sha256_file(path)
    state = reg.load_state_dict(path, sha)
    assert torch.equal(state["weight"], net.state_dict()["weight"])
    # A pickled object (which could run code on load) is refused by weights_only.
    torch.save({"net": net}, tmp_path / "pickled.pt")
    with pytest.raises(InputError, match="pickled.pt is not a loadable weights file"):
        reg.load_state_dict(tmp_path / "pickled.pt")
    with pytest.raises(InputError, match="state.pt has SHA-256"):
        reg.load_state_dict(path, "f" * 64)
