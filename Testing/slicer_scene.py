"""A headless Slicer "application" on a real MRML scene (slicer-core wheel, no Qt), for tests."""

from __future__ import annotations


def headless_scene():
    """A scene with Slicer's application logic and the Colors, Volumes, Markups, Segmentations
    and Transforms module logics attached, set as ``slicer.mrmlScene``."""
    import slicer

    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    app.SetModuleLogic("Colors", app.GetColorLogic())
    keep = [app]
    for name, cls in [
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("Markups", slicer.vtkSlicerMarkupsLogic),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("Transforms", slicer.vtkSlicerTransformLogic),
    ]:
        module_logic = cls()
        module_logic.SetMRMLScene(scene)
        module_logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, module_logic)
        keep.append(module_logic)
    slicer.mrmlScene = scene
    scene.keep = keep  # the logics live as long as the scene
    scene.app = app
    return scene
