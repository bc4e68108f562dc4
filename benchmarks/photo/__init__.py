"""The photo regime: caption-conditioned 64x64 RGB crops of real photographs that ship inside
installed packages (scikit-learn's sample images, scikit-image's data images), for a
high-entropy benchmark of the decoding methods (scripts/build_photo.py builds its model)."""
