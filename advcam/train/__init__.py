"""Training loops of the classifier and the segmenter (shared pieces in :mod:`advcam.train.loop`)."""
