"""Short, deterministic training of a slice-wise segmentation network on one subject.

Hyper-parameters come from ``models/<name>/train.toml`` (see :class:`TrainConfig`); the
best checkpoint by validation Dice on a held-out part of the training subject is written
as ``models/<name>/weights.pt`` (a ``state_dict``). The held-out evaluation subject is
never looked at here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from monai.losses.dice import DiceLoss
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from scp_node.errors import ModelError
from scp_node.inference.nets import build_network
from scp_node.inference.preprocess import stack_context
from scp_node.training.data import (
    LOSSES,
    TRAIN_FILE,
    CropSampler,
    Subject,
    TrainConfig,
    load_subject,
    split_slices,
)

__all__ = ["TrainResult", "dice_scores", "make_loss", "segmentation_loss", "train"]

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.pt"


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced.

    ``val_dice`` is the mean foreground Dice on the held-out slices of the training subject
    for the saved (best) checkpoint; ``history`` has it for every epoch.
    """

    weights_path: Path
    val_dice: float
    best_epoch: int
    epochs_run: int
    steps: int
    minutes: float
    stopped: str
    history: list[float] = field(default_factory=list)
    train_slices: int = 0
    val_slices: int = 0


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: torch.Tensor | None,
    dice_weight: float,
    *,
    ce: bool = True,
    edge_weight: float = 0.0,
) -> torch.Tensor:
    """Weighted cross-entropy + soft Dice over the foreground classes (+ an edge term).

    ``logits`` (B, K, H, W), ``target`` (B, H, W) int64 class indices. The soft Dice is
    MONAI's :class:`~monai.losses.DiceLoss` with the intersection and sums pooled over the
    batch and smoothing 1. Weighted cross-entropy is torch's: MONAI's ``DiceCELoss`` also
    applies the class weights to the Dice term, which is not the notes' "Dice + weighted
    cross-entropy" (nor the shipped recipe). ``ce=False`` leaves Dice alone (weighted by
    ``dice_weight``). The edge term, ``edge_weight`` times the mean absolute difference
    between vertically and horizontally neighbouring pixels of the foreground
    probabilities, penalises ragged, noisy boundaries (MONAI has no such loss).
    """
    loss = F.cross_entropy(logits, target, weight=class_weights) if ce else logits.new_zeros(())
    if logits.shape[1] < 2:
        return loss
    if dice_weight != 0 or not ce:
        loss = loss + dice_weight * _dice_loss(logits, target.unsqueeze(1))
    if edge_weight:
        probs = logits.softmax(dim=1)[:, 1:]
        vertical = (probs[..., 1:, :] - probs[..., :-1, :]).abs().mean()
        horizontal = (probs[..., :, 1:] - probs[..., :, :-1]).abs().mean()
        loss = loss + edge_weight * (vertical + horizontal)
    return loss


_dice_loss = DiceLoss(
    include_background=False,
    to_onehot_y=True,
    softmax=True,
    batch=True,
    smooth_nr=1.0,
    smooth_dr=1.0,
)


