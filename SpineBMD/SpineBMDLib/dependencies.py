"""Python packages SpineBMD needs inside Slicer, installed on first use after the user agrees.

Nothing here installs at import. ``missing`` only looks (importlib.util.find_spec);
``ensure`` asks through a ``confirm`` callback and installs through an ``installer`` callback,
so the policy is testable without Qt. The Slicer module passes
``slicer.util.confirmOkCancelDisplay`` and ``slicer_installer()`` (pip_ensure on Slicer >= 5.12,
else pip_install; torch through the PyTorch extension). Slicer's own numpy and SimpleITK are
never replaced: they are not in these lists.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Iterable

# import name -> pip requirement
CORE_REQUIREMENTS = {
    "scipy": "scipy",
    "pandas": "pandas",
    "xraylib": "xraylib",
    "skimage": "scikit-image",
    "matplotlib": "matplotlib",
    "pydicom": "pydicom",
}
# Only for the learned models / optional backends.
MODEL_REQUIREMENTS = {
    "torch": "torch",
    "monai": "monai>=1.3",
    "sklearn": "scikit-learn",
}


def missing(requirements: dict[str, str]) -> dict[str, str]:
    """The subset of {import name: requirement} whose import name cannot be found."""
    return {name: req for name, req in requirements.items() if importlib.util.find_spec(name) is None}


def ensure(requirements: dict[str, str], confirm: Callable[[str], bool],
           installer: Callable[[list[str]], None], what: str = "SpineBMD") -> bool:
    """Install missing packages after ``confirm(message)`` says yes. True when all are present.

    Torch is never pip-installed here: the installer callback routes it to the PyTorch
    extension (it picks the CUDA/CPU build that matches the machine)."""
    todo = missing(requirements)
    if not todo:
        return True
    names = ", ".join(sorted(todo.values()))
    message = (f"{what} needs these Python packages, which are not installed yet: {names}. "
               "Install them now? (This can take a few minutes and needs internet access.)")
    if not confirm(message):
        return False
    installer(list(todo.values()))
    importlib.invalidate_caches()
    return not missing(requirements)


# Never let pip replace what Slicer ships (or what the PyTorch extension manages).
PROTECTED_PACKAGES = ["numpy", "SimpleITK", "torch", "vtk"]


def slicer_installer() -> Callable[[list[str]], None]:
    """Installer that uses Slicer's own mechanisms (only callable inside Slicer): pip_ensure
    (Slicer >= 5.12; ``slicer.pydeps`` / ``slicer.packaging``) with Slicer's own packages
    protected, else ``slicer.util.pip_install``; torch through the PyTorch extension."""

    def install(requirements: Iterable[str]) -> None:
        import slicer  # inside Slicer only

        reqs = list(requirements)
        if any(_name(r) == "torch" for r in reqs):
            reqs = [r for r in reqs if _name(r) != "torch"]
            install_torch()
        if not reqs:
            return
        helper = getattr(slicer, "pydeps", None) or getattr(slicer, "packaging", None)
        if helper is not None and hasattr(helper, "pip_ensure"):
            from packaging.requirements import Requirement

            # The user has agreed already (ensure() asked), so no second prompt.
            helper.pip_ensure([Requirement(r) for r in reqs], skip_packages=PROTECTED_PACKAGES,
                              prompt_install=False, requester="SpineBMD")
        else:
            slicer.util.pip_install(" ".join(reqs))

    return install


def _name(requirement: str) -> str:
    return requirement.split(">")[0].split("=")[0].split("<")[0].strip().lower()


def install_torch() -> None:
    """torch through the PyTorch extension (PyTorchUtils), which matches the CUDA driver."""
    try:
        import PyTorchUtils  # provided by the PyTorch extension
    except ImportError:
        raise RuntimeError("torch is needed: install the 'PyTorch' extension from the Extensions "
                           "Manager, restart Slicer and try again.") from None
    logic = PyTorchUtils.PyTorchUtilsLogic()
    if not logic.torchInstalled():
        logic.installTorch(askConfirmation=False)
