"""Plain-PyTorch baseline for the transferlab speed benchmark.

Why this script exists
----------------------
transferlab's fast path is benchmarked against *something*; this file is that something. It is the ordinary
script a user would write after reading the torchvision "transfer learning" tutorial and the timm docs, with
none of transferlab's tricks. It deliberately does **not** import transferlab, so the comparison measures the
library against the textbook recipe rather than against itself.

How it follows the docs
-----------------------
* Data: an ImageFolder-style ``Dataset`` (image path + class index) that opens and decodes every image with PIL
  in ``__getitem__`` (``.convert("RGB")``, since Tiny ImageNet has grayscale JPEGs), followed by a v1
  ``torchvision.transforms.Compose`` (``Resize`` / ``ToTensor`` / ``Normalize``, plus ``RandomAffine`` and
  ``RandomHorizontalFlip`` for training augmentation).
* Loading: a stock ``torch.utils.data.DataLoader`` with ``num_workers=2`` by default and
  ``persistent_workers=False``; batches are moved to the device with a plain ``.to(device)``.
* Model: ``timm.create_model(name, pretrained=False, num_classes=1000)`` with the weights read by
  ``safetensors.torch.load_file`` and ``load_state_dict(strict=True)``; heads are swapped with timm's
  ``reset_classifier``.
* Numerics: fp32, NCHW, default memory format; no ``channels_last``, no autocast, no compilation, no
  cuDNN tuning flags.
* Timing: ``time.perf_counter`` around the loop only (model construction and weight loading excluded);
  on CUDA, ``torch.cuda.synchronize()`` is called before every timer read.

The best-flags variant
----------------------
``eval --best-flags`` is the same loop with the flags a competent user takes from timm's ``validate.py``
(``--channels-last --amp --amp-dtype bfloat16 --crop-pct 1.0 --interpolation bilinear``): the model and every
batch in ``channels_last``, the forward pass under ``torch.autocast(dtype=torch.bfloat16)``, and timm's eval
transform at crop-pct 1.0 (``Resize(S)`` of the short side, bilinear, then ``CenterCrop(S)``; for the square
64px images the same pixels as the plain resize). It is the second baseline of the eval row.

Subcommands: ``eval`` (zero-shot ImageNet top-1 through a class map), ``head`` (frozen backbone + linear head),
``bnonly`` (BatchNorm-only fine-tune with a small conv/MLP head) and ``data`` (the input pipeline alone).
Each prints exactly one JSON object as the last line of stdout; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode


def log(message: str) -> None:
    """Progress messages go to stderr so stdout carries only the JSON result."""
    print(f"[baseline] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------- data


class ListImageDataset(Dataset):
    """ImageFolder-style dataset over a ``path<TAB>class_index`` list file; PIL-decodes one image per item."""

    def __init__(self, list_file: str, transform: Callable[[Image.Image], torch.Tensor], limit: int | None = None):
        self.samples: list[tuple[str, int]] = []
        with open(list_file, encoding="utf-8") as handle:
            for line in handle:
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                path, label = line.rsplit("\t", 1)
                self.samples.append((path, int(label)))
                if limit is not None and len(self.samples) >= limit:
                    break
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as img:
            image = img.convert("RGB")
        return self.transform(image), label


def parse_floats(text: str) -> list[float]:
    values = [float(part) for part in text.split(",")]
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated floats, got {text!r}")
    return values


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    # Straight resize (no center crop): the inputs are 64x64 images.
    return transforms.Compose(
        [
            transforms.Resize((size, size), interpolation=InterpolationMode.BILINEAR),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def train_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    # Keras-style ImageDataGenerator(shear_range=0.2, zoom_range=0.2, horizontal_flip=True).
    return transforms.Compose(
        [
            transforms.Resize((size, size), interpolation=InterpolationMode.BILINEAR),
            transforms.RandomAffine(degrees=0, shear=0.2, scale=(0.8, 1.2)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def make_loader(dataset: Dataset, batch_size: int, workers: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        drop_last=drop_last,
        persistent_workers=False,
    )


# -------------------------------------------------------------------------------------------------- model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(name: str, weights: str) -> nn.Module:
    model = timm.create_model(name, pretrained=False, num_classes=1000)
    state = safetensors.torch.load_file(weights)
    model.load_state_dict(state, strict=True)
    return model


def read_class_map(path: str) -> list[int]:
    class_map = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(class_map, list) or not all(isinstance(k, int) for k in class_map):
        raise SystemExit(f"--class-map {path}: expected a JSON list of integers")
    return class_map


def timm_eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    # timm validate.py at --crop-pct 1.0 --interpolation bilinear: short side to S, then a centre crop of S.
    return transforms.Compose(
        [
            transforms.Resize(size, interpolation=InterpolationMode.BILINEAR),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


@torch.inference_mode()
def top1_accuracy(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    class_map: torch.Tensor | None = None,
    best_flags: bool = False,
) -> tuple[float, int]:
    correct = 0
    total = 0
    for images, labels in loader:
        images = images.to(device)
        labels = labels.to(device)
        if best_flags:
            images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(images)
        else:
            logits = model(images)
        if class_map is not None:
            logits = logits[:, class_map]
        correct += (logits.argmax(dim=1) == labels).sum().item()
        total += labels.size(0)
    return (correct / total if total else 0.0), total


# ------------------------------------------------------------------------------------------- subcommands


def cmd_data(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    dataset = ListImageDataset(args.val_list, eval_transform(args.size, args.mean, args.std), limit=args.limit)
    loader = make_loader(dataset, args.batch_size, args.workers, shuffle=False)
    images = 0
    start = time.perf_counter()
    for batch, _labels in loader:
        images += batch.size(0)
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds if seconds else 0.0}


def cmd_eval(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    class_map = torch.tensor(read_class_map(args.class_map), dtype=torch.long, device=device)
    if class_map.numel() != args.num_classes:
        raise SystemExit(f"--class-map has {class_map.numel()} entries, --num-classes is {args.num_classes}")
    model = build_model(args.model, args.weights).to(device)
    model.eval()
    make_transform = timm_eval_transform if args.best_flags else eval_transform
    if args.best_flags:
        model = model.to(memory_format=torch.channels_last)
    dataset = ListImageDataset(args.val_list, make_transform(args.size, args.mean, args.std), limit=args.limit)
    loader = make_loader(dataset, args.batch_size, args.workers, shuffle=False)

    sync(device)
    start = time.perf_counter()
    top1, images = top1_accuracy(model, loader, device, class_map, best_flags=args.best_flags)
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds if seconds else 0.0,
        "top1": top1,
    }


def cmd_head(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    backbone = build_model(args.model, args.weights)
    backbone.reset_classifier(0)  # pooled features
    backbone.requires_grad_(False)
    backbone.eval()
    backbone.to(device)

    torch.manual_seed(args.seed)
    head = nn.Linear(backbone.num_features, args.num_classes).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0)
    criterion = nn.CrossEntropyLoss()

    transform = eval_transform(args.size, args.mean, args.std)
    train_set = ListImageDataset(args.train_list, transform)
    val_set = ListImageDataset(args.val_list, transform)
    train_loader = make_loader(train_set, args.batch_size, args.workers, shuffle=True)
    val_loader = make_loader(val_set, args.batch_size, args.workers, shuffle=False)

    sync(device)
    start = time.perf_counter()
    epoch_loss = float("nan")
    for epoch in range(args.epochs):
        head.train()
        loss_sum = 0.0
        seen = 0
        for images, labels in train_loader:
            images = images.to(device)
            labels = labels.to(device)
            with torch.no_grad():
                features = backbone(images)
            logits = head(features)
            loss = criterion(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * labels.size(0)
            seen += labels.size(0)
        epoch_loss = loss_sum / seen if seen else float("nan")
        log(f"head epoch {epoch + 1}/{args.epochs} loss {epoch_loss:.4f} ({time.perf_counter() - start:.1f}s)")
    sync(device)
    train_seconds = time.perf_counter() - start

    head.eval()
    model = nn.Sequential(backbone, head)
    top1, val_images = top1_accuracy(model, val_loader, device)
    sync(device)
    seconds = time.perf_counter() - start
    images = len(train_set)
    return {
        "seconds": seconds,
        "train_seconds": train_seconds,
        "eval_seconds": seconds - train_seconds,
        "epochs": args.epochs,
        "images": images,
        "train_images_per_s": images * args.epochs / train_seconds if train_seconds else 0.0,
        "val_images": val_images,
        "top1": top1,
        "final_train_loss": epoch_loss,
    }


class SeedHead(nn.Sequential):
    """Reference "seed" head: conv 3x3 -> global average pool -> MLP."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(32, 1024),
            nn.ReLU(),
            nn.Linear(1024, num_classes),
        )


