"""Segmentation protocol, label-map import (every foreign convention), TotalSegmentator
subprocess path (fake executable), user-model bundles (TorchScript / MONAI state dict),
and the `spinekit segment` command.

The synthetic spine is defined in physical LPS space and sampled onto grids of any
orientation, so the same truth checks run on identity, flipped and permuted grids.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from spinekit import levels as lv
from spinekit.cli import main as cli_main
from spinekit.errors import InputError, MissingDependencyError
from spinekit.masks import dice, identified_levels
from spinekit.image import Image, read_image, write_image
from spinekit.segmentation import BACKENDS, bodies_from_vertebrae, records_from_labels, segment
from spinekit.segmentation.labelmap import guess_convention

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# --- a small synthetic spine in physical space ----------------------------------------------
LEVELS = ("T12", "L1", "L2", "L3", "L4")   # cranial -> caudal
PITCH_MM = 30.0                            # level spacing along the spine
BODY_H_MM = 24.0                           # body height; the rest of the pitch is disc


def level_centres_mm(z_top: float = 60.0) -> dict[str, float]:
    return {name: z_top - i * PITCH_MM for i, name in enumerate(LEVELS)}


def phantom_labels(points_lps: np.ndarray, z_top: float = 60.0):
    """(whole-vertebra VerSe ids, body VerSe ids, disc mask) at LPS points (N x 3).

    Body: elliptic cylinder anterior (LPS -y); arch: ring around the canal behind the body;
    spinous process further back. Anterior is -y in LPS."""
    x, y, z = points_lps[:, 0], points_lps[:, 1], points_lps[:, 2]
    vert = np.zeros(len(points_lps), np.uint8)
    body = np.zeros(len(points_lps), np.uint8)
    disc = np.zeros(len(points_lps), bool)
    for name, zc in level_centres_mm(z_top).items():
        vid = lv.level_id(name)
        dz = np.abs(z - zc)
        in_body = ((x / 18.0) ** 2 + ((y + 14.0) / 12.0) ** 2 <= 1.0) & (dz <= BODY_H_MM / 2)
        r_canal = np.hypot(x, y - 8.0)
        in_arch = (r_canal >= 7.0) & (r_canal <= 12.0) & (y > -2.0) & (dz <= 8.0)
        in_spinous = (np.abs(x) <= 3.0) & (y >= 16.0) & (y <= 32.0) & (dz <= 5.0)
        v = in_body | in_arch | in_spinous
        vert[v] = vid
        body[in_body] = vid
        disc |= ((x / 18.0) ** 2 + ((y + 14.0) / 12.0) ** 2 <= 1.0) & (dz > BODY_H_MM / 2) & (dz <= PITCH_MM / 2)
    return vert, body, disc & (vert == 0)


def make_grid(direction=np.eye(3), spacing_mm=2.0, z_range=(-100.0, 78.0), margin_mm=6.0) -> Image:
    """An empty grid covering the phantom, with any signed-permutation direction."""
    direction = np.asarray(direction, float)
    lo = np.array([-24.0 - margin_mm, -30.0 - margin_mm, z_range[0]])
    hi = np.array([24.0 + margin_mm, 36.0 + margin_mm, z_range[1]])
    # Index axis j runs along physical axis p(j) with sign s(j).
    size_xyz, origin = [], np.zeros(3)
    for j in range(3):
        p = int(np.argmax(np.abs(direction[:, j])))
        s = np.sign(direction[p, j])
        n = int(np.floor((hi[p] - lo[p]) / spacing_mm)) + 1
        size_xyz.append(n)
        origin[p] = lo[p] if s > 0 else lo[p] + (n - 1) * spacing_mm
    shape = tuple(reversed(size_xyz))
    return Image(np.zeros(shape, np.int16), spacing_mm=(spacing_mm,) * 3, origin_mm=tuple(origin), direction=direction)


def sample(grid: Image, z_top: float = 60.0):
    idx = np.indices(grid.shape).reshape(3, -1).T
    pts = grid.index_to_physical(idx)
    vert, body, disc = phantom_labels(pts, z_top)
    return vert.reshape(grid.shape), body.reshape(grid.shape), disc.reshape(grid.shape)


def ct_from(grid: Image, vert: np.ndarray) -> Image:
    hu = np.where(vert > 0, 400, 0).astype(np.int16)
    return grid.with_array(hu)


def foreign(verse: np.ndarray, convention: str) -> np.ndarray:
    """VerSe array -> the same labels written in a foreign convention (first id per level)."""
    inverse: dict[str, int] = {}
    for fid, name in sorted(lv.CONVENTIONS[convention].items()):
        inverse.setdefault(name, fid)
    out = np.zeros(verse.shape, np.uint16)
    for vid in np.unique(verse):
        if vid:
            out[verse == vid] = inverse[lv.level_name(int(vid))]
    return out


ORIENTATIONS = {
    "identity": np.eye(3),
    "ras_flip": np.diag([-1.0, -1.0, 1.0]),                       # NIfTI-style RAS storage
    "z_down": np.diag([1.0, 1.0, -1.0]),                          # slices stored head first
    "sagittal": np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]]),   # x->P, y->I, z->L
}


@pytest.fixture(scope="module")
def spine():
    grid = make_grid()
    vert, body, disc = sample(grid)
    return grid, vert, body, disc


# --- protocol / dispatcher -------------------------------------------------------------------
def test_backends_listed_and_unknown_backend_is_input_error(spine):
    grid, vert, _, _ = spine
    assert BACKENDS == ("builtin", "labelmap", "totalsegmentator", "bundle")
    with pytest.raises(InputError, match="unknown segmentation backend 'nnunet'"):
        segment(ct_from(grid, vert), "nnunet")
    with pytest.raises(InputError, match="needs a label map"):
        segment(ct_from(grid, vert), "labelmap")
    with pytest.raises(InputError, match="needs a model folder"):
        segment(ct_from(grid, vert), "bundle")


# --- conventions -----------------------------------------------------------------------------
@pytest.mark.parametrize("convention", sorted(lv.CONVENTIONS))
def test_every_convention_imports_to_verse(spine, convention):
    grid, vert, body, _ = spine
    ct = ct_from(grid, vert)
    labels = foreign(vert, convention)
    given = segment(ct, "labelmap", labels=labels, convention=convention)
    np.testing.assert_array_equal(given.vertebrae.array, vert)
    assert given.present_levels() == list(LEVELS)
    assert all(r.complete and r.confidence == 1.0 for r in given.levels)
    # Guessed: the ids and their cranio-caudal order identify the convention; SPINEPS uses
    # VerSe ids for vertebrae, so either name is the same mapping.
    guessed = segment(ct, "labelmap", labels=labels)
    np.testing.assert_array_equal(guessed.vertebrae.array, vert)
    used = guessed.vertebrae.metadata["convention"]
    assert used == convention or {used, convention} <= {"verse", "spineps"}
    assert any("guessed" in w for w in guessed.warnings)


def test_guess_separates_conventions_sharing_ids(spine):
    # VerSe 3..7 = C3..C7 vs TotalSegmentator vertebrae_mr 3..7 = L4..T12: same ids, opposite order.
    grid, vert, _, _ = spine
    mr = grid.with_array(foreign(vert, "totalsegmentator_vertebrae_mr"))
    assert set(np.unique(mr.array)) - {0} <= set(lv.VERSE_NAMES)
    name, score, _ = guess_convention(mr)
    assert name == "totalsegmentator_vertebrae_mr" and score > 0.9


def test_non_vertebra_ids_are_dropped_with_a_warning(spine):
    grid, vert, _, disc = spine
    labels = foreign(vert, "totalsegmentator_total").astype(np.uint16)
    labels[disc] = 52  # aorta id in `total`; stands in for any non-vertebra structure
    res = segment(ct_from(grid, vert), "labelmap", labels=labels, convention="totalsegmentator_total")
    np.testing.assert_array_equal(res.vertebrae.array, vert)
    assert any("52" in w and "not vertebrae" in w for w in res.warnings)


def test_body_map_given_as_labels_is_refused_unless_the_convention_is_explicit(spine):
    grid, vert, body, disc = spine
    body_map = np.where(body > 0, 1, np.where(disc, 2, 0)).astype(np.uint8)
    with pytest.raises(InputError, match="belongs in --bodies"):
        segment(ct_from(grid, vert), "labelmap", labels=body_map)
    # Said explicitly, the same ids are read as VerSe C1/C2 (the user's call).
    res = segment(ct_from(grid, vert), "labelmap", labels=body_map, convention="verse")
    assert res.present_levels() == ["C1", "C2"]


# --- bodies -----------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_bodies_from_vertebrae_recover_the_body_in_any_orientation(orientation):
    grid = make_grid(ORIENTATIONS[orientation])
    vert, body, _ = sample(grid)
    derived = bodies_from_vertebrae(grid.with_array(vert))
    for name in LEVELS:
        vid = lv.level_id(name)
        assert dice(derived == vid, body == vid) > 0.93, name
    # Bodies stay inside their own vertebra.
    assert np.all(vert[derived > 0] == derived[derived > 0])


def test_ts_vertebrae_body_map_is_combined_with_level_labels(spine):
    grid, vert, body, disc = spine
    body_map = np.where(body > 0, 1, np.where(disc, 2, 0)).astype(np.uint8)
    res = segment(ct_from(grid, vert), "labelmap", labels=foreign(vert, "totalsegmentator_total"),
                  bodies=body_map)
    np.testing.assert_array_equal(res.bodies.array, body)
    for rec in res.levels:
        assert rec.body_voxels == int((body == rec.verse_id).sum())


# --- geometry ---------------------------------------------------------------------------------
def test_label_file_on_another_orientation_and_grid_is_resampled(tmp_path, spine):
    grid, vert, _, _ = spine
    ct = ct_from(grid, vert)
    # Same physical grid stored RAS-style: a pure permutation, so the import is exact.
    ras = make_grid(ORIENTATIONS["ras_flip"])
    v_ras, _, _ = sample(ras)
    write_image(ras.with_array(v_ras), tmp_path / "ras.nii.gz")
    res = segment(ct, "labelmap", labels=tmp_path / "ras.nii.gz", convention="verse")
    np.testing.assert_array_equal(res.vertebrae.array, vert)
    # A finer, shifted grid: nearest-neighbour resampling keeps each level in place.
    fine = make_grid(spacing_mm=1.0)
    fine = Image(fine.array, spacing_mm=fine.spacing_mm, origin_mm=tuple(np.add(fine.origin_mm, 0.3)))
    v_fine, _, _ = sample(fine)
    write_image(fine.with_array(v_fine), tmp_path / "fine.nii.gz")
    res = segment(ct, "labelmap", labels=tmp_path / "fine.nii.gz")
    assert any("resampled" in w for w in res.warnings)
    for name in LEVELS:
        vid = lv.level_id(name)
        assert dice(res.vertebrae.array == vid, vert == vid) > 0.9, name


def _write(tmp_path, name, array, **geom):
    img = sitk.GetImageFromArray(array)
    if "origin" in geom:
        img.SetOrigin(geom["origin"])
    sitk.WriteImage(img, str(tmp_path / name))
    return tmp_path / name


def test_clear_errors_for_label_maps_that_cannot_be_matched(tmp_path, spine):
    grid, vert, _, _ = spine
    ct = ct_from(grid, vert)
    far = grid.with_array(vert)
    far = Image(vert, spacing_mm=grid.spacing_mm, origin_mm=(5000.0, 5000.0, 5000.0))
    write_image(far, tmp_path / "elsewhere.nii.gz")
    cases = {
        "elsewhere.nii.gz": "does not overlap the CT",
        _write(tmp_path, "flat.nii.gz", vert[vert.shape[0] // 2]).name: "is 2D",
        _write(tmp_path, "soft.nii.gz", vert.astype(np.float32) * 0.5).name: "non-integer values",
        _write(tmp_path, "aorta.nii.gz", np.where(vert > 0, 52, 0).astype(np.uint8)).name: "no vertebra ids",
        "missing.nii.gz": "no such file",
    }
    (tmp_path / "garbage.nii.gz").write_bytes(b"not an image")
    cases["garbage.nii.gz"] = "cannot be read"
    for fname, message in cases.items():
        with pytest.raises(InputError, match=message) as err:
            segment(ct, "labelmap", labels=tmp_path / fname,
                    convention="totalsegmentator_total" if fname == "aorta.nii.gz" else None)
        text = str(err.value)
        assert fname in text and text.count(".") >= 1 and "\n" not in text
    with pytest.raises(InputError, match="has shape"):
        segment(ct, "labelmap", labels=vert[:, :-1])
    with pytest.raises(InputError, match="unknown label convention"):
        segment(ct, "labelmap", labels=vert, convention="nnunet")


# --- records ---------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", ["identity", "z_down", "sagittal"])
def test_truncation_side_follows_the_image_direction(orientation):
    # Field of view from z=-60 to +66 mm cuts T12 (centre 60, top 72) cranially and
    # L4 (centre -60, bottom -72) caudally.
    grid = make_grid(ORIENTATIONS[orientation], z_range=(-60.0, 66.0))
    vert, body, _ = sample(grid)
    recs = {r.name: r for r in records_from_labels(vert, body, image=grid)}
    assert recs["T12"].truncated == "cranial" and not recs["T12"].complete
    assert recs["L4"].truncated == "caudal" and not recs["L4"].complete
    assert all(recs[n].complete for n in ("L1", "L2", "L3"))


def test_body_in_view_flag_when_only_the_arch_is_cut():
    vert = np.zeros((10, 5, 5), np.uint8)
    body = np.zeros_like(vert)
    vert[2:10, 1:4, 1:4] = 20            # reaches the last (cranial) slice
    body[3:7, 1:4, 1:3] = 20
    rec = records_from_labels(vert, body)[0]
    assert rec.truncated == "cranial" and "body_in_view" in rec.flags
    body[3:10, 1:4, 1:3] = 20            # now the body is cut as well
    rec = records_from_labels(vert, body)[0]
    assert rec.truncated == "cranial" and "body_in_view" not in rec.flags


def test_verse_identification_rule():
    # Two 20 mm-tall "vertebrae" stacked along z on a 2 mm grid, centroids 22 mm apart.
    ref = np.zeros((40, 10, 10), np.uint8)
    ref[5:15, 2:8, 2:8] = 19
    ref[16:26, 2:8, 2:8] = 20
    sp = (2.0, 1.0, 1.0)
    same = identified_levels(ref, ref, sp)
    assert same == {19: (True, 0.0), 20: (True, 0.0)}
    # Both shifted 8 mm cranially: still nearest to their own reference level.
    shifted = np.roll(ref, 4, axis=0)
    assert all(ok for ok, _ in identified_levels(shifted, ref, sp).values())
    # Shifted 12 mm: each is now nearer to the level above (10 mm) than to its own (12 mm).
    ident = identified_levels(np.roll(ref, 6, axis=0), ref, sp)
    assert not ident[19][0] and ident[19][1] == pytest.approx(12.0)
    # Names swapped: neither is identified; a level not predicted reads inf.
    swapped = np.select([ref == 19, ref == 20], [20, 19], 0).astype(np.uint8)
    assert not any(ok for ok, _ in identified_levels(swapped, ref, sp).values())
    only_l1 = np.where(ref == 20, 20, 0).astype(np.uint8)
    assert identified_levels(only_l1, ref, sp)[19] == (False, float("inf"))
    # Within 20 mm is part of the rule: a lone level 24 mm off is not identified.
    lone = np.zeros_like(ref)
    lone[5:15, 2:8, 2:8] = 19
    far = np.roll(lone, 12, axis=0)
    assert identified_levels(far, lone, sp) == {19: (False, pytest.approx(24.0))}


# --- real data --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def abdomen():
    folder = DATA / "ct_abdomen_3mm"
    if not folder.is_dir():
        pytest.skip("../shared/data is not available")
    return folder


@pytest.mark.realdata
def test_real_totalsegmentator_labels_import(abdomen):
    ct = read_image(abdomen / "ct.nii.gz")
    res = segment(ct, "labelmap", labels=abdomen / "ts_vertebrae.nii.gz",
                  bodies=abdomen / "ts_vertebrae_body.nii.gz")
    assert res.vertebrae.metadata["convention"] == "totalsegmentator_total"
    # README: 26 S1, 27 L5 ... 31 L1, 32 T12, 33 T11 -> VerSe T11..L5 = 18..24, sacrum 26.
    present = set(np.unique(res.vertebrae.array)) - {0}
    assert present == set(range(18, 25)) | {26}
    assert res.level("T11").truncated == "cranial"          # "T11 only partly in view"
    assert all(res.level(n).complete for n in ("L1", "L2", "L3", "L4", "L5"))
    b, v = res.bodies.array, res.vertebrae.array
    assert np.all(v[b > 0] == b[b > 0])                     # bodies inside their vertebra
    for name in ("T12", "L1", "L2", "L3", "L4", "L5"):
        rec = res.level(name)
        assert rec.body_voxels > 0.4 * rec.voxels
    # Independent check of the geometric body derivation against TotalSegmentator's bodies.
    derived = bodies_from_vertebrae(res.vertebrae, ct)
    for name in ("T12", "L1", "L2", "L3", "L4", "L5"):
        vid = lv.level_id(name)
        assert dice(derived == vid, b == vid) > 0.85, name
    # The body map given by mistake as the level map is refused with a pointer to --bodies.
    with pytest.raises(InputError, match="ts_vertebrae_body.nii.gz does not read as one spine.*--bodies"):
        segment(ct, "labelmap", labels=abdomen / "ts_vertebrae_body.nii.gz")
    # The derivation works in physical space: the same labels stored sagittally (PIR) give
    # the same bodies voxel for voxel.
    pir = Image.from_sitk(sitk.DICOMOrient(res.vertebrae.to_sitk(), "PIR"))
    back = sitk.DICOMOrient(pir.with_array(bodies_from_vertebrae(pir)).to_sitk(), "RAS")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), derived)


@pytest.mark.realdata
def test_real_dicom_with_full_total_map():
    folder = DATA / "ct_dicom_2mm"
    if not folder.is_dir():
        pytest.skip("../shared/data is not available")
    ct = read_image(folder / "dicom")
    res = segment(ct, "labelmap", labels=folder / "ts_total.nii.gz")
    # The full `total` map (organs, aorta, muscles) is recognised and only T11/T12 kept.
    assert res.vertebrae.metadata["convention"] == "totalsegmentator_total"
    assert set(np.unique(res.vertebrae.array)) - {0} == {lv.level_id("T11"), lv.level_id("T12")}
    assert any("not vertebrae" in w for w in res.warnings)


# --- TotalSegmentator via a fake executable ---------------------------------------------------
FAKE_TS = textwrap.dedent("""\
    #!{python}
    import json, os, sys
    import numpy as np, SimpleITK as sitk
    args = sys.argv[1:]
    with open(os.environ["FAKE_TS_LOG"], "a") as log:
        log.write(json.dumps({{"argv": args, "https_proxy": os.environ.get("HTTPS_PROXY")}}) + "\\n")
    task = args[args.index("--task") + 1]
    if task == "vertebrae_body" and os.environ.get("FAKE_TS_FAIL_BODY"):
        print("this task needs a license"); sys.exit(1)
    ct = sitk.ReadImage(args[args.index("-i") + 1])
    src = sitk.ReadImage(os.environ["FAKE_TS_TOTAL" if task == "total" else "FAKE_TS_BODY"])
    src.CopyInformation(ct)
    sitk.WriteImage(src, args[args.index("-o") + 1])
