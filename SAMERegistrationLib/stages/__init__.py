"""Registration stages: affine, coarse, deform, instance optimisation."""