def make_loss(
    config: TrainConfig, device: torch.device | str = "cpu"
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss ``train.toml`` asks for, as ``loss(logits, target)``.

    ``config.loss`` ``"dice+wce"``: cross-entropy weighted by ``ce_class_weights`` + Dice
    times ``dice_weight``; ``"dice"``: Dice alone. ``edge_weight`` > 0 adds the edge term
    (see :func:`segmentation_loss`).

    Raises
    ------
    ModelError
        ``config.loss`` is unknown.
    """
    if config.loss not in LOSSES:
        raise ModelError(f"unknown loss {config.loss!r} (known: {', '.join(LOSSES)})")
    class_weights = (
        torch.tensor(config.ce_class_weights, dtype=torch.float32, device=device)
        if config.ce_class_weights and config.loss == "dice+wce"
        else None
    )
    with_ce = config.loss == "dice+wce"
    dice_weight = config.dice_weight if with_ce else 1.0

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return segmentation_loss(
            logits,
            target,
            class_weights,
            dice_weight,
            ce=with_ce,
            edge_weight=config.edge_weight,
        )

    return loss


def dice_scores(
    prediction: npt.NDArray[np.integer], reference: npt.NDArray[np.integer], num_classes: int
) -> list[float]:
    """Dice per foreground class (1 .. num_classes-1); 1.0 where both are empty."""
    scores = []
    for index in range(1, num_classes):
        pred = prediction == index
        ref = reference == index
        total = int(pred.sum()) + int(ref.sum())
        scores.append(1.0 if total == 0 else 2.0 * int((pred & ref).sum()) / total)
    return scores


@torch.inference_mode()
def _validate(net: nn.Module, subject: Subject, slices: list[int], config: TrainConfig) -> float:
    net.eval()
    device = next(net.parameters()).device
    stacked = stack_context(subject.image, config.context_slices)[slices]
    predictions = []
    for start in range(0, len(slices), 16):
        batch = torch.from_numpy(stacked[start : start + 16]).to(device)
        predictions.append(net(batch).argmax(dim=1).cpu().numpy())
    net.train()
    prediction = np.concatenate(predictions)
    return float(np.mean(dice_scores(prediction, subject.target[slices], config.num_classes)))


def train(
    model_dir: Path,
    data_dir: Path,
    *,
    seed: int = 0,
    max_minutes: float | None = None,
    progress: bool = True,
    network: nn.Module | None = None,
    weights_file: str = WEIGHTS_FILE,
    epochs: int | None = None,
    lr: float | None = None,
    device: str = "cpu",
) -> TrainResult:
    """Train the network described by ``model_dir/train.toml`` and save its best weights.

    Parameters
    ----------
    model_dir
        Folder with ``train.toml``; ``weights.pt`` (a ``state_dict``) is written there,
        replaced atomically each time validation Dice improves.
    data_dir
        Folder holding ``<subject>/<image>`` and ``<subject>/<labels>`` (NIfTI).
    seed
        Seeds torch and the numpy Generator: with the same seed, config and no time limit
        a run gives identical weights.
    max_minutes
        Wall-clock limit; the run stops after the epoch that crosses it (then the result
        depends on machine speed, so it is no longer reproducible).
    progress
        Show a rich progress bar.
    network
        Start from this network (e.g. a pruned one, for fine-tuning) instead of a fresh
        ``config.architecture``; it is trained in place.
    weights_file
        Name of the checkpoint written in ``model_dir``.
    epochs, lr
        Override ``train.toml``'s ``epochs`` and ``lr`` (fine-tuning runs are shorter and
        gentler).
    device
        ``"cpu"``, ``"cuda"`` or ``"auto"``. On CUDA the forward pass runs under autocast
        (bf16 when supported, else fp16 with a gradient scaler); on the CPU in fp32.

    Returns
    -------
    TrainResult

    Raises
    ------
    ModelError
        ``train.toml`` is missing or invalid, or the architecture is unknown.
    """
    started = time.monotonic()
    config = TrainConfig.from_file(model_dir / TRAIN_FILE)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    subject = load_subject(data_dir, config)
    train_slices, val_slices = split_slices(
        subject.image.shape[0], config.val_block, config.val_every
    )
    sampler = CropSampler(subject, train_slices, config, rng)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    run_device = torch.device(device)
    net = network if network is not None else build_network(config.architecture, config.params)
    net.to(run_device).train()
    num_epochs = epochs if epochs is not None else config.epochs
    base_lr = lr if lr is not None else config.lr
    optimiser = torch.optim.AdamW(net.parameters(), lr=base_lr, weight_decay=config.weight_decay)
    total_steps = max(1, num_epochs * config.steps_per_epoch)
    amp_dtype = _cuda_amp_dtype() if run_device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    def lr_factor(step: int) -> float:
        cosine = 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_factor)
    loss_fn = make_loss(config, run_device)
    weights_path = model_dir / weights_file
    best_dice = -1.0
    best_epoch = 0
    best_state: dict[str, torch.Tensor] = {}
    history: list[float] = []
    stopped = "epochs"
    steps = 0
    logger.info(
        "training %s on %s: %d train / %d validation slices, %d parameters",
        config.architecture,
        config.subject,
        len(train_slices),
        len(val_slices),
        sum(p.numel() for p in net.parameters()),
    )
    with Progress(
        TextColumn("[bold]train[/] epoch {task.fields[epoch]}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]:.3f} val Dice {task.fields[dice]:.3f}"),
        TimeElapsedColumn(),
        disable=not progress,
    ) as bar:
        task = bar.add_task("train", total=total_steps, epoch=0, loss=0.0, dice=0.0)
        for epoch in range(1, num_epochs + 1):
            running = 0.0
            for _ in range(config.steps_per_epoch):
                inputs, target = sampler.sample(config.batch_size)
                inputs, target = inputs.to(run_device), target.to(run_device)
                with _autocast(amp_dtype):
                    logits = net(inputs)
                loss = loss_fn(logits.float(), target)
                optimiser.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
                scaler.step(optimiser)
                scaler.update()
                scheduler.step()
                steps += 1
                value = loss.item()
                running += value
                bar.update(task, advance=1, epoch=epoch, loss=value)
            dice = _validate(net, subject, val_slices, config)
            history.append(dice)
            bar.update(task, dice=dice)
            logger.info(
                "epoch %d: loss %.4f, validation Dice %.4f",
                epoch,
                running / max(1, config.steps_per_epoch),
                dice,
            )
            if dice > best_dice:
                best_dice, best_epoch = dice, epoch
                best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
                _save(best_state, weights_path)
            elif epoch - best_epoch >= config.patience:
                stopped = "early stopping"
                break
            if max_minutes is not None and (time.monotonic() - started) / 60 >= max_minutes:
                stopped = "time limit"
                break
    minutes = (time.monotonic() - started) / 60
    logger.info(
        "best validation Dice %.4f at epoch %d (%s after %d epochs, %.1f min)",
        best_dice,
        best_epoch,
        stopped,
        len(history),
        minutes,
    )
    return TrainResult(
        weights_path=weights_path,
        val_dice=best_dice,
        best_epoch=best_epoch,
        epochs_run=len(history),
        steps=steps,
        minutes=minutes,
        stopped=stopped,
        history=history,
        train_slices=len(train_slices),
        val_slices=len(val_slices),
    )


def _cuda_amp_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager[object]:
    """Autocast on CUDA with ``dtype``; no-op (fp32) when ``dtype`` is None (the CPU)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    partial = path.with_suffix(path.suffix + ".part")
    torch.save(state, partial)
    os.replace(partial, path)
