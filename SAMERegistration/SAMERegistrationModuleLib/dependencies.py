"""The Python packages a run needs beyond Slicer's own: PyTorch (through the PyTorch extension)
and whatever ``Resources/requirements.txt`` lists. Checked and installed on Apply, never at import.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

TORCH_REQUIREMENT = ">=2.1"


def torchInstalled() -> bool:
    return importlib.util.find_spec("torch") is not None


def requirements(path: str | Path) -> list[str]:
    """The requirement lines of a requirements.txt, comments and blank lines left out."""
    lines = (
        line.split("#")[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines()
    )
    return [line for line in lines if line]


def missingRequirements(path: str | Path) -> list[str]:
    """The requirements of ``path`` whose package cannot be imported here."""
    return [
        line
        for line in requirements(path)
        if importlib.util.find_spec(re.split(r"[<>=!~;\[ ]", line)[0].replace("-", "_")) is None
    ]


def ensureDependencies(requirementsPath: str | Path, moduleName: str) -> bool:
    """Inside Slicer: install what is missing after asking the user. True when all is there."""
    import slicer

    if not torchInstalled() and not installPyTorch():
        return False
    packaging = getattr(slicer, "packaging", None)  # Slicer 5.12 and later
    with slicer.util.tryWithErrorDisplay("Installing Python packages failed."):
        if packaging is not None:
            packaging.pip_ensure(
                packaging.load_requirements(str(requirementsPath)), requester=moduleName
            )
            return True
        missing = missingRequirements(requirementsPath)
        if missing and not slicer.util.confirmOkCancelDisplay(
            f"SAME Registration needs these Python packages: {', '.join(missing)}. Install them now?",
            windowTitle="Install Python packages",
        ):
            return False
        if missing:
            slicer.util.pip_install(" ".join(missing))
        return True
    return False


def installPyTorch() -> bool:
    """Inside Slicer: install PyTorch with the PyTorch extension, after asking the user."""
    import slicer

    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        slicer.util.errorDisplay(
            "SAME Registration needs PyTorch, which the 'PyTorch' extension provides. Install "
            "that extension with the Extensions Manager, restart Slicer and press Apply again."
        )
        return False
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if torchLogic.torchInstalled():
        return True
    if not slicer.util.confirmOkCancelDisplay(
        "SAME Registration runs on PyTorch, which is not installed yet.\n\n"
        "Install it now? The PyTorch extension picks the build that suits this computer's "
        "NVIDIA GPU, or the CPU build. The download is large (up to a few GB) and can take "
        "several minutes.",
        windowTitle="Install PyTorch",
    ):
        return False
    with slicer.util.tryWithErrorDisplay("Installing PyTorch failed.", waitCursor=True):
        if torchLogic.installTorch(
            askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT
        ):
            return True
    slicer.util.errorDisplay("PyTorch was not installed; the registration cannot run.")
    return False
