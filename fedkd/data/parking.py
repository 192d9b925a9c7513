"""A SYNTHETIC parking-stall world: camera patches paired with an occupancy sensor.

Why synthetic: no real parking imagery (CNRPark-EXT, PKLot) is available offline,
yet the simulator needs a task with (a) a per-camera domain shift like the one
between CNRPark-EXT cameras C1-C9, and (b) two paired modalities that make
*different* mistakes, so that cross-modal distillation has something to transfer.
Nothing here is measured data: every pixel and reading is drawn from the simple
generative model below.

One sample is one stall at one moment, label ``free`` (0) or ``occupied`` (1):

- ``camera`` (1, S, S) in [0, 1]: a grayscale patch. Occupied stalls show a
  car-like blob (body, dark glass, shadow); free stalls show asphalt, painted
  lines and look-alikes (oil stains, shadows, puddles, litter). Each camera has
  a fixed viewpoint (rotation, shear, zoom, perspective, crop offset), gain,
  black level, noise, street-lamp level and occluder (none / pole / tree).
  Per sample: hour of day (night is dark and noisy, headlights), weather
  (sunny glare, overcast, rain streaks, fog haze).
- ``sensor`` (2, T): an in-ground sensor over the T steps ending at the camera's
  moment. Channel 0 ``mag_dev``: magnetometer deviation from its calibrated
  baseline (about 1 for a typical car). Channel 1 ``distance_m``: ultrasonic
  distance upwards; ``MAX_RANGE_M`` means "no echo". Its failure modes are its
  own: neighbouring or passing cars, low-metal cars, high clearance (no echo),
  a blocked transducer, temperature offset and drift, and an arrival/departure
  inside the window (the label is the state at the END of the window).

Camera hard cases (night, fog, occlusion, dark cars, look-alikes) are drawn
independently of sensor hard cases; only a neighbouring car is shared (the
sensor feels it, the camera sees it at the patch edge at most).

Laziness: sample ``i`` of a split is a pure function of (seed, split, i), not
of split sizes. Samples are drawn in blocks of ``BLOCK`` consecutive indices,
so any subset costs only the blocks it touches. The camera id of sample ``i`` is
a hash of (seed, split, i) (see :meth:`ParkingWorld.sample_domain`), so a
partitioner can find one camera's samples without generating anything.
"""
from __future__ import annotations

import numpy as np

from fedkd.data.base import Dataset, ModalitySpec, Split, SplitName, SPLIT_NAMES
from fedkd.errors import FedkdError
from fedkd.seeding import derive_seed, rng_for

BLOCK = 512
WEATHERS = ("sunny", "overcast", "rain", "fog")
SENSOR_CHANNELS = ("mag_dev", "distance_m")
MAX_RANGE_M = 2.0
OCCLUDERS = ("none", "pole", "tree")


def _sig(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _box(u, v, cu, cv, hu, hv, soft: float = 0.06) -> np.ndarray:
    """Soft-edged rectangle mask centred at (cu, cv) with half sizes (hu, hv)."""
    return _sig((hu - np.abs(u - cu)) / soft) * _sig((hv - np.abs(v - cv)) / soft)


def _blob(u, v, cu, cv, r) -> np.ndarray:
    return np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / (2.0 * r**2))


