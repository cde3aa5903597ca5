"""EADER training (reference ``ErikStammes/EADER``, ``train.py``): alternating localiser / adversary phases.

Every batch, per (image, positive class) pair: attention map ``A`` of the localiser (its Grad-CAM, see
:mod:`advcam.models.eader`), soft mask ``T(A) = sigmoid(omega (A - sigma))``, erased image ``x (1 - T(A))``.

- Localiser phase: ``L_loc = BCE(logits, y) + beta * mean(A) + alpha * mean_p sigmoid(adv(x_p erased))[c_p]``;
  only the localiser's optimiser steps (the adversary's parameters take no gradient).
- Adversary phase: ``L_adv = BCE(adv(x_p erased), y_image(p))`` on the erased images (masks detached);
  only the adversary's optimiser steps.

Phases alternate every ``phase_steps`` global steps, starting with the localiser (the reference's
``TrainingPhase``: ``step % (2N) < N``). ``alpha = 0`` is the reference's baseline (run without an adversarial
model): no adversary, and every step trains the localiser. Both networks run in train mode throughout, as in the reference (the
resting network's BatchNorm statistics still update with ``resnet_small``). With ``share_weights`` the
localiser is its own adversary (reference ``--share_weights``): every step is a localiser step. BCE is the
multilabel soft-margin loss, identical to the reference's ``BCELoss`` on sigmoid outputs.

Optimiser: EADER's own, as in the reference: for each network SGD with ``classifier.eader``'s ``lr`` (0.01),
``momentum`` (0.9) and ``weight_decay`` (1e-4), one lr for every layer (``head_lr_mult`` 1) and a constant lr
(``lr_schedule: constant``). Options: ``lr_schedule: poly`` (IRN's poly decay over the global step) and
``head_lr_mult: 10`` (IRN's 10x lr on the classifier layer). Epochs, batch and crop are the ``classifier``
section's (the reference: 10 epochs, batch 16, crop 448). Augmentation: ``augmentation`` (:func:`dataset_options`),
the reference's ``RandomResizedCrop`` + flip, or the CAM classifier's.

Differences from the reference: the localiser and the adversary are CAM networks of one arch with a
bias-free classifier (the reference: a torchvision ResNet-101 localiser and a ResNet-18 adversary, each with a
biased fc; the bias does not enter the attention map). In the shared-weights mode the adversarial term is, as
in the reference's shared branch, the mean raw logit of the erased class (with an adversary: its probability).

Resume: after every epoch ``<out>.resume.pt`` holds both networks, both optimisers, the finished epochs and
global step (the phase follows from it), the RNG states and the curve; a killed run started again continues from
the last finished epoch and ends with the same weights as an uninterrupted run (on CPU).
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from advcam.data.datasets import augmentation_options
from advcam.models.classifier import CAMNet
from advcam.models.eader import EADERNet, attention_maps, erase, soft_mask
from advcam.train import loop
from advcam.utils.checkpoint import save_checkpoint
from advcam.utils import param
from advcam.utils.device import frozen
from advcam.utils.errors import AdvcamError
from advcam.utils.progress import log, progress

LOCALISER, ADVERSARY = "localiser", "adversary"
REFERENCE_CROP_SCALE = (0.08, 1.0)  # load_data.py: RandomResizedCrop(448), torchvision's default area range
DEFAULTS: dict[str, Any] = {"alpha": 0.05, "beta": 1e-5, "omega": 100.0, "sigma": 0.5, "phase_steps": 200,
                            "share_weights": False, "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4,
                            "lr_schedule": "constant", "head_lr_mult": 1.0, "augmentation": "reference"}
LR_SCHEDULES = ("constant", "poly")


def eader_params(cfg: Any) -> dict[str, Any]:
    """The ``classifier.eader`` section with defaults filled (read defensively)."""
    section = param(cfg, "eader", None)
    return {k: type(v)(param(section, k, v)) for k, v in DEFAULTS.items()}


def dataset_options(cfg: Any, crop_size: int) -> dict[str, Any]:
    """``ClassificationDataset`` keywords of ``classifier.eader.augmentation`` (``cfg`` = the classifier section):
    ``reference`` is load_data.py's ``RandomResizedCrop`` (area share 0.08-1, aspect 3/4-4/3) + flip; ``shared``
    the CAM classifier's (IRN's resize of the long side to 0.625-1.25x the crop, flip, padded crop)."""
    return augmentation_options(str(eader_params(cfg)["augmentation"]), "classifier.eader.augmentation",
                                {"resized_crop": REFERENCE_CROP_SCALE})


def phase_at(step: int, phase_steps: int, has_adversary: bool = True) -> str:
    """Which network trains at global ``step`` (0-based): ``phase_steps`` localiser steps, then as many
    adversary steps, and so on; always the localiser when there is no separate adversary."""
    if not has_adversary:
        return LOCALISER
    return LOCALISER if step % (2 * phase_steps) < phase_steps else ADVERSARY


def _localiser_pass(model: EADERNet, images: torch.Tensor, labels: torch.Tensor, omega: float, sigma: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(BCE of the localiser, pair classes (P,), attention maps (P, H, W), erased images (P, 3, H, W))."""
    loc = model.localiser
    feats = loc.features(images)
    logits = loc.classifier(feats.mean((2, 3), keepdim=True)).flatten(1)
    bce = F.multilabel_soft_margin_loss(logits, labels)
    rows, classes = labels.nonzero(as_tuple=True)
    att = attention_maps(feats, loc.classifier.weight, rows, classes, (int(images.shape[-2]), int(images.shape[-1])))
    return bce, classes, att, erase(images[rows], soft_mask(att, omega, sigma))


