"""Real parking-space patches (free / occupied) from a local folder.

No parking imagery can be fetched from a package registry, so users point this
loader at a copy they downloaded themselves, in one of two published layouts:

- ``"cnrpark"`` -- CNRPark-EXT patches (http://cnrpark.it, Amato et al. 2017)::

      <root>/PATCHES/<WEATHER>/<date>/camera<N>/<file>.jpg
      <root>/LABELS/all.txt            (or LABELS/camera<N>.txt, one per camera)

  Label lines are ``<path relative to PATCHES> <label>`` with 0 = free and
  1 = occupied, e.g. ``SUNNY/2015-11-12/camera1/S_2015-11-12_07.09_C01_184.jpg 0``.
  A leading ``PATCHES/`` on the path is accepted too. When ``all.txt`` exists
  it alone is read (the per-camera files repeat its lines); ``train.txt`` /
  ``val.txt`` / ``test.txt`` are the authors' splits and are ignored because
  fedkd makes its own. Domain = camera.

- ``"pklot"`` -- PKLot segmented patches (Almeida et al. 2015)::

      <root>/<lot>/<weather>/<date>/Empty/*.jpg
      <root>/<lot>/<weather>/<date>/Occupied/*.jpg

  ``root`` may also be the folder holding ``PKLotSegmented/``. Domain = lot
  (PUCPR, UFPR04, UFPR05 in the original).

Check each dataset's own licence before redistributing anything derived from it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from fedkd.data.base import SPLIT_NAMES, Dataset, ModalitySpec, Split, SplitName
from fedkd.data.splits import check_fractions, stratified_split_indices
from fedkd.errors import FedkdError
from fedkd.seeding import rng_for

Layout = Literal["cnrpark", "pklot"]
LAYOUTS: tuple[Layout, ...] = ("cnrpark", "pklot")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
PKLOT_CLASS_DIRS = {"Empty": 0, "Occupied": 1}
_CAMERA_DIR = re.compile(r"^camera(\d+)$", re.IGNORECASE)

EXPECTED_CNRPARK = "PATCHES/<WEATHER>/<date>/camera<N>/*.jpg with LABELS/all.txt or LABELS/camera<N>.txt"
EXPECTED_PKLOT = "<lot>/<weather>/<date>/Empty|Occupied/*.jpg"


@dataclass(frozen=True)
class PatchIndex:
    """Every patch found on disk: file, label (0 free, 1 occupied), dense domain index."""

    paths: tuple[Path, ...]
    labels: np.ndarray  # int64
    domains: np.ndarray  # int64, index into domain_names
    domain_names: tuple[str, ...]


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _pklot_images(root: Path) -> list[tuple[Path, int]]:
    """(file, label) for every image exactly at <lot>/<weather>/<date>/<Empty|Occupied>/."""
    found = []
    for class_dir, label in PKLOT_CLASS_DIRS.items():
        found += [(p, label) for p in root.glob(f"*/*/*/{class_dir}/*") if p.is_file() and _is_image(p)]
    return found


def detect_layout(root: Path) -> Layout:
    """Which layout ``root`` holds; a FedkdError naming the path if neither."""
    if (root / "PATCHES").is_dir() and (root / "LABELS").is_dir():
        return "cnrpark"
    if _pklot_images(_pklot_root(root)):
        return "pklot"
    raise FedkdError(
        f"{root}: neither a CNRPark-EXT patch folder ({EXPECTED_CNRPARK}) "
        f"nor a PKLot segmented folder ({EXPECTED_PKLOT})"
    )


def _pklot_root(root: Path) -> Path:
    # The PKLot archive unpacks to PKLot/{PKLot,PKLotSegmented}; accept its top folder too.
    nested = root / "PKLotSegmented"
    return nested if nested.is_dir() else root


def _dense_domains(names: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Domain names to indices 0..D-1 (sorted naturally: camera2 before camera10)."""
    def natural(name: str) -> tuple:
        return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))

    domain_names = tuple(sorted(set(names), key=natural))
    lookup = {n: i for i, n in enumerate(domain_names)}
    return np.array([lookup[n] for n in names], dtype=np.int64), domain_names


