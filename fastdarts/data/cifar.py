"""CIFAR-10 from a JPEG ImageFolder tree, its tarball, or torchvision's binary batches."""

from __future__ import annotations

import collections
import contextlib
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..errors import DataError
from . import _files

if TYPE_CHECKING:
    from torchvision.datasets import CIFAR10

CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
MEAN = (0.49139968, 0.48215827, 0.44653124)
STD = (0.24703233, 0.24348505, 0.26158768)
TARBALL = "cifar10-jpeg.tar.gz"
TARBALL_SHA256 = "18cf13217cdd1384f1ab13c525d157cd7a581d94ddb13a5558540968f3d9c582"
BINARY = "cifar-10-batches-py"
_UNPACKED = "cifar10-jpeg"  # the cache folder a tarball given to --data unpacks into
_SIZE = 32
_WHAT = f"train/ and test/ JPEG class folders, {TARBALL} or {BINARY}"


class CIFAR10Split:
    """One split of CIFAR-10; images come out as uint8 (B, 3, 32, 32), labels as int64 (B,).

    Images of a JPEG tree are decoded on first request and kept, so a short run decodes only
    what it uses; the binary batches are held in memory from the start.
    """

    def __init__(self, images: Tensor, labels: Tensor, paths: Sequence[str] | None = None):
        self.classes = list(CLASSES)
        self._images = images
        self._labels = labels
        self._paths = paths
        self._decoded = torch.full((len(labels),), paths is None, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self._labels)

    def get(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """Images and labels at ``indices``."""
        idx = torch.as_tensor(indices)
        kind = idx.dtype
        if idx.numel() and (kind == torch.bool or kind.is_floating_point or kind.is_complex):
            # A mask or a float would be read as the indices 0/1 or truncated.
            raise IndexError(f"CIFAR10Split.get: indices must be integers, got {kind}")
        idx = idx.to(torch.int64).reshape(-1)
        if not bool(((idx >= 0) & (idx < len(self))).all()):
            raise IndexError(f"CIFAR10Split.get: indices must lie in [0, {len(self)})")
        missing = idx[~self._decoded[idx]].unique()
        for i in missing.tolist():
            self._images[i] = _decode(self._paths[i])
        self._decoded[missing] = True
        return self._images[idx], self._labels[idx]


def load_cifar10(data: str | None = None, train: bool = True) -> CIFAR10Split:
    """Load a CIFAR-10 split from ``data`` (never downloads), else $FASTDARTS_DATA/cifar10,
    the cache (its download, or a tarball's tree that ``data`` once unpacked there), or
    torchvision's download into the cache."""
    if data is not None:
        return _load_explicit(Path(data), train)
    cache = _files.cache_dir() / "cifar10"
    env = _files.env_data_dir("cifar10")
    skipped = []
    for folder in ([env] if env else []) + [cache, _files.cache_dir() / _UNPACKED]:
        if _source_in(folder) is None:
            if folder == env:
                skipped.append(f"{folder} ($FASTDARTS_DATA): no CIFAR-10 there")
            continue
        try:
            return _load_from(folder, train)
        except DataError as e:
            # Fall back to the next place, but say why this one was skipped.
            warnings.warn(f"ignoring CIFAR-10 in {folder}: {e}", stacklevel=2)
            skipped.append(f"{folder}: {e}")
    try:
        return _download_binary(cache, train)
    except DataError as e:
        if not skipped:
            raise
        raise DataError(f"{e}{_files.skipped_note(skipped)}") from e


def search_split(n: int, portion: float = 0.5) -> tuple[Tensor, Tensor]:
    """DARTS's split of ``n`` training images: the first floor(portion*n) train the weights,
    the rest the architecture; no shuffling (the loaders' orders mix the classes)."""
    cut = math.floor(portion * n)
    if not 0 < cut < n:
        raise ValueError(f"search_split: portion {portion} of {n} images leaves an empty part")
    return torch.arange(cut), torch.arange(cut, n)


def normalize(images_uint8: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 (B, 3, H, W) -> float in [0, 1], normalised with the CIFAR-10 mean and std."""
    _check_images(images_uint8)
    # Compute in at least float32 so half-precision outputs are only rounded once.
    work = torch.promote_types(dtype, torch.float32)
    mean = torch.tensor(MEAN, dtype=work, device=images_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=work, device=images_uint8.device).view(1, 3, 1, 1)
    return ((images_uint8.to(work) / 255 - mean) / std).to(dtype)


def augment(
    images_uint8: Tensor,
    generator: torch.Generator,
    *,
    padding: int = 4,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """DARTS's training transform, batch-wise: random crop (zero padding), random horizontal
    flip, normalise. Randomness comes only from ``generator``, so runs are reproducible."""
    _check_images(images_uint8)
    b, _, h, w = images_uint8.shape
    draw = {"generator": generator, "device": generator.device}
    dy = torch.randint(0, 2 * padding + 1, (b,), **draw).to(images_uint8.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), **draw).to(images_uint8.device)
    flip = (torch.rand(b, **draw) < 0.5).to(images_uint8.device)
    # Pad before normalising: the padding is black pixels, as with torchvision's RandomCrop.
    padded = F.pad(images_uint8, (padding, padding, padding, padding))
    rows = dy[:, None] + torch.arange(h, device=dy.device)
    cols = torch.arange(w, device=dx.device).expand(b, w)
    cols = dx[:, None] + torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=dy.device)[:, None, None]
    # Advanced indexing on (B, H, W, C) picks each image's own crop and flip in one gather.
    crops = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    # Back to (B, C, H, W) in memory too: the gather leaves the channels last, and the
    # network would run channels-last from there on, where oneDNN's bfloat16 weight gradient
    # of a dilated depthwise convolution is wrong (torch 2.11 and 2.14 on the CPU; measured
    # on one 2×4×32×32 batch: off by 47 %, and inf or NaN inside the tiny CNN).
    return normalize(crops.permute(0, 3, 1, 2).contiguous(), dtype=dtype)


def _check_images(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected uint8 images of shape (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )


def _decode(path: str) -> Tensor:
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except OSError as e:
        raise DataError(f"{path}: cannot decode image ({e}); replace the file") from e
    if rgb.size != (_SIZE, _SIZE):
        raise DataError(f"{path}: image is {rgb.size[0]}x{rgb.size[1]}, expected 32x32")
    return (
        torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        .view(_SIZE, _SIZE, 3)
        .permute(2, 0, 1)
    )


def _source_in(folder: Path) -> str | None:
    """Which kind of CIFAR-10 data ``folder`` holds, in order of preference, or None."""
    if (folder / "train").is_dir() or (folder / "test").is_dir():
        return "tree"
    if (folder / TARBALL).is_file():
        return "tarball"
    if (folder / BINARY).is_dir():
        return "binary"
    return None


def _load_explicit(root: Path, train: bool) -> CIFAR10Split:
    if root.is_file():
        return _load_tarball(root, train)
    if not root.is_dir():
        raise DataError(f"{root}: no such file or directory; pass --data a folder with {_WHAT}")
    # Accept the folder holding the data, or a parent holding a cifar10/ folder.
    for folder in (root, root / "cifar10"):
        if _source_in(folder) is not None:
            return _load_from(folder, train)
    raise DataError(f"{root}: no CIFAR-10 here or in {root / 'cifar10'}; expected {_WHAT}")


def _load_from(folder: Path, train: bool) -> CIFAR10Split:
    kind = _source_in(folder)
    if kind == "tree":
        return _load_tree(folder, train)
    if kind == "tarball":
        return _load_tarball(folder / TARBALL, train)
    return _load_binary(folder, train)


def _load_tarball(archive: Path, train: bool) -> CIFAR10Split:
    if not archive.name.endswith((".tar.gz", ".tgz", ".tar")):
        raise DataError(f"{archive}: not a .tar.gz archive; pass --data a folder with {_WHAT}")
    digest = _files.file_digest(archive, "sha256")
    if archive.name == TARBALL and digest != TARBALL_SHA256:
        raise DataError(f"{archive}: sha256 mismatch (corrupt or not the CIFAR-10 JPEG tarball)")
    tree = _files.extract_tar_once(archive, _files.cache_dir() / _UNPACKED, f"sha256:{digest}")
    return _load_tree(tree, train)


def _load_tree(root: Path, train: bool) -> CIFAR10Split:
    # torchvision is imported here, not at the top, so PTB-only runs skip its ~2 s import.
    from torchvision.datasets import ImageFolder

    folder = root / ("train" if train else "test")
    if not folder.is_dir():
        raise DataError(f"{folder}: missing; expected {folder}/<class>/*.jpg for CIFAR-10")
    try:
        tree = ImageFolder(str(folder))
    except (OSError, RuntimeError) as e:
        raise DataError(f"{folder}: not a CIFAR-10 image tree ({e})") from e
    if tuple(tree.classes) != CLASSES:
        raise DataError(
            f"{folder}: class folders are {', '.join(tree.classes)}; expected {', '.join(CLASSES)}"
        )
    # The tree lists its images class by class, which would give the search's halves
    # (search_split: the first half trains the weights) disjoint classes. Interleaved — the
    # k-th image of each class in class order, then the (k+1)-th — every prefix holds the
    # classes in equal numbers (±1), as the binary batches' mixed order nearly does.
    seen = collections.Counter()
    rank = []
    for _, label in tree.samples:
        rank.append(seen[label])
        seen[label] += 1
    order = sorted(range(len(rank)), key=lambda i: (rank[i], tree.samples[i][1]))
    paths = [tree.samples[i][0] for i in order]
    labels = torch.tensor([tree.samples[i][1] for i in order], dtype=torch.int64)
    # Uninitialised until decoded; untouched pages of a large allocation cost no memory.
    images = torch.empty((len(paths), 3, _SIZE, _SIZE), dtype=torch.uint8)
    return CIFAR10Split(images, labels, paths)


def _load_binary(root: Path, train: bool) -> CIFAR10Split:
    from torchvision.datasets import CIFAR10

    try:
        dataset = CIFAR10(str(root), train=train, download=False)
    except RuntimeError as e:
        raise DataError(
            # Not torchvision's message: it advises download=True, which --data never does.
            f"{root / BINARY}: a file is missing or its md5 is not CIFAR-10's; "
            "delete it or pass --data DIR"
        ) from e
    return _binary_split(dataset)


def _binary_split(dataset: CIFAR10) -> CIFAR10Split:
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return CIFAR10Split(images, torch.tensor(dataset.targets, dtype=torch.int64))


def _download_binary(cache: Path, train: bool) -> CIFAR10Split:
    from torchvision.datasets import CIFAR10

    # Under the cache's lock, so processes started together (torchrun's ranks) take turns and
    # the later ones find the batches; unpacked beside them and moved into place whole, so a
    # process looking without the lock (load_cifar10's search) never sees half of them.
    with _files.cache_lock(cache):
        if (cache / BINARY).is_dir():
            with contextlib.suppress(DataError):
                return _load_binary(cache, train)
        # Our own download (timeout, atomic write, md5) of the archive torchvision expects;
        # the torchvision call below then finds it verified and only extracts it.
        archive = cache / CIFAR10.filename
        if not (archive.is_file() and _files.file_digest(archive, "md5") == CIFAR10.tgz_md5):
            try:
                _files.download(CIFAR10.url, archive, "md5", CIFAR10.tgz_md5)
            except _files.DownloadError as e:
                raise DataError(
                    f"could not download CIFAR-10 ({e}); put {TARBALL} or {BINARY} in {cache}"
                    " or pass --data DIR"
                ) from e
        with _files.staging_dir(cache / BINARY) as tmp:
            _files.extract_all(archive, tmp)
            _files.swap_into_place(tmp / BINARY, cache / BINARY)
        # The extracted batches are all later runs need.
        archive.unlink()
        return _load_binary(cache, train)