def eader_losses(model: EADERNet, images: torch.Tensor, labels: torch.Tensor, phase: str, *, alpha: float,
                 beta: float, omega: float, sigma: float) -> dict[str, torch.Tensor]:
    """The losses of one batch. ``loss`` is the one to backpropagate for ``phase`` (with graph; absent when the
    batch has no positive label in an adversary phase); the others are detached values for logging:
    ``localiser`` (L_loc), ``adversary`` (L_adv), ``bce``, ``area`` (mean A), ``erased_prob`` (the adversary's
    mean probability of the erased class). ``images`` (B, 3, S, S) normalised, ``labels`` (B, C) multi-hot."""
    train_loc = phase == LOCALISER
    with torch.set_grad_enabled(train_loc and torch.is_grad_enabled()):
        bce, classes, att, erased = _localiser_pass(model, images, labels, omega, sigma)
    pairs = classes.numel() > 0
    area = att.mean() if pairs else bce.new_zeros(())
    adv_logits = None
    if pairs and (not train_loc or alpha > 0):
        adv = model.adversary_net()
        with frozen(adv) if train_loc and not model.shares_weights else nullcontext():
            adv_logits = adv(erased if train_loc else erased.detach())
    prob = torch.sigmoid(adv_logits).gather(1, classes[:, None]).mean() if adv_logits is not None else area * 0
    # the reference's shared branch calls the localiser without its sigmoid: the term is the raw logit there
    term = adv_logits.gather(1, classes[:, None]).mean() if adv_logits is not None and model.shares_weights else prob
    localiser_loss = bce + beta * area + alpha * term
    out = {"localiser": localiser_loss.detach(), "bce": bce.detach(), "area": area.detach(),
           "erased_prob": prob.detach()}
    if adv_logits is not None:
        rows = labels.nonzero(as_tuple=True)[0]
        adv_loss = F.multilabel_soft_margin_loss(adv_logits, labels[rows])
        out["adversary"] = adv_loss.detach()
        if not train_loc:
            out["loss"] = adv_loss
    if train_loc:
        out["loss"] = localiser_loss
    return out


