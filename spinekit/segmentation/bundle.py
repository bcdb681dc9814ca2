"""User-model backend: a MONAI bundle or a TorchScript vertebra model from a folder.

Folder layouts understood:
- TorchScript: ``model.ts`` (or one ``*.ts`` / TorchScript ``*.pt`` file) at the top level;
- torch.export: ``model.pt2`` (fixed input shape: set roi_size to the exported shape);
- MONAI bundle: ``configs/inference.json`` with ``network_def`` plus ``models/model.pt``
  (state dict, loaded with ``weights_only=True``) or ``models/model.ts``.

The weight file is checked against a SHA-256 before it is loaded: the one given by the
caller, else a ``sha256sum`` file in the folder, else the registry entry's. Preprocessing
(spacing, orientation, axis order, intensity window) comes from the bundle's metadata.json
(top level or under a "spinekit" key) or from options. Output ids are mapped from the
model's declared convention to VerSe. Every result names the model that produced it: a
user's network is not a SpineKit-validated segmenter.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .. import levels as lv
from ..errors import InputError, MissingDependencyError
from ..image import Image
from ..models import registry as reg
from ..progress import Progress, report
from .base import SegmentationResult
from .labelmap import LabelSource, import_labelmap

DEFAULT_MODEL_ID = "vertebra-segmentation-user"
# Constructors a bundle's network_def may name: plain network classes, no code execution.
_ALLOWED_TARGET_PREFIXES = ("monai.networks.", "torch.nn.")


def _torch():
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("the bundle backend needs PyTorch and MONAI: `pip install spinekit[models]`.") from None
    return torch


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path.name} in the model folder is not valid JSON (line {exc.lineno}: {exc.msg}).") from None


def _is_torchscript(path: Path) -> bool:
    import zipfile

    # TorchScript archives carry a code/ folder; state-dict zips do not.
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n or n.startswith("code/") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def find_model(model_dir: Path) -> tuple[Path, str, dict, dict]:
    """(weight file, kind 'torchscript'|'exported'|'state_dict', network_def or {}, metadata)."""
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: the model folder does not exist.")
    meta: dict = {}
    for cand in (model_dir / "metadata.json", model_dir / "configs" / "metadata.json"):
        if cand.is_file():
            meta = _read_json(cand)
            break
    inference = model_dir / "configs" / "inference.json"
    if inference.is_file():
        cfg = _read_json(inference)
        ts = model_dir / "models" / "model.ts"
        pt = model_dir / "models" / "model.pt"
        if ts.is_file():
            return ts, "torchscript", {}, meta
        if pt.is_file():
            if _is_torchscript(pt):
                return pt, "torchscript", {}, meta
            if "network_def" not in cfg:
                raise InputError(f"{inference} has no 'network_def' to build the network for models/model.pt.")
            return pt, "state_dict", cfg["network_def"], meta
        raise InputError(f"{model_dir} is a MONAI bundle without models/model.pt or models/model.ts.")
    if (model_dir / "model.ts").is_file():
        return model_dir / "model.ts", "torchscript", {}, meta
    if (model_dir / "model.pt2").is_file():
        return model_dir / "model.pt2", "exported", {}, meta
    found = ([(p, "torchscript") for p in sorted(model_dir.glob("*.ts"))]
             + [(p, "torchscript") for p in sorted(model_dir.glob("*.pt")) if _is_torchscript(p)]
             + [(p, "exported") for p in sorted(model_dir.glob("*.pt2"))])
    if len(found) == 1:
        return found[0][0], found[0][1], {}, meta
    if len(found) > 1:
        names = ", ".join(p.name for p, _ in found)
        raise InputError(f"{model_dir} holds several model files ({names}); keep one or name it model.ts.")
    raise InputError(f"{model_dir} holds neither a TorchScript model (model.ts), a torch.export program "
                     "(model.pt2) nor a MONAI bundle (configs/inference.json + models/model.pt).")


def _build_network(network_def: dict, where: str):
    """Instantiate ``{"_target_": "monai.networks.nets.X", **literal kwargs}`` without
    evaluating expressions (a config must not run code)."""
    import importlib

    target = network_def.get("_target_") if isinstance(network_def, dict) else None
    if not isinstance(target, str):
        raise InputError(f"{where}: network_def needs a '_target_' class name.")
    if "." not in target:
        target = "monai.networks.nets." + target
    if not target.startswith(_ALLOWED_TARGET_PREFIXES):
        raise InputError(f"{where}: network_def '_target_' must be a monai.networks or torch.nn class, not '{target}'.")
    kwargs = {k: v for k, v in network_def.items() if k != "_target_"}

    def literal(v: Any) -> bool:
        if isinstance(v, str):
            return not v.startswith(("$", "@", "%"))
        if isinstance(v, list):
            return all(literal(x) for x in v)
        if isinstance(v, dict):
            return all(literal(x) for x in v.values())
        return True

    if not literal(kwargs):
        raise InputError(f"{where}: network_def arguments must be plain values (no $ expressions or @ references).")
    module_name, _, cls_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
        return cls(**kwargs)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        raise InputError(f"{where}: cannot build network '{target}' ({exc}).") from None


def _expected_sha256(weights: Path, model_dir: Path, sha256: Optional[str], entry) -> tuple[str, str]:
    """(expected digest, where it came from)."""
    if sha256:
        return sha256.strip().lower(), "given"
    listed = reg.read_sha256sum(weights.parent, weights.name)
    if listed is None and weights.parent != model_dir:
        listed = reg.read_sha256sum(model_dir, str(weights.relative_to(model_dir)))
    if listed:
        return listed, "sha256sum file"
    if entry is not None:
        for v in entry.versions:
            if v.sha256 and Path(v.file).name == weights.name:
                return v.sha256, f"registry entry '{entry.id}' version {v.version}"
    raise InputError(f"{weights.name} in {model_dir} has no checksum to verify: give its SHA-256 (--sha256) "
                     f"or add a sha256sum file (`sha256sum {weights.name} > sha256sum`).")


def _options(meta: dict, entry, overrides: dict) -> dict:
    """Preprocessing options: explicit > bundle metadata > registry entry inputs > defaults."""
    meta_opts = dict(meta.get("spinekit", {})) if isinstance(meta.get("spinekit"), dict) else {}
    for key in ("spacing_mm", "intensity", "orientation", "axis_order", "roi_size", "labels_convention"):
        if key in meta and key not in meta_opts:
            meta_opts[key] = meta[key]
    base = {"spacing_mm": None, "intensity": None, "orientation": None, "axis_order": "zyx",
            "roi_size": (96, 96, 96), "labels_convention": "verse"}
    if entry is not None:
        for key in ("spacing_mm", "intensity", "orientation"):
            if key in entry.inputs:
                base[key] = entry.inputs[key]
        if entry.outputs.get("labels_convention"):
            base["labels_convention"] = entry.outputs["labels_convention"]
    base.update({k: v for k, v in meta_opts.items() if v is not None})
    base.update({k: v for k, v in overrides.items() if v is not None})
    if base["axis_order"] not in ("zyx", "xyz"):
        raise InputError(f"model axis_order must be 'zyx' or 'xyz', not '{base['axis_order']}'.")
    if base["labels_convention"] not in lv.CONVENTIONS:
        raise InputError(f"model declares unknown label convention '{base['labels_convention']}' "
                         f"(known: {', '.join(sorted(lv.CONVENTIONS))}).")
    return base


def _preprocess(image: Image, opts: dict) -> tuple[sitk.Image, np.ndarray]:
    """CT -> (model-space reference image, normalised float32 array in model axis order)."""
    img = sitk.Cast(image.to_sitk(), sitk.sitkFloat32)
    if opts["orientation"]:
        img = sitk.DICOMOrient(img, str(opts["orientation"]))
    if opts["spacing_mm"] is not None:
        new_sp = [float(s) for s in opts["spacing_mm"]]
        if len(new_sp) != 3 or min(new_sp) <= 0:
            raise InputError(f"model spacing_mm must be three positive numbers (x, y, z), not {opts['spacing_mm']}.")
        size = [max(1, int(round(n * s / t))) for n, s, t in zip(img.GetSize(), img.GetSpacing(), new_sp)]
        # Keep the physical centre of the first voxel's cell: shift the origin by half the change.
        ref = sitk.Image(size, sitk.sitkFloat32)
        ref.SetSpacing(new_sp)
        ref.SetDirection(img.GetDirection())
        d = np.asarray(img.GetDirection()).reshape(3, 3)
        shift = d @ ((np.asarray(new_sp) - np.asarray(img.GetSpacing())) / 2.0)
        ref.SetOrigin(tuple(np.asarray(img.GetOrigin()) + shift))
        img = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    win = opts["intensity"]
    if win:
        a_min, a_max = float(win.get("a_min", -1000)), float(win.get("a_max", 1000))
        b_min, b_max = float(win.get("b_min", 0.0)), float(win.get("b_max", 1.0))
        arr = (arr - a_min) / (a_max - a_min) * (b_max - b_min) + b_min
        if win.get("clip", True):
            arr = np.clip(arr, min(b_min, b_max), max(b_min, b_max))
    if opts["axis_order"] == "xyz":
        arr = np.ascontiguousarray(arr.transpose(2, 1, 0))
    return img, arr


def segment_bundle(image: Image, model_dir: str | Path, progress: Optional[Progress] = None, *,
                   sha256: Optional[str] = None, model_id: Optional[str] = DEFAULT_MODEL_ID,
                   convention: Optional[str] = None, spacing_mm=None, intensity: Optional[dict] = None,
                   orientation: Optional[str] = None, axis_order: Optional[str] = None, roi_size=None,
                   overlap: float = 0.25, device: Optional[str] = None,
                   bodies: Optional[LabelSource] = None) -> SegmentationResult:
    """Segment vertebrae with a user's model folder (TorchScript or MONAI bundle).

    sha256: expected digest of the weight file (else a sha256sum file in the folder, else
        the registry entry ``model_id``). A mismatch raises InputError naming the file.
    convention: the model's output label convention (default: metadata, else VerSe).
    spacing_mm (x, y, z), intensity {a_min, a_max, b_min, b_max, clip}, orientation (e.g.
        "RAS"), axis_order ("zyx" SimpleITK order or "xyz" MONAI/nibabel order), roi_size:
        override the bundle's metadata. Outputs with several channels are arg-maxed; one
        channel is read as label ids.
    bodies: optional body map, as in the label-map backend.
    """
    torch = _torch()
    from monai.inferers import sliding_window_inference

    model_dir = Path(model_dir).expanduser()
    weights, kind, network_def, meta = find_model(model_dir)
    entry = None
    if model_id:
        entry = reg.get_entry(model_id)
    expected, source = _expected_sha256(weights, model_dir, sha256, entry)
    report(progress, 0.05, f"verifying {weights.name}")
    digest = reg.verify_weights(weights, expected)
    opts = _options(meta, entry, {"spacing_mm": spacing_mm, "intensity": intensity, "orientation": orientation,
                                  "axis_order": axis_order, "roi_size": roi_size, "labels_convention": convention})
    dev_name = {"gpu": "cuda"}.get((device or "").lower(), device) or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(dev_name)
    except RuntimeError:
        raise InputError(f"unknown device '{device}' (use cpu, cuda or cuda:N).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' was asked for but PyTorch sees no CUDA GPU.")

    report(progress, 0.1, f"loading {weights.name}")
    if kind == "torchscript":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated in torch 2.10+
                net = torch.jit.load(str(weights), map_location=dev)
        except Exception as exc:
            raise InputError(f"{weights.name} is not a loadable TorchScript model ({type(exc).__name__}).") from None
    elif kind == "exported":
        try:
            net = torch.export.load(str(weights)).module().to(dev)
        except Exception as exc:
            raise InputError(f"{weights.name} is not a loadable torch.export program ({type(exc).__name__}).") from None
        # An exported program has fixed input shapes: windows must match what it was exported with.
    else:
        net = _build_network(network_def, f"{model_dir.name}/configs/inference.json")
        try:
            net.load_state_dict(reg.load_state_dict(weights))
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise InputError(f"{weights.name} does not fit the bundle's network_def ({first}).") from None
        net = net.to(dev)
    if kind != "exported":
        net.eval()  # exported programs are already in inference form

    report(progress, 0.2, "preprocessing")
    model_img, arr = _preprocess(image, opts)
    x = torch.from_numpy(arr)[None, None].to(dev)
    roi = tuple(int(r) for r in opts["roi_size"])
    report(progress, 0.3, "sliding-window inference")
    with torch.inference_mode():
        y = sliding_window_inference(x, roi_size=roi, sw_batch_size=1, predictor=net, overlap=overlap)
    y = y[0].float().cpu()
    per_level_conf: dict[int, float] = {}
    if y.shape[0] > 1:
        prob = torch.softmax(y, dim=0)
        conf, lab = prob.max(dim=0)
        lab = lab.numpy().astype(np.int32)
        conf = conf.numpy()
    else:
        lab = np.rint(y[0].numpy()).astype(np.int32)
        conf = None
    if lab.min() < 0:
        raise InputError(f"{weights.name} produced negative labels; it is not a label-map model.")
    if opts["axis_order"] == "xyz":
        lab = lab.transpose(2, 1, 0)
        conf = conf.transpose(2, 1, 0) if conf is not None else None

    report(progress, 0.8, "mapping labels to the CT")
    lab_img = sitk.GetImageFromArray(lab)
    lab_img.CopyInformation(model_img)
    on_ct = sitk.Resample(lab_img, image.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
    on_ct_arr = sitk.GetArrayFromImage(on_ct)
    if not on_ct_arr.any():
        raise InputError(f"the model in {model_dir} found no vertebrae in this CT.")
    if conf is not None:
        verse_model = lv.to_verse(lab, opts["labels_convention"])
        ids = [int(i) for i in np.unique(verse_model) if i]
        if ids:
            per_level_conf = dict(zip(ids, map(float, ndimage.mean(conf, verse_model, ids))))

    name = str(meta.get("name") or model_dir.name)
    provenance = {
        "model": name, "model_dir": str(model_dir), "weights": weights.name, "sha256": digest,
        "checksum_source": source, "kind": kind, "labels_convention": opts["labels_convention"],
        "trained_on": meta.get("trained_on") or (entry.trained_on if entry is not None else "unknown"),
        "registry_id": entry.id if entry is not None else None,
    }
    warns = [f"labels predicted by the user model '{name}' ({weights.name}, SHA-256 {digest[:12]}..., "
             f"trained on {provenance['trained_on']}); it is not a SpineKit-validated segmenter."]
    result = import_labelmap(image, image.with_array(on_ct_arr), convention=opts["labels_convention"],
                             bodies=bodies, backend="bundle", warnings=warns)
    for rec in result.levels:
        if rec.verse_id in per_level_conf:
            rec.confidence = round(per_level_conf[rec.verse_id], 3)
    result.provenance = provenance
    result.vertebrae.metadata["model"] = provenance
    report(progress, 1.0, "model inference done")
    return result