def endless(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Epoch after epoch over the loader, as a step-based training loop does."""
    while True:
        yield from loader


def cmd_bnonly(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    backbone = build_model(args.model, args.weights)
    backbone.reset_classifier(0, global_pool="")  # returns the (B, F, h, w) feature map
    backbone.requires_grad_(False)
    bn_params: list[nn.Parameter] = []
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d):  # includes timm's BatchNormAct2d
            for param in (module.weight, module.bias):
                if param is not None:
                    param.requires_grad_(True)
                    bn_params.append(param)
    backbone.to(device)

    # Channel count of the feature map (usually backbone.num_features); probed in eval mode so BN stats stay put.
    backbone.eval()
    with torch.inference_mode():
        feature_channels = backbone(torch.zeros(1, 3, args.size, args.size, device=device)).shape[1]
    backbone.train()

    torch.manual_seed(args.seed)
    head = SeedHead(feature_channels, args.num_classes).to(device)
    head.train()
    model = nn.Sequential(backbone, head)
    trainable = bn_params + list(head.parameters())
    optimizer = torch.optim.RMSprop(trainable, lr=args.lr)
    criterion = nn.CrossEntropyLoss()
    log(
        f"bnonly: {len(bn_params)} BN tensors + head, {sum(p.numel() for p in trainable)} trainable params, "
        f"feature map channels {feature_channels}"
    )

    train_set = ListImageDataset(args.train_list, train_transform(args.size, args.mean, args.std))
    loader = make_loader(train_set, args.batch_size, args.workers, shuffle=True, drop_last=True)
    if len(loader) == 0:
        raise SystemExit(f"train list has {len(train_set)} images, fewer than one batch of {args.batch_size}")
    batches = endless(loader)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        images, labels = batch
        images = images.to(device)
        labels = labels.to(device)
        loss = criterion(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(args.warmup):
        step(next(batches))

    sync(device)
    start = time.perf_counter()
    losses = [step(next(batches)) for _ in range(args.steps)]
    sync(device)
    seconds = time.perf_counter() - start

    batches.close()  # drop the live DataLoader iterator so its workers exit and count in RUSAGE_CHILDREN
    del batches
    gc.collect()

    window = min(10, args.steps)
    images = args.steps * args.batch_size
    return {
        "steps": args.steps,
        "warmup": args.warmup,
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds if seconds else 0.0,
        "first_loss": sum(losses[:window]) / window if window else float("nan"),
        "final_loss": sum(losses[-window:]) / window if window else float("nan"),
    }


# ------------------------------------------------------------------------------------------------ driver


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--mean", type=parse_floats, required=True, help="normalisation mean, e.g. 0.5,0.5,0.5")
    common.add_argument("--std", type=parse_floats, required=True, help="normalisation std, e.g. 0.5,0.5,0.5")
    common.add_argument("--size", type=int, default=224, help="square input side after Resize((S, S))")
    common.add_argument("--num-classes", type=int, default=200)
    common.add_argument("--batch-size", type=int, default=64)
    common.add_argument("--workers", type=int, default=2, help="DataLoader num_workers")
    common.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--threads", type=int, default=None, help="torch.set_num_threads when given")

    model_args = argparse.ArgumentParser(add_help=False)
    model_args.add_argument("--model", required=True, help="timm model name")
    model_args.add_argument("--weights", required=True, help="safetensors file with the full 1000-class state dict")

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", parents=[common, model_args], help="zero-shot ImageNet top-1 via a class map")
    p.add_argument("--val-list", required=True)
    p.add_argument("--class-map", required=True, help="JSON list: new class k -> ImageNet-1k index")
    p.add_argument("--limit", type=int, default=None, help="use only the first N lines of the val list")
    p.add_argument(
        "--best-flags",
        action="store_true",
        help="timm validate.py's best flags: channels_last, bf16 autocast, crop-pct 1.0, bilinear",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("head", parents=[common, model_args], help="frozen backbone + linear head")
    p.add_argument("--train-list", required=True)
    p.add_argument("--val-list", required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.set_defaults(func=cmd_head)

    p = sub.add_parser("bnonly", parents=[common, model_args], help="BatchNorm-only fine-tune with the seed head")
    p.add_argument("--train-list", required=True)
    p.add_argument("--steps", type=int, default=50, help="timed optimisation steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before the timer starts")
    p.add_argument("--lr", type=float, default=1e-4)
    p.set_defaults(func=cmd_bnonly)

    p = sub.add_parser("data", parents=[common], help="the eval input pipeline alone, no model")
    p.add_argument("--val-list", required=True)
    p.add_argument("--limit", type=int, default=None, help="use only the first N lines of the val list")
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    # ru_maxrss of children is a running max: `import torch` already ran `ldconfig -p` (ctypes.util.find_library),
    # whose peak is inherited from this process. Record it so the DataLoader workers' figure can be judged.
    children_at_start_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    log(f"{args.command} on {device}, torch threads {torch.get_num_threads()}, workers {args.workers}")

    result: dict[str, Any] = {"command": args.command}
    result.update(args.func(args, device))
    gc.collect()
    result.update(
        {
            "model": getattr(args, "model", None),
            "size": args.size,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "children_peak_rss_mb_at_start": children_at_start_mb,
        }
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