def train_step(model: EADERNet, optimizer: torch.optim.Optimizer, batch: Mapping[str, Any], phase: str,
               terms: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """One optimiser step of ``phase``'s network (``optimizer`` holds that network's parameters only); returns
    :func:`eader_losses`' dict. A non-finite loss is not stepped (the caller raises)."""
    device = next(model.parameters()).device
    out = eader_losses(model, batch["image"].to(device), batch["label"].to(device), phase, **terms)
    if "loss" in out and torch.isfinite(out["loss"]):
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
    return out


def _optimisers(model: EADERNet, hp: Mapping[str, Any]) -> tuple[torch.optim.SGD, torch.optim.SGD | None]:
    def sgd(net: CAMNet) -> torch.optim.SGD:
        return loop.make_sgd(net.param_groups(), hp["lr"], hp["weight_decay"], hp["momentum"], hp["head_lr_mult"])

    return sgd(model.localiser), None if model.adversary is None else sgd(model.adversary)


def lr_at(hp: Mapping[str, Any], step: int, max_step: int) -> float:
    """The backbone lr at global ``step``: ``hp["lr"]`` (constant) or its poly decay."""
    if hp["lr_schedule"] not in LR_SCHEDULES:
        raise AdvcamError(f"classifier.eader.lr_schedule: {hp['lr_schedule']!r} is not one of {', '.join(LR_SCHEDULES)}")
    return hp["lr"] if hp["lr_schedule"] == "constant" else loop.poly_lr(hp["lr"], step, max_step)


def _try_resume(path: Path, fingerprint: Mapping[str, Any], model: EADERNet, opt_loc: torch.optim.Optimizer,
                opt_adv: torch.optim.Optimizer | None) -> tuple[int, list[list[float]]]:
    """Restore a resume file of the same fingerprint; return (finished epochs, curve rows)."""
    state = loop.read_resume(path, fingerprint)
    if state is None:
        return 0, []
    try:
        model.load_state_dict(state["model"])
        opt_loc.load_state_dict(state["localiser_optimizer"])
        if opt_adv is not None:
            opt_adv.load_state_dict(state["adversary_optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise AdvcamError(f"{path}: resume file does not fit this EADER model ({exc}); delete it") from None
    loop.set_rng_state(state["rng"])
    epoch = int(state["epoch"])
    log.info("resuming from %s after epoch %d (step %d)", path, epoch, int(state["step"]))
    return epoch, [list(r) for r in state["curve"]]


def train_eader(model: EADERNet, dataset: Dataset, *, cfg: Any, seed: int, workers: int, resume: Path,
                curves: Path, fingerprint: Mapping[str, Any]) -> list[list[float]]:
    """Train ``model`` in place with the ``classifier`` params section ``cfg`` (its ``eader`` subsection for
    EADER's own params); return the curve rows ``[epoch, step, localiser loss, lr]``."""
    if not isinstance(model, EADERNet):
        raise AdvcamError(f"classifier.method eader needs an EADER model, got {type(model).__name__}")
    hp = eader_params(cfg)
    if hp["share_weights"]:
        model.drop_adversary()
    elif hp["alpha"] == 0:  # the reference's baseline (no --adversarial_model): the localiser alone, every step
        log.info("eader: alpha 0 is the baseline: no adversary, the localiser trains on every step")
        model.drop_adversary()
    opt_loc, opt_adv = _optimisers(model, hp)
    loop.check_checkpoint_space(model, opt_loc, resume, "train-cls (eader)")
    # the reference's DataLoader keeps the last partial batch (no drop_last), and its phases count it
    loader_for = lambda e: loop.epoch_loader(dataset, cfg.batch_size, seed, e, workers, drop_last=False)  # noqa: E731
    steps_per_epoch = len(loader_for(0))
    if steps_per_epoch == 0:
        raise AdvcamError("train-cls (eader): the training list is empty")
    epochs, n = int(cfg.epochs), int(hp["phase_steps"])
    max_step = steps_per_epoch * epochs
    if opt_adv is not None and max_step <= n:
        log.warning("eader: %d steps in all but phase_steps is %d: the adversary never trains "
                    "(lower classifier.eader.phase_steps)", max_step, n)
    start, rows = _try_resume(resume, fingerprint, model, opt_loc, opt_adv)
    terms = {k: hp[k] for k in ("alpha", "beta", "omega", "sigma")}
    warned = False
    for epoch in range(start, epochs):
        model.train()
        sums = {LOCALISER: [0.0, 0], ADVERSARY: [0.0, 0]}
        bar = progress(loader_for(epoch), desc=f"train-cls eader epoch {epoch + 1}/{epochs}", total=steps_per_epoch,
                       unit="batch")
        for i, batch in enumerate(bar):
            step = epoch * steps_per_epoch + i
            phase = phase_at(step, n, opt_adv is not None)
            opt = opt_loc if phase == LOCALISER else opt_adv
            assert opt is not None
            lr = loop.set_lr(opt, lr_at(hp, step, max_step))
            out = train_step(model, opt, batch, phase, terms)
            if "loss" in out:
                if not torch.isfinite(out["loss"]):
                    raise AdvcamError(f"train-cls (eader): {phase} loss became {out['loss'].item()} at epoch "
                                      f"{epoch + 1}, step {step + 1}; lower the learning rate")
                sums[phase][0] += out["loss"].item()
                sums[phase][1] += 1
            rows.append([epoch + 1, step + 1, out["localiser"].item(), lr])
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(phase=phase[:3], loc=f"{out['localiser'].item():.4f}",
                                adv=f"{out.get('adversary', torch.zeros(())).item():.4f}",
                                p_erased=f"{out['erased_prob'].item():.3f}", refresh=False)
        done = ", ".join(f"{k} loss {s / c:.4f} ({c} steps)" for k, (s, c) in sums.items() if c)
        log.info("train-cls eader epoch %d/%d: %s", epoch + 1, epochs, done or "no steps")
        if not warned:  # the rows hold the localiser's loss, logged at every step
            warned = loop.warn_if_diverging("train-cls (eader) localiser", rows, epoch + 1, epoch + 1 == epochs)
        state: dict[str, Any] = {"model": model.state_dict(), "localiser_optimizer": opt_loc.state_dict(),
                                 "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
                                 "rng": loop.rng_state(), "curve": rows}
        if opt_adv is not None:
            state["adversary_optimizer"] = opt_adv.state_dict()
        save_checkpoint(resume, {"kind": "resume", "fingerprint": dict(fingerprint)}, **state)
        loop.write_curves(curves, rows)
    loop.write_curves(curves, rows)
    log.info("wrote %s (%d steps)", curves, len(rows))
    return rows


__all__ = ["dataset_options", "train_eader", "train_step", "eader_losses", "phase_at", "eader_params", "frozen", "LOCALISER",
           "ADVERSARY"]