def index_cnrpark(root: Path) -> PatchIndex:
    """Read CNRPark-EXT label files; every listed patch must exist on disk."""
    labels_dir, patches_dir = root / "LABELS", root / "PATCHES"
    label_files = [labels_dir / "all.txt"] if (labels_dir / "all.txt").is_file() else sorted(
        p for p in labels_dir.glob("*.txt") if _CAMERA_DIR.match(p.stem)
    )
    if not label_files:
        raise FedkdError(f"{labels_dir}: no label file; expected LABELS/all.txt or LABELS/camera<N>.txt")
    label_of: dict[str, int] = {}
    for label_file in label_files:
        for line_no, line in enumerate(label_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.rsplit(maxsplit=1)
            if len(fields) != 2 or fields[1] not in ("0", "1"):
                raise FedkdError(
                    f"{label_file}:{line_no}: expected '<path relative to PATCHES> <0|1>', got {line.strip()!r}"
                )
            rel = fields[0].removeprefix("PATCHES/")
            if label_of.setdefault(rel, int(fields[1])) != int(fields[1]):
                raise FedkdError(f"{label_file}:{line_no}: {rel} is labelled both 0 and 1")
    if not label_of:
        raise FedkdError(f"{labels_dir}: label files list no patches; expected lines '<path> <0|1>'")

    rels = sorted(label_of)
    missing = [r for r in rels if not (patches_dir / r).is_file()]
    if missing:
        raise FedkdError(f"{patches_dir}: {len(missing)} labelled patches missing on disk (first: {missing[0]})")
    cameras = []
    for rel in rels:
        camera = next((part for part in Path(rel).parts if _CAMERA_DIR.match(part)), None)
        if camera is None:
            raise FedkdError(f"{patches_dir / rel}: no camera<N> folder in its path; expected {EXPECTED_CNRPARK}")
        cameras.append(camera.lower())
    domains, domain_names = _dense_domains(cameras)
    return PatchIndex(
        paths=tuple(patches_dir / r for r in rels),
        labels=np.array([label_of[r] for r in rels], dtype=np.int64),
        domains=domains,
        domain_names=domain_names,
    )


def index_pklot(root: Path) -> PatchIndex:
    """Walk PKLot segmented folders; label from Empty/Occupied, domain from the lot folder."""
    base = _pklot_root(root)
    found = sorted(_pklot_images(base))
    if not found:
        raise FedkdError(f"{root}: no PKLot segmented patches; expected {EXPECTED_PKLOT}")
    domains, domain_names = _dense_domains([p.relative_to(base).parts[0] for p, _ in found])
    return PatchIndex(
        paths=tuple(p for p, _ in found),
        labels=np.array([label for _, label in found], dtype=np.int64),
        domains=domains,
        domain_names=domain_names,
    )


def read_patch(path: Path, image_size: int) -> np.ndarray:
    """One patch as ``(image_size, image_size)`` float32 grayscale in [0, 1]."""
    try:
        with Image.open(path) as img:
            # JPEG draft decoding shrinks by a power of two while decoding:
            # a large speed-up on 150x150 patches, still above the target size.
            img.draft("L", (image_size, image_size))
            small = img.convert("L").resize((image_size, image_size), Image.Resampling.BOX)
    except OSError as exc:
        raise FedkdError(f"{path}: unreadable image ({exc})") from exc
    return np.asarray(small, dtype=np.float32) / 255.0


class PatchFolderDataset(Dataset):
    """Parking patches from a local CNRPark-EXT or PKLot segmented folder.

    One modality, ``camera``: grayscale ``(1, image_size, image_size)`` in
    [0, 1]. Labels: 0 = free, 1 = occupied. ``domains`` = camera (CNRPark) or
    lot (PKLot), as dense indices into ``meta["domain_names"]``.

    The folder is indexed (and validated) in the constructor, so a wrong path
    fails at once; images are decoded once, on the first ``split()`` call.
    Splits are stratified by (domain, class), hence also by class, so every
    camera or lot shows up in train, test and public.

    ``max_per_domain_class`` keeps a seeded random subset of that many patches
    per (domain, class): full PKLot has ~700k patches, more than a simulation
    round needs or memory comfortably holds.
    """

    name = "patch_folders"
    classes = ("free", "occupied")

    def __init__(
        self,
        root: str | Path,
        layout: Layout | None = None,
        seed: int = 0,
        image_size: int = 16,
        test_fraction: float = 0.2,
        public_fraction: float = 0.2,
        max_per_domain_class: int | None = None,
    ) -> None:
        self.root = Path(root)
        if layout is not None and layout not in LAYOUTS:
            raise FedkdError(f"layout={layout!r}: expected one of {LAYOUTS} or None to auto-detect")
        if image_size < 1:
            raise FedkdError(f"image_size={image_size}: expected a positive number of pixels")
        if max_per_domain_class is not None and max_per_domain_class < 1:
            raise FedkdError(f"max_per_domain_class={max_per_domain_class}: expected a positive count or None")
        check_fractions(test_fraction, public_fraction)
        if not self.root.exists():
            raise FedkdError(f"{self.root}: no such folder; expected a CNRPark-EXT or PKLot segmented patch folder")
        if not self.root.is_dir():
            raise FedkdError(f"{self.root}: not a folder; expected a CNRPark-EXT or PKLot segmented patch folder")
        if next(self.root.iterdir(), None) is None:
            raise FedkdError(f"{self.root}: folder is empty; expected {EXPECTED_CNRPARK} or {EXPECTED_PKLOT}")

        self.layout: Layout = layout or detect_layout(self.root)
        self.seed = seed
        self.image_size = image_size
        self.test_fraction = test_fraction
        self.public_fraction = public_fraction
        self.modalities = (ModalitySpec("camera", (1, image_size, image_size), "image"),)
        if self.layout == "cnrpark":
            if not (self.root / "PATCHES").is_dir() or not (self.root / "LABELS").is_dir():
                raise FedkdError(f"{self.root}: not a CNRPark-EXT patch folder; expected {EXPECTED_CNRPARK}")
            index = index_cnrpark(self.root)
        else:
            index = index_pklot(self.root)
        self.index = self._subsample(index, max_per_domain_class)
        self._members = stratified_split_indices(
            self.index.domains * len(self.classes) + self.index.labels,
            test_fraction, public_fraction, seed, self.name, self.layout,
        )
        self._splits: dict[SplitName, Split] | None = None  # filled on first split()

    @property
    def domain_names(self) -> tuple[str, ...]:
        return self.index.domain_names

    def split(self, which: SplitName) -> Split:
        if which not in SPLIT_NAMES:
            raise KeyError(f"unknown split {which!r}; expected one of {SPLIT_NAMES}")
        if self._splits is None:
            self._splits = self._read_all()
        return self._splits[which]

    def source_paths(self, which: SplitName) -> tuple[Path, ...]:
        """File behind each sample of a split, in split order (for provenance and tests)."""
        return tuple(self.index.paths[i] for i in self._members[which])

    def _subsample(self, index: PatchIndex, cap: int | None) -> PatchIndex:
        if cap is None:
            return index
        keep = []
        for domain in np.unique(index.domains):
            for label in np.unique(index.labels):
                group = np.flatnonzero((index.domains == domain) & (index.labels == label))
                rng = rng_for(self.seed, self.name, self.layout, "subsample", domain.item(), label.item())
                keep.append(rng.permutation(group)[:cap])
        kept = np.sort(np.concatenate(keep))
        return PatchIndex(
            paths=tuple(index.paths[i] for i in kept),
            labels=index.labels[kept],
            domains=index.domains[kept],
            domain_names=index.domain_names,
        )

    def _read_all(self) -> dict[SplitName, Split]:
        pixels = np.stack([read_patch(p, self.image_size) for p in self.index.paths])[:, None]
        meta = {"layout": self.layout, "root": str(self.root), "domain_names": self.index.domain_names}
        return {
            which: Split(
                inputs={"camera": pixels[idx]},
                labels=self.index.labels[idx],
                domains=self.index.domains[idx],
                meta={**meta, "split": which},
            )
            for which, idx in self._members.items()
        }
