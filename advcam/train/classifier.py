"""Classifier training (IRN's ``step/train_cam.py``): multilabel soft-margin loss on GAP logits, SGD, poly LR."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from advcam.models.classifier import CAMNet, reference_dropout
from advcam.train import loop


def classification_loss(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Multilabel soft-margin loss of the image-level labels."""
    device = next(model.parameters()).device
    logits = model(batch["image"].to(device))
    return F.multilabel_soft_margin_loss(logits, batch["label"].to(device))


def train_classifier(model: CAMNet, dataset: Dataset, *, epochs: int, batch_size: int, lr: float,
                     weight_decay: float, momentum: float, seed: int, workers: int, resume: Path, curves: Path,
                     fingerprint: Mapping[str, Any]) -> list[list[float]]:
    """Train ``model`` in place (backbone at ``lr``, classifier at 10x ``lr``); return the curve rows."""
    optimizer = loop.make_sgd(model.param_groups(), lr, weight_decay, momentum)
    return loop.fit(model, optimizer, lambda e: loop.epoch_loader(dataset, batch_size, seed, e, workers),
                    classification_loss, epochs=epochs, base_lr=lr, resume=resume, curves=curves,
                    fingerprint=fingerprint, desc="train-cls")


def train_cam(model: CAMNet, dataset: Dataset, *, cfg: Any, seed: int, workers: int, resume: Path, curves: Path,
              fingerprint: Mapping[str, Any]) -> list[list[float]]:
    """Train the plain CAM network with the ``classifier`` params section ``cfg`` (the stage's entry point).

    Every classifier training method has this signature (``advcam.steps.train_cls.TRAINERS``). The network's
    training dropout is ``classifier.dropout`` (null: its arch's reference's, :func:`reference_dropout`)."""
    model.dropout = reference_dropout(model.arch, cfg.get("dropout"))
    return train_classifier(model, dataset, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                            weight_decay=cfg.weight_decay, momentum=cfg.momentum, seed=seed, workers=workers,
                            resume=resume, curves=curves, fingerprint=fingerprint)
