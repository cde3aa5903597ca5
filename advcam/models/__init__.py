"""Networks: torchvision-compatible ResNets, the CAM classifier and the DeepLab-style segmenter."""
from advcam.models.classifier import CAMNet, build_classifier, load_classifier
from advcam.models.deeplab import DeepLab, build_segmenter, load_segmenter
from advcam.models.resnet import fold_batchnorm, load_torchvision_weights

__all__ = ["CAMNet", "DeepLab", "build_classifier", "build_segmenter", "load_classifier", "load_segmenter",
           "fold_batchnorm", "load_torchvision_weights"]
