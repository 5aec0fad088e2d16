"""The study's CNN and its training loop for one cross-validation fold.

Architecture (the study's table, section 1.3), per block twice
``Conv2d(3x3, stride 1, pad 1) -> PReLU(c) -> BatchNorm2d(c)`` then ``MaxPool2d(2)``,
blocks of 32, 64, 128, 256, 512 channels; then dense 512*7*7 -> 512 -> 256 -> 64 with
``Linear -> PReLU() -> BatchNorm1d -> Dropout`` and a final ``Linear(64, classes)``.
``width`` scales every channel and hidden size, ``image_size`` the input, so a CPU
demo can train the same design small. Defaults are the study's at 224x224.

Training data arrive as the uint8 ``crop224`` cache (centre crop of a 256 resize, as
in the study). The whole set is moved to the device once; batches are cast,
augmented and normalised there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STUDY_MEAN = (0.485, 0.456, 0.406)
STUDY_STD = (0.229, 0.256, 0.225)  # sic: the study's value for green
BLOCK_CHANNELS = (32, 64, 128, 256, 512)
DENSE_FEATURES = (512, 256, 64)


def _scaled(n: int, width: float) -> int:
    return max(1, round(n * width))


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for cin in (in_channels, out_channels):
        layers += [
            nn.Conv2d(cin, out_channels, 3, 1, 1),
            nn.PReLU(out_channels),
            nn.BatchNorm2d(out_channels),  # after the activation: the study's R -> B order
        ]
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class MangoCNN(nn.Module):
    def __init__(
        self,
        num_classes: int = 3,
        *,
        image_size: int = 224,
        width: float = 1.0,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
        channels = [_scaled(c, width) for c in BLOCK_CHANNELS]
        self.features = nn.Sequential(
            *(
                conv_block(cin, cout)
                for cin, cout in zip([3, *channels[:-1]], channels, strict=True)
            )
        )
        side = image_size // 32  # five 2x2 max-pools: 224 -> 7
        hidden = [_scaled(n, width) for n in DENSE_FEATURES]
        dense: list[nn.Module] = [nn.Flatten()]
        for fin, fout in zip([channels[-1] * side * side, *hidden[:-1]], hidden, strict=True):
            dense += [nn.Linear(fin, fout), nn.PReLU(), nn.BatchNorm1d(fout), nn.Dropout(dropout)]
        dense.append(nn.Linear(hidden[-1], num_classes))
        self.classifier = nn.Sequential(*dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))  # (B, classes) logits


def build_model(params: dict[str, Any], num_classes: int) -> MangoCNN:
    return MangoCNN(
        num_classes,
        image_size=params["image_size"],
        width=params["width"],
        dropout=params["dropout"],
    )


# ---------------------------------------------------------------- data on the device


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """(n, H, W, 3) uint8 -> (n, size, size, 3) uint8; a no-op at the cached size."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return out


def to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC numpy -> uint8 NCHW tensor on ``device`` (4x smaller than float)."""
    return (
        torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(device)
    )


def normalise(batch: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(STUDY_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(STUDY_STD, device=batch.device).view(1, 3, 1, 1)
    return (batch.float() / 255.0 - mean) / std


def random_flips(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Independent horizontal and vertical flips per sample (training only)."""
    n = batch.shape[0]
    h = torch.rand(n, generator=generator, device="cpu").to(batch.device) < 0.5
    v = torch.rand(n, generator=generator, device="cpu").to(batch.device) < 0.5
    batch = torch.where(h.view(-1, 1, 1, 1), batch.flip(3), batch)
    return torch.where(v.view(-1, 1, 1, 1), batch.flip(2), batch)


# ---------------------------------------------------------------- one epoch each way


@dataclass(frozen=True, slots=True)
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    seconds: float


def train_one_epoch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    augment: bool,
    generator: torch.Generator,
) -> tuple[float, float]:
    """One pass in a random order; returns (mean loss, accuracy) over the pass."""
    model.train()
    order = torch.randperm(len(images), generator=generator).to(images.device)
    total_loss, correct, seen = 0.0, 0, 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < 2:  # BatchNorm cannot train on a batch of one
            continue
        batch = images[idx]
        if augment:
            batch = random_flips(batch, generator)
        logits = model(normalise(batch))
        loss = F.cross_entropy(logits, labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(idx)
        correct += (logits.argmax(1) == labels[idx]).sum().item()
        seen += len(idx)
    return total_loss / max(seen, 1), correct / max(seen, 1)


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    chunks = [
        F.softmax(model(normalise(images[s : s + batch_size])).float(), dim=1)
        for s in range(0, len(images), batch_size)
    ]
    if not chunks:
        return torch.empty(0, model.classifier[-1].out_features)
    return torch.cat(chunks)


def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> tuple[float, float, torch.Tensor]:
    """(loss, accuracy, probabilities) with no augmentation and no dropout."""
    probs = predict_proba(model, images)
    if len(labels) == 0:
        return float("nan"), float("nan"), probs
    loss = F.nll_loss(torch.log(probs.clamp_min(1e-12)), labels).item()
    acc = (probs.argmax(1) == labels).float().mean().item()
    return loss, acc, probs


# ---------------------------------------------------------------- one fold


@dataclass
class FoldOutcome:
    history: list[EpochStats]
    train_acc: float
    val_acc: float
    val_probs: np.ndarray
    test_probs: np.ndarray
    seconds: float
    state_dict: dict[str, torch.Tensor] = field(repr=False)


def pick_device(preferred: str | None = None) -> torch.device:
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_fold(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    test_images: np.ndarray,
    params: dict[str, Any],
    *,
    num_classes: int,
    seed: int,
    device: torch.device | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> FoldOutcome:
    """Train the CNN with SGD on one fold; images are (n, H, W, 3) uint8 crops."""
    started = time.perf_counter()
    device = device or pick_device()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    size = params["image_size"]

    def tensors(images: np.ndarray) -> torch.Tensor:
        return to_device(resize_batch(images, size), device)

    x_train, x_val, x_test = tensors(train_images), tensors(val_images), tensors(test_images)
    y_train = torch.as_tensor(train_labels, dtype=torch.long, device=device)
    y_val = torch.as_tensor(val_labels, dtype=torch.long, device=device)

    model = build_model(params, num_classes).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=params["lr"],
        momentum=params["momentum"],
        weight_decay=params["weight_decay"],
    )
    history: list[EpochStats] = []
    for epoch in range(params["epochs"]):
        epoch_start = time.perf_counter()
        train_loss, train_acc = train_one_epoch(
            model,
            x_train,
            y_train,
            optimizer,
            batch_size=params["batch_size"],
            augment=params["augment"],
            generator=generator,
        )
        val_loss, val_acc, _ = evaluate(model, x_val, y_val)
        stats = EpochStats(
            epoch, train_loss, train_acc, val_loss, val_acc, time.perf_counter() - epoch_start
        )
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)

    _, final_train_acc, _ = evaluate(model, x_train, y_train)
    _, final_val_acc, val_probs = evaluate(model, x_val, y_val)
    test_probs = predict_proba(model, x_test)
    return FoldOutcome(
        history=history,
        train_acc=final_train_acc,
        val_acc=final_val_acc,
        val_probs=val_probs.cpu().numpy(),
        test_probs=test_probs.cpu().numpy(),
        seconds=time.perf_counter() - started,
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
    )
