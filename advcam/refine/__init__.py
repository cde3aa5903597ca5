"""advcam.refine: pseudo labels from CAMs (dense CRF; the random walk plugs into ``METHODS``)."""
from advcam.refine.crf import CRFParams, cam_to_label, crf_inference_label

__all__ = ["CRFParams", "cam_to_label", "crf_inference_label"]