""")


@pytest.fixture
def fake_totalseg(tmp_path, monkeypatch, spine):
    grid, vert, body, disc = spine
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "TotalSegmentator"
    exe.write_text(FAKE_TS.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    write_image(grid.with_array(foreign(vert, "totalsegmentator_total").astype(np.uint8)), tmp_path / "total.nii.gz")
    write_image(grid.with_array(np.where(body > 0, 1, np.where(disc, 2, 0)).astype(np.uint8)), tmp_path / "body.nii.gz")
    home = tmp_path / "tshome"
    (home / "nnunet" / "results" / "Dataset291_TotalSegmentator_part1").mkdir(parents=True)
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(home))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("FAKE_TS_TOTAL", str(tmp_path / "total.nii.gz"))
    monkeypatch.setenv("FAKE_TS_BODY", str(tmp_path / "body.nii.gz"))
    monkeypatch.setenv("FAKE_TS_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setattr("tempfile.tempdir", str(temp_root))
    return tmp_path


def test_totalsegmentator_subprocess_path(fake_totalseg, spine):
    grid, vert, body, _ = spine
    res = segment(ct_from(grid, vert), "totalsegmentator")
    np.testing.assert_array_equal(res.vertebrae.array, vert)
    np.testing.assert_array_equal(res.bodies.array, body)
    assert res.backend == "totalsegmentator"
    calls = [json.loads(line) for line in (fake_totalseg / "calls.jsonl").read_text().splitlines()]
    tasks = [c["argv"][c["argv"].index("--task") + 1] for c in calls]
    assert tasks == ["total", "vertebrae_body"]
    assert "vertebrae_L1" in calls[0]["argv"] and "--roi_subset" in calls[0]["argv"]
    assert all(c["https_proxy"].startswith("http://127.0.0.1") for c in calls)  # cannot fetch
    assert list((fake_totalseg / "tmp").iterdir()) == []                       # temp dir cleaned


def test_totalsegmentator_body_task_failure_falls_back_to_geometry(fake_totalseg, spine, monkeypatch):
    grid, vert, body, _ = spine
    monkeypatch.setenv("FAKE_TS_FAIL_BODY", "1")
    res = segment(ct_from(grid, vert), "totalsegmentator")
    np.testing.assert_array_equal(res.vertebrae.array, vert)
    assert any("vertebrae_body failed" in w for w in res.warnings)
    for name in LEVELS:
        vid = lv.level_id(name)
        assert dice(res.bodies.array == vid, body == vid) > 0.93


def test_totalsegmentator_missing_says_how_to_install(tmp_path, monkeypatch, spine):
    grid, vert, _, _ = spine
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(MissingDependencyError, match="pip install TotalSegmentator") as err:
        segment(ct_from(grid, vert), "totalsegmentator")
    assert "TOTALSEG_WEIGHTS_PATH" in str(err.value)


def test_totalsegmentator_without_weights_is_refused(fake_totalseg, monkeypatch, spine):
    grid, vert, _, _ = spine
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(fake_totalseg / "empty_home"))
    with pytest.raises(MissingDependencyError, match="weights were not found"):
        segment(ct_from(grid, vert), "totalsegmentator")
    assert not (fake_totalseg / "calls.jsonl").exists()


# --- user models ------------------------------------------------------------------------------
torch = pytest.importorskip("torch")


class _Threshold(torch.nn.Module):
    """Stand-in 'model': label 31 (L1 in TotalSegmentator `total`) where intensity > 0.5."""

    def forward(self, x):
        return (x > 0.5).float() * 31.0


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def ts_model(tmp_path):
    folder = tmp_path / "thresh_model"
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated in torch 2.10+
        torch.jit.script(_Threshold()).save(str(folder / "model.ts"))
    (folder / "metadata.json").write_text(json.dumps({
        "name": "threshold test stub", "trained_on": "nothing (test stub)",
        "spinekit": {"spacing_mm": [3.0, 3.0, 3.0], "roi_size": [24, 24, 24],
                     "intensity": {"a_min": -1000, "a_max": 1000, "b_min": 0, "b_max": 1, "clip": True},
                     "labels_convention": "totalsegmentator_total"}}))
    return folder


def test_torchscript_model_labels_come_out_through_its_convention(ts_model, spine):
    grid, vert, _, _ = spine
    ct = ct_from(grid, vert)
    digest = _sha(ts_model / "model.ts")
    res = segment(ct, "bundle", model_dir=ts_model, sha256=digest)
    assert set(np.unique(res.vertebrae.array)) == {0, lv.level_id("L1")}
    # Independent reference: resample the CT to 3 mm (linear), threshold at 0 HU (= 0.5 after
    # the window), bring back with nearest neighbour -- what the model pipeline must do.
    src = sitk.Cast(ct.to_sitk(), sitk.sitkFloat32)
    ref3 = sitk.Image([int(round(n * 2.0 / 3.0)) for n in src.GetSize()], sitk.sitkFloat32)
    ref3.SetSpacing((3.0, 3.0, 3.0))
    ref3.SetDirection(src.GetDirection())
    ref3.SetOrigin(tuple(np.add(src.GetOrigin(), 0.5)))  # same cell start: origin + (3 - 2) / 2
    ct3 = sitk.Resample(src, ref3, sitk.Transform(), sitk.sitkLinear, -1024.0)
    back = sitk.Resample(sitk.Cast(ct3 > 0.0, sitk.sitkUInt8), src, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    expected = sitk.GetArrayFromImage(back) > 0
    assert dice(res.vertebrae.array > 0, expected) > 0.99
    assert dice(res.vertebrae.array > 0, vert > 0) > 0.75   # and it is the bone, at 3 mm detail
    assert res.provenance["sha256"] == digest and res.provenance["model"] == "threshold test stub"
    assert any("threshold test stub" in w and "not a SpineKit-validated" in w for w in res.warnings)
    # The checksum may also come from a sha256sum file in the folder.
    (ts_model / "sha256sum").write_text(f"{digest}  model.ts\n")
    res2 = segment(ct, "bundle", model_dir=ts_model)
    np.testing.assert_array_equal(res2.vertebrae.array, res.vertebrae.array)
    assert res2.provenance["checksum_source"] == "sha256sum file"


def test_torch_export_program_runs(tmp_path, spine):
    grid, vert, _, _ = spine
    folder = tmp_path / "exported"
    folder.mkdir()
    ep = torch.export.export(_Threshold(), (torch.zeros(1, 1, 16, 16, 16),))
    torch.export.save(ep, str(folder / "model.pt2"))
    (folder / "metadata.json").write_text(json.dumps({
        "name": "exported stub", "roi_size": [16, 16, 16], "labels_convention": "totalsegmentator_total",
        "intensity": {"a_min": -1000, "a_max": 1000, "b_min": 0, "b_max": 1, "clip": True}}))
    res = segment(ct_from(grid, vert), "bundle", model_dir=folder, sha256=_sha(folder / "model.pt2"))
    # Same grid, threshold between soft tissue (0.5) and bone (0.7): exactly the bone, named L1.
    np.testing.assert_array_equal(res.vertebrae.array, np.where(vert > 0, lv.level_id("L1"), 0))
    assert res.provenance["kind"] == "exported"


def test_model_with_wrong_or_missing_checksum_is_refused(ts_model, spine):
    grid, vert, _, _ = spine
    ct = ct_from(grid, vert)
    with pytest.raises(InputError, match="model.ts has SHA-256"):
        segment(ct, "bundle", model_dir=ts_model, sha256="0" * 64)
    with pytest.raises(InputError, match="no checksum to verify"):
        segment(ct, "bundle", model_dir=ts_model)


def _bundle(tmp_path, network_def) -> Path:
    folder = tmp_path / "bundle"
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "inference.json").write_text(json.dumps({"network_def": network_def}))
    (folder / "configs" / "metadata.json").write_text(json.dumps({
        "name": "conv stub bundle", "spinekit": {
            "axis_order": "xyz", "roi_size": [32, 32, 32],
            "intensity": {"a_min": -1000, "a_max": 1000, "b_min": 0, "b_max": 1, "clip": True}}}))
    return folder


def test_monai_bundle_state_dict_runs_with_weights_only(tmp_path, spine):
    grid, vert, _, _ = spine
    ct = ct_from(grid, vert)
    folder = _bundle(tmp_path, {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 21, "kernel_size": 1})
    net = torch.nn.Conv3d(1, 21, 1)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.fill_(-100.0)
        net.bias[0] = 0.0                                   # background logit 0
        net.weight[20] = 10.0                               # VerSe 20 (L1) logit 10x - 5
        net.bias[20] = -5.0
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    (folder / "models" / "sha256sum").write_text(f"{_sha(folder / 'models' / 'model.pt')}  model.pt\n")
    res = segment(ct, "bundle", model_dir=folder)
    assert set(np.unique(res.vertebrae.array)) == {0, 20}
    assert dice(res.vertebrae.array > 0, vert > 0) > 0.99   # same grid: only the threshold matters
    # Bone at 0.7 after the window: L1 logit 10 * 0.7 - 5 = 2 vs background 0 -> p = 1/(1 + e^-2).
    assert res.level("L1").confidence == pytest.approx(1.0 / (1.0 + np.exp(-2.0)), abs=2e-3)
    assert res.provenance["kind"] == "state_dict"


def test_bundle_network_def_cannot_run_code(tmp_path, spine):
    grid, vert, _, _ = spine
    folder = _bundle(tmp_path, {"_target_": "os.system", "command": "echo hacked"})
    torch.save({}, folder / "models" / "model.pt")
    with pytest.raises(InputError, match="must be a monai.networks or torch.nn class"):
        segment(ct_from(grid, vert), "bundle", model_dir=folder, sha256=_sha(folder / "models" / "model.pt"))


# --- command line -----------------------------------------------------------------------------
def test_cli_segment_writes_outputs(tmp_path, spine, capsys):
    grid, vert, body, _ = spine
    write_image(ct_from(grid, vert), tmp_path / "ct.nii.gz")
    write_image(grid.with_array(foreign(vert, "totalspineseg").astype(np.uint8)), tmp_path / "tss.nii.gz")
    out = tmp_path / "out"
    rc = cli_main(["segment", str(tmp_path / "ct.nii.gz"), "--out", str(out), "--backend", "labelmap",
                   "--labels", str(tmp_path / "tss.nii.gz"), "--convention", "totalspineseg"])
    assert rc == 0
    captured = capsys.readouterr()
    assert all(name in captured.out for name in LEVELS)
    np.testing.assert_array_equal(read_image(out / "vertebrae.nii.gz").array, vert)
    bodies = read_image(out / "vertebral_bodies.nii.gz").array
    assert set(np.unique(bodies)) == set(np.unique(vert))
    for name in LEVELS:  # the written bodies are the sample's true bodies (as in the in-memory test)
        vid = lv.level_id(name)
        assert dice(bodies == vid, body == vid) > 0.93, name
    levels = json.loads((out / "levels.json").read_text())
    assert list(levels["levels"]) == list(LEVELS)
    assert levels["levels"]["L1"]["verse_id"] == 20 and levels["levels"]["L1"]["complete"] is True


def test_cli_segment_bad_input_is_one_sentence(tmp_path, spine, capsys):
    grid, vert, _, _ = spine
    write_image(ct_from(grid, vert), tmp_path / "ct.nii.gz")
    write_image(Image(vert, spacing_mm=grid.spacing_mm, origin_mm=(9000.0, 0.0, 0.0)), tmp_path / "other.nii.gz")
    for argv, needle in [
        (["--backend", "labelmap", "--labels", str(tmp_path / "other.nii.gz")], "other.nii.gz does not overlap"),
        (["--backend", "labelmap"], "needs a label map"),
        (["--backend", "bundle", "--model", str(tmp_path / "nomodel")], "does not exist"),
    ]:
        rc = cli_main(["segment", str(tmp_path / "ct.nii.gz"), "--out", str(tmp_path / "o")] + argv)
        err = capsys.readouterr().err
        assert rc == 2, argv
        last = err.strip().splitlines()[-1]
        assert last.startswith("spinekit segment: error:") and needle in last
        assert "Traceback" not in err
    assert not (tmp_path / "o" / "levels.json").exists()
    rc = cli_main(["segment", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "missing.nii.gz" in capsys.readouterr().err


def test_cli_segment_missing_totalsegmentator_exits_3(tmp_path, spine, capsys, monkeypatch):
    grid, vert, _, _ = spine
    write_image(ct_from(grid, vert), tmp_path / "ct.nii.gz")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    rc = cli_main(["segment", str(tmp_path / "ct.nii.gz"), "--out", str(tmp_path / "o"),
                   "--backend", "totalsegmentator", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 3 and "pip install TotalSegmentator" in err and "Traceback" not in err
