"""Looking at a result: correspondences in the slice views, the match of a clicked point, QA volumes.

The match search reads the descriptors the registration's child process wrote (numpy only): no
PyTorch in Slicer's process and nothing left on a GPU.
"""

from __future__ import annotations

import numpy as np

from .settings import QA_KINDS, InvalidInput

# Window of the find-match search with MIND around where the registration maps the point: MIND
# describes local structure only, so a wider search finds look-alikes elsewhere.
MIND_SEARCH_RADIUS_MM = 10.0


def nodesByClass(scene, className: str) -> list:
    """The scene's nodes of a class, without the vtkCollection GetNodesByClass leaks in Python."""
    return [
        scene.GetNthNodeByClass(i, className)
        for i in range(scene.GetNumberOfNodesByClass(className))
    ]


def correspondence(fixedPoints, movingPoints, index: int) -> tuple[np.ndarray, np.ndarray]:
    """World (RAS) positions of correspondence ``index`` (0-based) in the two point lists."""
    count = min(fixedPoints.GetNumberOfControlPoints(), movingPoints.GetNumberOfControlPoints())
    if not 0 <= index < count:
        raise InvalidInput(f"There is no correspondence {index + 1} (there are {count}).")
    return (
        np.array(fixedPoints.GetNthControlPointPositionWorld(index)),
        np.array(movingPoints.GetNthControlPointPositionWorld(index)),
    )


def jumpSlices(scene, fixedPosition, movingPosition, movingVolume) -> None:
    """Centre each slice view on the point of the volume it shows.

    Views showing ``movingVolume`` as background go to ``movingPosition``; the others to
    ``fixedPosition`` (world RAS).
    """
    backgrounds = {
        composite.GetLayoutName(): composite.GetBackgroundVolumeID()
        for composite in nodesByClass(scene, "vtkMRMLSliceCompositeNode")
    }
    movingId = movingVolume.GetID() if movingVolume is not None else None
    for sliceNode in nodesByClass(scene, "vtkMRMLSliceNode"):
        showsMoving = (
            movingId is not None and backgrounds.get(sliceNode.GetLayoutName()) == movingId
        )
        position = movingPosition if showsMoving else fixedPosition
        sliceNode.JumpSliceByCentering(*map(float, position))


class MatchSearch:
    """The match search of one completed run, valid while its inputs stay as they were."""

    def __init__(self, job) -> None:
        if job.features is None:
            raise InvalidInput("The registration kept no features; run it again.")
        self.fixedFeatures, self.movingFeatures, self.kind = job.features
        self.transform = job.outputs.transform
        self._inputs = [(node, _stamp(node)) for node in (job.inputs.fixed, job.inputs.moving)]

    def valid(self, scene) -> bool:
        """False once an input volume left the scene or its voxels or geometry changed."""
        return all(
            scene.IsNodePresent(node) and _stamp(node) == stamp for node, stamp in self._inputs
        )

    def find(self, movingPosition) -> tuple[np.ndarray, float]:
        """The fixed-volume match (RAS) of a point of the moving volume and its similarity.

        ``movingPosition`` is in the moving volume's own coordinates (RAS, before any transform).
        SAM searches the whole fixed body; MIND, which is not unique across the body, searches
        within MIND_SEARCH_RADIUS_MM of where the registration maps the point.
        """
        from SAMERegistrationLib import mrml
        from SAMERegistrationLib.feature_export import match_point

        movingLps = mrml.FLIP @ np.asarray(movingPosition, dtype=np.float64)
        expected = None
        if self.kind == "mind":
            point = np.asarray(movingPosition, dtype=np.float64)[None]
            world = mrml.map_points_through(self.transform, point, to_world=True)[0]
            expected = mrml.FLIP @ world
        found = match_point(
            self.fixedFeatures, self.movingFeatures, movingLps, expected, MIND_SEARCH_RADIUS_MM
        )
        if found is None:
            raise InvalidInput(
                "The point lies outside the moving volume's body, or no fixed body voxel lies "
                "near where the registration maps it. Pick a point inside the body."
            )
        fixedLps, similarity = found
        return mrml.FLIP @ fixedLps, similarity


def _stamp(node) -> tuple:
    """What changes when a volume's voxels or geometry change."""
    image = node.GetImageData()
    matrix = [0.0] * 16
    import vtk

    ijkToRas = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijkToRas)
    ijkToRas.DeepCopy(matrix, ijkToRas)
    return (node.GetID(), image.GetMTime() if image is not None else None, tuple(matrix))


def computeQaVolume(transformNode, reference, output, kind: str = "magnitude") -> None:
    """Fill ``output`` with the displacement magnitude (mm) or Jacobian determinant of the map a
    volume under ``transformNode`` is resampled through, on ``reference``'s grid. Costly on big
    grids: show ``qaCostText`` first."""
    from SAMERegistrationLib import mrml

    if kind not in QA_KINDS:
        raise InvalidInput(f"The QA volume kind must be one of {', '.join(QA_KINDS)}.")
    image = mrml.displacement_qa_image(transformNode, reference, kind)
    mrml.update_volume_node_from_image(output, image)
    output.SetAndObserveTransformNodeID(None)
    if output.GetDisplayNode() is None:
        output.CreateDefaultDisplayNodes()


def qaCostText(reference) -> str:
    """What a QA volume on ``reference``'s grid costs, for the user to decide."""
    from SAMERegistrationLib import mrml

    voxels, seconds, megabytes = mrml.qa_cost(reference)
    return (
        f"{voxels / 1e6:.1f} M voxels: about {seconds:.0f} s during which Slicer does not respond, "
        f"and {megabytes:.0f} MB of memory."
    )


class FindMatchPlacement:
    """Place mode for the find-match queries: entered and left cleanly.

    Uses the selection node's reference place class (so the toolbar follows), restores the place
    persistence it found, and calls ``onLeft`` when placing is left from elsewhere (the toolbar).
    """

    def __init__(self, selection, interaction, onLeft=None) -> None:
        self.selection = selection
        self.interaction = interaction
        self.onLeft = onLeft
        self.active = False
        self._persistence = None
        self._observer = None

    def start(self, queryNode) -> None:
        self.selection.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsFiducialNode")
        self.selection.SetActivePlaceNodeID(queryNode.GetID())
        self._persistence = self.interaction.GetPlaceModePersistence()
        self.interaction.SetPlaceModePersistence(1)
        self.interaction.SetCurrentInteractionMode(self.interaction.Place)
        self.active = True
        self._observer = self.interaction.AddObserver(
            self.interaction.InteractionModeChangedEvent, self._onModeChanged
        )

    def stop(self) -> None:
        """Leave place mode (if still in it) and restore what was changed."""
        if not self.active:
            return
        self.active = False
        self.interaction.RemoveObserver(self._observer)
        self._observer = None
        if self._persistence is not None:
            self.interaction.SetPlaceModePersistence(self._persistence)
        if self.interaction.GetCurrentInteractionMode() == self.interaction.Place:
            self.interaction.SetCurrentInteractionMode(self.interaction.ViewTransform)

    def _onModeChanged(self, caller, event) -> None:
        if self.active and self.interaction.GetCurrentInteractionMode() != self.interaction.Place:
            self.stop()
            if self.onLeft:
                self.onLeft()
