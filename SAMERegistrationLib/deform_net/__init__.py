"""SAM-deform: a U-Net that predicts a diffeomorphic refinement of the pre-aligned pair.

``network`` holds the U-Net, ``correlation`` the SAM correlation input, ``inputs`` turns a
pre-aligned pair into the network's inputs, ``field`` its output into a displacement and
``checkpoint`` the weights file format. The training objective lives in ``train/deform_losses``.
"""
