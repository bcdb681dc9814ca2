"""Static checks of the Slicer extension: .ui files, module sources, CMake lists, index JSON.

These run without Slicer; they catch what otherwise only shows up in an installed extension
(an unlisted file, a widget bound to a parameter that does not exist, a missing metadata key).
"""

from __future__ import annotations

import ast
import json
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = ["SpineBMD"]


def module_dirs():
    return [REPO / name for name in MODULES if (REPO / name).is_dir()]


def cmake_words(path: Path) -> set[str]:
    """Every token of a CMakeLists with ${MODULE_NAME} expanded (comments stripped)."""
    text = re.sub(r"#[^\n]*", "", path.read_text())
    m = re.search(r"set\(MODULE_NAME\s+(\w+)\)", text)
    if m:
        text = text.replace("${MODULE_NAME}", m.group(1))
    return set(re.findall(r"[^\s()\"]+", text))


def cmake_set(path: Path, variable: str) -> list[str]:
    text = re.sub(r"#[^\n]*", "", path.read_text())
    m = re.search(r"set\(MODULE_NAME\s+(\w+)\)", text)
    if m:
        text = text.replace("${MODULE_NAME}", m.group(1))
    block = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert block, f"{path}: no set({variable} ...)"
    return block.group(1).split()


def parameter_fields(module_py: Path) -> dict[str, str]:
    """{field: annotation source} of the @parameterNodeWrapper class in a module file."""
    tree = ast.parse(module_py.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list):
            return {stmt.target.id: ast.unparse(stmt.annotation) for stmt in node.body
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}
    raise AssertionError(f"{module_py}: no @parameterNodeWrapper class")


@pytest.mark.parametrize("module", MODULES)
def test_ui_files_are_designer_xml_bound_to_parameter_fields(module):
    ui_files = sorted((REPO / module / "Resources" / "UI").glob("*.ui"))
    assert ui_files, f"{module} has no .ui file"
    fields = parameter_fields(REPO / module / f"{module}.py")
    for ui in ui_files:
        root = ET.parse(ui).getroot()
        assert root.tag == "ui" and root.get("version") == "4.0"
        top = root.find("widget")
        assert top is not None and top.get("class") == "qMRMLWidget"
        names = [w.get("name") for w in root.iter("widget")]
        assert len(names) == len(set(names)), f"{ui.name}: duplicate widget names"
        bound = {}
        for widget in root.iter("widget"):
            for prop in widget.findall("property"):
                if prop.get("name") == "SlicerParameterName":
                    assert prop.get("stdset") == "0", "SlicerParameterName must be a dynamic property"
                    bound[prop.findtext("string")] = widget
        assert set(bound) <= set(fields), f"{ui.name}: bound to unknown parameters {set(bound) - set(fields)}"
        assert set(bound) == set(fields), f"{ui.name}: parameters without a widget {set(fields) - set(bound)}"
        # Choice-typed parameters: the combo box offers exactly the allowed values.
        module_src = (REPO / module / f"{module}.py").read_text()
        for name, widget in bound.items():
            if widget.get("class") == "QComboBox":
                items = [i.findtext("property/string") or "" for i in widget.findall("item")]
                assert "Choice" in fields[name], f"{name}: a combo box needs a Choice annotation"
                assert items, f"{name}: combo box without items"
            if widget.get("class") == "qMRMLNodeComboBox":
                types = [s.text for s in widget.find("property[@name='nodeTypes']/stringlist")]
                assert types == [fields[name]], f"{name}: node type {types} vs annotation {fields[name]}"
        # Every widget the module code reaches through self.ui.<name> exists in the .ui.
        used = set(re.findall(r"self\.ui\.(\w+)", module_src))
        assert used <= set(names), f"{ui.name}: missing widgets {used - set(names)}"
        # Form/grid layouts: every (row, column) once, rows numbered 0..n-1 without gaps;
        # list items of a combo box hold text only (no widget swallowed by a stray edit).
        for layout in root.iter("layout"):
            if layout.get("class") in ("QFormLayout", "QGridLayout"):
                cells = [(int(i.get("row")), int(i.get("column"))) for i in layout.findall("item")]
                assert len(cells) == len(set(cells)), f"{layout.get('name')}: a cell is used twice"
                assert sorted({r for r, _ in cells}) == list(range(len({r for r, _ in cells}))), layout.get("name")
        for combo in (w for w in root.iter("widget") if w.get("class") == "QComboBox"):
            for item in combo.findall("item"):
                assert item.find("widget") is None and item.find("layout") is None, combo.get("name")
        # Custom widget classes are declared.
        declared = {c.findtext("class") for c in root.iter("customwidget")}
        custom = {w.get("class") for w in root.iter("widget") if w.get("class", "").startswith(("q", "ctk"))}
        assert custom <= declared, f"{ui.name}: undeclared custom widgets {custom - declared}"