def _hash_uniform(key: int, idx: np.ndarray) -> np.ndarray:
    """splitmix64 of (key, idx) mapped to [0, 1): a per-index uniform with no RNG state."""
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (idx.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


class ParkingWorld(Dataset):
    """Seeded synthetic parking world; ``domains`` holds the camera id of each sample.

    ``difficulty`` scales noise levels and hard-case rates (0: clean, sensor
    trivially separable; 1: tuned so tiny models reach roughly 80-90% per
    modality). ``cameras`` holds each camera's fixed installation; cameras see
    unequal shares of the samples.
    """

    name = "parking"
    classes = ("free", "occupied")

    def __init__(self, seed: int = 0, num_cameras: int = 6, patch_px: int = 16, sensor_steps: int = 32,
                 train_size: int = 6000, test_size: int = 1000, public_size: int = 1000,
                 occupancy_rate: float = 0.5, difficulty: float = 1.0) -> None:
        # Messages start with "option=value" so the scenario loader can name the key.
        for option, value, least in (("num_cameras", num_cameras, 1), ("patch_px", patch_px, 4),
                                     ("sensor_steps", sensor_steps, 4), ("train_size", train_size, 0),
                                     ("test_size", test_size, 0), ("public_size", public_size, 0)):
            if value < least:
                raise FedkdError(f"{option}={value}: expected {least} or more")
        if not 0.0 <= occupancy_rate <= 1.0:
            raise FedkdError(f"occupancy_rate={occupancy_rate}: expected a fraction in [0, 1]")
        if difficulty < 0.0:
            raise FedkdError(f"difficulty={difficulty}: expected 0 or more")
        self.seed, self.num_cameras, self.patch_px, self.sensor_steps = seed, num_cameras, patch_px, sensor_steps
        self.occupancy_rate, self.difficulty = occupancy_rate, difficulty
        self.sizes: dict[str, int] = {"train": train_size, "test": test_size, "public": public_size}
        self.modalities = (ModalitySpec("camera", (1, patch_px, patch_px), "image"),
                           ModalitySpec("sensor", (len(SENSOR_CHANNELS), sensor_steps), "series"))
        self._cache: dict[str, Split] = {}
        # Fixed per-camera installation, one entry per camera (units: rad, patch half-widths).
        rng, k = rng_for(seed, "parking", "cameras"), num_cameras
        self.cameras: dict[str, np.ndarray] = {
            "share": np.cumsum(rng.dirichlet(np.full(k, 4.0))),  # cumulative; cameras see unequal traffic
            "rot_rad": rng.uniform(-0.5, 0.5, k), "shear": rng.uniform(-0.4, 0.4, k),
            "zoom": rng.uniform(0.9, 1.4, k), "persp": rng.uniform(-0.4, 0.4, k),
            "crop_u": rng.uniform(-0.3, 0.3, k), "crop_v": rng.uniform(-0.3, 0.3, k),
            "gain": rng.uniform(0.7, 1.3, k), "black": rng.uniform(0.0, 0.12, k),
            "noise": rng.uniform(0.01, 0.04, k), "lamp": rng.uniform(0.08, 0.4, k),
            "occluder": (np.arange(k) + rng.integers(3)) % 3,  # index into OCCLUDERS
            "occ_x": rng.uniform(-0.7, 0.7, k),
            "occ_y": rng.choice([-0.8, 0.8], k),
        }
        px = (np.arange(patch_px) + 0.5) / patch_px * 2.0 - 1.0
        self._y_px, self._x_px = np.meshgrid(px, px, indexing="ij")  # output-pixel coords in [-1, 1]

    # ---- public API --------------------------------------------------------------
    def split(self, which: SplitName) -> Split:
        if which not in self._cache:
            self._cache[which] = self.generate(which, np.arange(self._size(which)))
        return self._cache[which]

    def generate(self, split: SplitName, indices) -> Split:
        """The lazy primitive: samples ``indices`` of ``split``, identical to those rows of ``split(split)``."""
        out = self._gather(split, indices)
        meta = {"dataset": self.name, "split": split, "synthetic": True, "sensor_channels": SENSOR_CHANNELS}
        return Split(inputs={"camera": out["camera"], "sensor": out["sensor"]}, labels=out["label"],
                     domains=out["domain"], meta=meta)

    def sample_domain(self, split: SplitName, indices) -> np.ndarray:
        """Camera id of each index: a hash of (seed, split, i); costs no sample generation."""
        idx = self._check(split, indices)
        return self._camera_of(split, idx)

    def camera_indices(self, split: SplitName, camera_id: int) -> np.ndarray:
        """All indices of ``split`` seen by camera ``camera_id``, ascending."""
        if not 0 <= camera_id < self.num_cameras:
            raise ValueError(f"camera_id {camera_id} not in [0, {self.num_cameras})")
        return np.flatnonzero(self._camera_of(split, np.arange(self._size(split))) == camera_id)

    def generate_for_camera(self, split: SplitName, camera_id: int) -> Split:
        """Every sample of ``split`` from one camera (indices: :meth:`camera_indices`)."""
        return self.generate(split, self.camera_indices(split, camera_id))

    def conditions(self, split: SplitName, indices) -> dict[str, np.ndarray]:
        """Hidden per-sample causes (hour, weather, hard-case flags) for analysis and tests, not for models."""
        out = self._gather(split, indices)
        return {k: v for k, v in out.items() if k not in ("camera", "sensor", "label", "domain")}

    # ---- generation ----------------------------------------------------------------
    def _size(self, split: str) -> int:
        if split not in SPLIT_NAMES:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLIT_NAMES}")
        return self.sizes[split]

    def _check(self, split: str, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        size = self._size(split)
        if idx.size and (idx.min() < 0 or idx.max() >= size):
            raise IndexError(f"indices must lie in [0, {size}) for split {split!r}")
        return idx

    def _camera_of(self, split: str, idx: np.ndarray) -> np.ndarray:
        u = _hash_uniform(derive_seed(self.seed, "parking", split, "camera"), idx)
        return np.minimum(np.searchsorted(self.cameras["share"], u, side="right"), self.num_cameras - 1)

    def _gather(self, split: str, indices) -> dict[str, np.ndarray]:
        idx = self._check(split, indices)
        out: dict[str, np.ndarray] = {}
        for b in np.unique(idx // BLOCK) if idx.size else [0]:
            rows = np.flatnonzero(idx // BLOCK == b)
            for key, arr in self._block(split, int(b)).items():
                if key not in out:
                    out[key] = np.empty((idx.size,) + arr.shape[1:], dtype=arr.dtype)
                out[key][rows] = arr[idx[rows] - b * BLOCK]
        return out

    def _block(self, split: str, block: int) -> dict[str, np.ndarray]:
        """All BLOCK samples starting at index block * BLOCK (independent of split size)."""
        n, d = BLOCK, self.difficulty
        cam = self._camera_of(split, block * BLOCK + np.arange(n))
        rng = rng_for(self.seed, "parking", split, block, "scene")
        occupied = rng.random(n) < self.occupancy_rate
        # Daytime is busier, so most snapshots are by day; hour in [0, 24).
        hour = np.where(rng.random(n) < 0.7, rng.uniform(7, 19, n), rng.uniform(19, 31, n) % 24)
        p_weather = np.array([0.45, 0.3, 0.15 * d, 0.1 * d])
        weather = rng.choice(4, n, p=p_weather / p_weather.sum())
        neighbour = rng.random(n) < 0.4  # car in the adjacent stall: shared by both modalities
        camera, cam_info = self._render(occupied, cam, hour, weather, neighbour,
                                        rng_for(self.seed, "parking", split, block, "camera"))
        sensor, sen_info = self._sense(occupied, neighbour, rng_for(self.seed, "parking", split, block, "sensor"))
        return {"camera": camera, "sensor": sensor, "label": occupied.astype(np.int64), "domain": cam,
                "hour": hour, "weather": weather, "neighbour": neighbour, **cam_info, **sen_info}

    def _render(self, occupied, cam, hour, weather, neighbour, rng) -> tuple[np.ndarray, dict]:
        n, S, d, c = len(cam), self.patch_px, self.difficulty, self.cameras
        col = lambda a: np.asarray(a, dtype=np.float64).reshape(n, 1, 1)  # noqa: E731 (per-sample scalar)
        uni = lambda lo, hi: rng.uniform(lo, hi, (n, 1, 1))  # noqa: E731
        flag = lambda p: col(rng.random(n) < np.minimum(p, 1.0))  # noqa: E731
        x, y = self._x_px, self._y_px
        # Viewpoint: output pixel -> stall coordinates (u across, v along the stall, stall = [-1, 1]^2).
        rot, zoom = col(c["rot_rad"][cam]) + rng.normal(0, 0.08, (n, 1, 1)), col(c["zoom"][cam]) * uni(0.9, 1.1)
        xs = x * (1.0 + col(c["persp"][cam]) * y) + col(c["shear"][cam]) * y  # far rows foreshortened
        u = zoom * (np.cos(rot) * xs - np.sin(rot) * y) + col(c["crop_u"][cam]) + rng.normal(0, 0.1, (n, 1, 1))
        v = zoom * (np.sin(rot) * xs + np.cos(rot) * y) + col(c["crop_v"][cam]) + rng.normal(0, 0.1, (n, 1, 1))
        # Scene reflectance: asphalt texture, painted stall lines, a neighbour's car at the side.
        scene = uni(0.3, 0.5) + 0.03 * rng.standard_normal((n, S, S))
        lines = np.maximum(_box(u, v, -0.93, 0, 0.05, 1.3), _box(u, v, 0.93, 0, 0.05, 1.3))
        scene += lines * (uni(0.45, 0.9) - scene)
        side = rng.choice([-1.0, 1.0], (n, 1, 1))
        neighbour_car = col(neighbour) * _box(u, v, 2.0 * side, uni(-0.2, 0.2), 0.75, 0.9)
        scene += neighbour_car * (rng.beta(0.6, 0.6, (n, 1, 1)) - scene)
        # Free-stall look-alikes (under a parked car they are hidden): stain, puddle, litter.
        scene -= flag(0.4) * uni(0.05, 0.2) * _blob(u, v, uni(-0.4, 0.4), uni(-0.5, 0.5), uni(0.15, 0.4))
        puddle = flag(0.1 * d + 0.3 * d * (weather == 2)) * _box(
            u, v, uni(-0.3, 0.3), uni(-0.4, 0.4), uni(0.2, 0.5), uni(0.2, 0.6), 0.15)
        scene += puddle * (uni(0.05, 0.2) + 0.5 * _blob(u, v, uni(-0.3, 0.3), uni(-0.3, 0.3), 0.12) - scene)
        litter = flag(0.08 * d) * _box(u, v, uni(-0.4, 0.4), uni(-0.5, 0.5), uni(0.15, 0.45), uni(0.2, 0.6))
        scene += litter * (uni(0.0, 1.0) - scene)
        # The car: body of random colour (many near-black or white), dark glass front/rear.
        cu, cv, hu, hv = rng.normal(0, 0.12, (n, 1, 1)), rng.normal(0, 0.15, (n, 1, 1)), uni(0.5, 0.72), uni(0.65, 0.95)
        body = col(occupied) * _box(u, v, cu, cv, hu, hv)
        facing = rng.choice([-1.0, 1.0], (n, 1, 1))  # nose-in or reversed in
        glass = body * np.maximum(_box(u, v, cu, cv - facing * 0.3 * hv, 0.85 * hu, 0.25 * hv, 0.04),
                                  _box(u, v, cu, cv + facing * 0.6 * hv, 0.8 * hu, 0.15 * hv, 0.04))
        # The dark gap under the car outlines it even when its paint matches the asphalt.
        scene *= 1.0 - 0.6 * col(occupied) * _box(u, v, cu, cv, hu + 0.18, hv + 0.15, 0.06)
        scene += body * (rng.beta(0.6, 0.6, (n, 1, 1)) - scene) + glass * (uni(0.03, 0.2) - scene)
        # Light: daylight from the hour, else the camera's street lamp; weather dims it.
        day = np.clip(np.sin(np.pi * (hour - 6.0) / 12.0), 0.0, 1.0) ** 0.6
        light = col(np.maximum(day, c["lamp"][cam]) * np.array([1.0, 0.8, 0.7, 0.85])[weather])
        sunny_day = col((weather == 0) & (day > 0.3))
        # Hard shadow (car's own or a tree's / neighbour's) darkens part of the patch on sunny days.
        shadow = _box(u, v, cu + uni(-0.4, 0.4), cv + uni(-0.4, 0.4), hu * uni(0.8, 1.4), hv * uni(0.6, 1.2), 0.1)
        scene *= 1.0 - shadow * sunny_day * uni(0.3, 0.6) * np.maximum(col(occupied), flag(0.2 * d))
        # Auto-exposure keeps mid-grey roughly in place but cannot restore contrast in dim light.
        contrast = np.sqrt(light) * np.array([1.0, 0.8, 0.75, 1.0])[weather].reshape(n, 1, 1)
        img = col(c["black"][cam]) + col(c["gain"][cam]) * ((0.25 + 0.15 * light) + contrast * (scene - 0.4))
        img += sunny_day * flag(0.3 * d) * uni(0.3, 0.7) * _blob(x, y, uni(-1, 1), uni(-1, 1), uni(0.3, 0.7))  # glare
        night = col(day < 0.2)
        for _ in range(2):  # headlights of passing cars at night
            img += night * flag(0.3 * d) * uni(0.5, 1.2) * _blob(x, y, uni(-1, 1), uni(-1, 1), uni(0.1, 0.3))
        slope, phase = uni(-0.4, 0.4), uni(0, 1)  # rain streaks: thin, slanted, broken
        streak = (np.cos(2 * np.pi * (3.0 * (x + slope * y) + phase)) > 0.8) * (rng.random((n, S, S)) < 0.6)
        img += col(weather == 2) * 0.15 * d * streak
        fog = col(weather == 3) * np.minimum(1.0, d) * uni(0.4, 0.75)
        img = img * (1.0 - fog) + fog * (0.3 + 0.4 * light)  # haze: contrast loss
        # Camera-fixed occluder in image coordinates: a pole or tree foliage.
        occ = c["occluder"][cam]
        pole = col(occ == 1) * _box(x, y, col(c["occ_x"][cam]) + uni(-0.05, 0.05), 0, uni(0.15, 0.22), 2.0, 0.05)
        tree = col(occ == 2) * (_blob(x, y, col(c["occ_x"][cam]), col(c["occ_y"][cam]), uni(0.5, 0.7)) > 0.4)
        tree = tree * (rng.random((n, S, S)) < 0.85)  # leaves with holes
        occluder = np.maximum(pole, tree)
        img += occluder * (light * uni(0.1, 0.3) - img)
        sigma = col(c["noise"][cam]) * d * (1.0 + 2.0 * (1.0 - light))  # night: high gain, high noise
        img += sigma * rng.standard_normal((n, S, S))
        camera = np.clip(img, 0.0, 1.0).astype(np.float32)[:, None]
        return camera, {"night": night.reshape(n) > 0, "occluded_frac": occluder.mean(axis=(1, 2))}

    def _sense(self, occupied, neighbour, rng) -> tuple[np.ndarray, dict]:
        n, T, d = len(occupied), self.sensor_steps, self.difficulty
        t_step = np.arange(T)
        flag = lambda p: rng.random(n) < np.minimum(p, 1.0)  # noqa: E731
        # An arrival/departure inside the window; the label is the state at the end.
        change, t_change = flag(0.3 * d), rng.integers(T // 2, T, n)
        state = np.where(change[:, None] & (t_step < t_change[:, None]), ~occupied[:, None], occupied[:, None])
        lagged = np.empty((n, T))  # both sensors settle over a few steps
        lagged[:, 0] = state[:, 0]
        for t in range(1, T):
            lagged[:, t] = 0.55 * lagged[:, t - 1] + 0.45 * state[:, t]
        low_metal, high = flag(0.4 * d), flag(0.35 * d)
        metal = np.where(low_metal, rng.uniform(0.1, 0.4, n), rng.lognormal(0.0, 0.25, n))
        clearance_m = np.where(high, rng.uniform(0.5, 0.9, n), rng.uniform(0.12, 0.3, n))
        # Magnetometer: temperature offset + drift + own car + neighbour's car + passing cars + noise.
        mag = rng.normal(0, 0.4 * d, (n, 1)) + rng.normal(0, 0.008 * d, (n, 1)) * (t_step + 1)
        mag += lagged * metal[:, None] + (neighbour * rng.uniform(0.3, 0.9, n))[:, None]
        passing = flag(0.4 * d)
        bump_t, bump_w = rng.uniform(0, T + 3, n), rng.uniform(1.0, 3.0, n)
        bump = np.exp(-0.5 * ((t_step - bump_t[:, None]) / bump_w[:, None]) ** 2)
        mag += (passing * rng.uniform(0.4, 1.2, n))[:, None] * bump
        mag += 0.1 * d * rng.standard_normal((n, T))
        # Ultrasonic: echo from the underbody (high clearance often gives none), else max range.
        p_drop = np.where(high, 0.9, 0.05)[:, None]
        echo = (lagged > 0.5) & (rng.random((n, T)) > p_drop)
        dist = np.where(echo, clearance_m[:, None], MAX_RANGE_M) + 0.03 * d * rng.standard_normal((n, T))
        # Blocked transducer (leaf, snow, debris, a cart): short spurious echoes from some step on.
        blocked, t_block = flag(0.3 * d), rng.integers(0, T - 2, n)
        dist = np.where(blocked[:, None] & (t_step >= t_block[:, None]),
                        rng.uniform(0.05, 0.5, (n, 1)) + 0.02 * rng.standard_normal((n, T)), dist)
        sensor = np.stack([mag, dist], axis=1).astype(np.float32)
        return sensor, {"change": change, "low_metal": low_metal, "high_clearance": high,
                        "passing": passing, "blocked": blocked}