def test_choice_values_match_the_logic_constants():
    import sys

    sys.path.insert(0, str(REPO / "SpineBMD"))
    from SpineBMDLib.logic import CALIBRATION_MODES, PHASES, ROI_MODES

    root = ET.parse(REPO / "SpineBMD" / "Resources" / "UI" / "SpineBMD.ui").getroot()
    combos = {}
    for widget in root.iter("widget"):
        prop = widget.find("property[@name='SlicerParameterName']")
        if prop is not None and widget.get("class") == "QComboBox":
            combos[prop.findtext("string")] = [i.findtext("property/string") or "" for i in widget.findall("item")]
    assert combos["calibration"] == list(CALIBRATION_MODES)
    assert combos["contrastPhase"] == list(PHASES)
    assert combos["roiMode"] == list(ROI_MODES)
    assert combos["sex"] == ["", "F", "M"]


@pytest.mark.parametrize("module", MODULES)
def test_module_python_files_compile(module, tmp_path):
    files = sorted((REPO / module).rglob("*.py"))
    assert files
    for path in files:
        py_compile.compile(str(path), cfile=str(tmp_path / (path.stem + ".pyc")), doraise=True)


@pytest.mark.parametrize("module", MODULES)
def test_every_module_file_is_listed_in_cmake(module):
    mod = REPO / module
    listed: set[str] = set()
    for cmake in mod.rglob("CMakeLists.txt"):
        base = cmake.parent.relative_to(mod)
        listed |= {str(base / w) if str(base) != "." else w for w in cmake_words(cmake)}
    shipped = [p for p in mod.rglob("*") if p.is_file() and "__pycache__" not in p.parts
               and p.name != "CMakeLists.txt" and p.suffix != ".pyc"]
    missing = [str(p.relative_to(mod)) for p in shipped if str(p.relative_to(mod)) not in listed]
    assert not missing, f"{module}/CMakeLists.txt does not list {missing}"
    text = (mod / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    # The listed scripts and resources exist (a typo would break the build).
    for var in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        for rel in cmake_set(mod / "CMakeLists.txt", var):
            assert (mod / rel).is_file(), f"{module}: listed file {rel} does not exist"


def test_module_file_follows_the_scripted_template():
    tree = ast.parse((REPO / "SpineBMD" / "SpineBMD.py").read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for name, base in (("SpineBMD", "ScriptedLoadableModule"), ("SpineBMDWidget", "ScriptedLoadableModuleWidget"),
                       ("SpineBMDLogic", "ScriptedLoadableModuleLogic"), ("SpineBMDTest", "ScriptedLoadableModuleTest")):
        assert name in classes and base in [ast.unparse(b) for b in classes[name].bases], name
    widget = {f.name for f in classes["SpineBMDWidget"].body if isinstance(f, ast.FunctionDef)}
    assert {"setup", "cleanup", "enter", "exit", "setParameterNode", "_checkCanApply"} <= widget
    process = next(f for f in classes["SpineBMDLogic"].body if isinstance(f, ast.FunctionDef) and f.name == "process")
    assert ast.get_docstring(process), "process() needs a docstring"
    assert all(a.annotation is not None for a in process.args.args[1:]), "process() arguments need type hints"
    assert "waitForCompletion" in [a.arg for a in process.args.args]
    # Dependencies are installed on demand, never at import: no install call at module level,
    # and the module imports none of the optional packages at the top.
    for path in [REPO / "SpineBMD" / "SpineBMD.py", *(REPO / "SpineBMD" / "SpineBMDLib").glob("*.py")]:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) or (
                    isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):  # docstring
                continue
            src = ast.unparse(node)
            assert not re.search(r"pip_install|pip_ensure|install_torch", src), f"{path.name}: {src}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                assert not re.search(r"\b(torch|monai|pandas|sklearn|xraylib)\b", src), f"{path.name}: {src}"


EXTENSION_KEYS = ["EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                  "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"]


def test_extension_cmakelists_has_metadata_and_modules():
    text = (REPO / "CMakeLists.txt").read_text()
    order = ["cmake_minimum_required(", "project(SpineKit)", *[f"set({k} " for k in EXTENSION_KEYS],
             "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(SpineBMD)",
             "## NEXT_MODULE", "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.find(s) for s in order]
    assert all(p >= 0 for p in positions), [s for s, p in zip(order, positions) if p < 0]
    assert positions == sorted(positions), "extension CMakeLists sections are out of order"
    for key in EXTENSION_KEYS:
        value = re.search(rf'set\({key}\s+"([^"]*)"\)', text)
        assert value and value.group(1).strip(), f"{key} is empty"
    assert (REPO / "Resources" / "Icons" / "SpineKit.png").is_file()
    # Icon and screenshot URLs point at files this repository holds (raw URLs on the main branch).
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in re.search(rf'set\({key}\s+"([^"]*)"\)', text).group(1).split():
            rel = url.split("/main/", 1)[1]
            assert (REPO / rel).is_file(), f"{key}: {rel} is not in the repository"
    assert "PyTorch" in re.search(r'set\(EXTENSION_DEPENDS\s+"([^"]*)"\)', text).group(1)


def test_icons_are_128px_png():
    from PIL import Image as PILImage

    for path in (REPO / "Resources" / "Icons" / "SpineKit.png", REPO / "SpineBMD" / "Resources" / "Icons" / "SpineBMD.png"):
        with PILImage.open(path) as im:
            assert im.format == "PNG" and im.size == (128, 128), path


def test_every_spinekit_file_is_installed_with_the_extension():
    cmake = REPO / "CMakeLists.txt"
    scripts = set(cmake_set(cmake, "SPINEKIT_PYTHON_SCRIPTS"))
    resources = set(cmake_set(cmake, "SPINEKIT_PYTHON_RESOURCES"))
    package = REPO / "spinekit"
    py = {str(p.relative_to(REPO)) for p in package.rglob("*.py") if "__pycache__" not in p.parts}
    data = {str(p.relative_to(REPO)) for p in (package / "data").rglob("*") if p.is_file()} if (package / "data").is_dir() else set()
    fix = " (python Testing/test_slicer_module_static.py --update rewrites the list)"
    assert not (py - scripts), f"CMakeLists.txt SPINEKIT_PYTHON_SCRIPTS misses {sorted(py - scripts)}{fix}"
    assert not (data - resources), f"CMakeLists.txt SPINEKIT_PYTHON_RESOURCES misses {sorted(data - resources)}{fix}"
    stale = {p for p in scripts | resources if not (REPO / p).is_file()}
    assert not stale, f"CMakeLists.txt lists files that do not exist: {sorted(stale)}{fix}"
    assert "ctkMacroCompilePythonScript(" in cmake.read_text()


def test_extensions_index_entry():
    entry = json.loads((REPO / "SpineKit.json").read_text())
    for key in ("category", "scm_url", "scm_revision", "build_dependencies"):
        assert entry.get(key), key
    assert entry["scm_url"].startswith("https://") and entry["scm_url"].endswith(".git")
    assert isinstance(entry["build_dependencies"], list) and "PyTorch" in entry["build_dependencies"]
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE\s+"([^"#]*)', (REPO / "CMakeLists.txt").read_text()).group(1)
    assert entry["scm_url"][: -len(".git")].rstrip("/") == homepage.rstrip("/")


def spinekit_file_lists() -> tuple[list[str], list[str]]:
    """(python files, data files) of the spinekit package, repository-relative, sorted."""
    package = REPO / "spinekit"
    files = [p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    scripts = sorted(str(p.relative_to(REPO)) for p in files if p.suffix == ".py")
    data = sorted(str(p.relative_to(REPO)) for p in files if p.suffix != ".py" and p.suffix != ".pyc"
                  and "data" in p.relative_to(package).parts[:1])
    return scripts, data


def update_cmake_lists() -> None:
    """Rewrite the spinekit file lists in the top-level CMakeLists.txt (between the markers)."""
    cmake = REPO / "CMakeLists.txt"
    text = cmake.read_text()
    scripts, data = spinekit_file_lists()
    block = ("# BEGIN spinekit files\nset(SPINEKIT_PYTHON_SCRIPTS\n" + "".join(f"  {s}\n" for s in scripts)
             + "  )\n\nset(SPINEKIT_PYTHON_RESOURCES\n" + "".join(f"  {d}\n" for d in data) + "  )\n# END spinekit files")
    new = re.sub(r"# BEGIN spinekit files.*?# END spinekit files", lambda m: block, text, flags=re.S)
    cmake.write_text(new)
    print(f"{cmake}: {len(scripts)} scripts, {len(data)} data files listed")


if __name__ == "__main__":
    import sys

    if "--update" in sys.argv:
        update_cmake_lists()


def test_module_imports_without_the_optional_packages():
    """SpineBMDLib (what SpineBMD.py imports at load time) must import in a Slicer whose Python
    lacks the packages that are installed on first use: block them and import."""
    import subprocess
    import sys

    code = f"""
import sys, importlib.abc
BLOCKED = {{"scipy", "pandas", "xraylib", "skimage", "matplotlib", "pydicom", "torch", "monai", "sklearn"}}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(REPO / "SpineBMD")!r})
import SpineBMDLib, spinekit.mrml
from SpineBMDLib import dependencies
print(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
