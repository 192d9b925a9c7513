"""``fedkd data SCENARIO``: see how a scenario deals its data out to devices.

Writes, into ``results/<name>/data/`` unless told otherwise:

- ``labels.png``: per-device label histograms (stacked bars) of the first N devices;
- ``modality_mix.png``: devices per modality set, by device class, over a
  larger sample of devices (a mix is a set of shares, so it needs more than N
  devices to show);
- ``device_labels.csv``: per-device class counts, domain and modalities;
- ``modality_mix.csv``: the counts behind ``modality_mix.png``.

Shards are computed exactly as a simulation computes them (the same
:class:`fedkd.context.SimulationContext`), device by device, so a
population of a million devices costs only the devices shown.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .arguments import positive_int

if TYPE_CHECKING:  # pandas is imported where used: `fedkd --help` should not pay for it
    import pandas as pd

DEFAULT_DEVICES = 20
MIX_SAMPLE_DEVICES = 1000  # enough for a 1 % share to show as about ten devices
LABEL_PREFIX = "class_"


def device_table(ctx, device_ids: np.ndarray) -> pd.DataFrame:
    """One row per device: class, domain, modalities, shard size and count per label."""
    import pandas as pd

    labels = ctx.dataset.split("train").labels
    classes = ctx.dataset.classes
    rows = []
    for device_id in map(int, device_ids):
        shard = ctx.partitioner.shard(device_id)
        counts = np.bincount(labels[shard.indices], minlength=len(classes))
        rows.append({"device_id": device_id,
                     "device_class": ctx.population.class_of(device_id).name,
                     "domain": "" if shard.domain is None else shard.domain,
                     "modalities": "+".join(ctx.modalities_of(device_id)),
                     "samples": int(counts.sum()),
                     **{f"{LABEL_PREFIX}{c}": int(n) for c, n in zip(classes, counts)}})
    return pd.DataFrame(rows)


def modality_mix_table(ctx, device_ids: np.ndarray) -> pd.DataFrame:
    """Devices per (modality set, device class) among ``device_ids``; computes no shard."""
    import pandas as pd

    rows = [{"modalities": "+".join(ctx.modalities_of(i)), "device_class": ctx.population.class_of(i).name}
            for i in map(int, device_ids)]
    counts = pd.DataFrame(rows).value_counts().rename("devices").reset_index()
    return counts.sort_values(["modalities", "device_class"], ignore_index=True)


def label_figure(table: pd.DataFrame, classes: tuple[str, ...], title: str) -> bytes:
    import matplotlib
    from matplotlib.figure import Figure  # a bare Figure: no pyplot, no global figure registry

    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    fig = Figure(figsize=(max(6.0, 0.35 * len(table) + 3.0), 4.8), dpi=100)
    ax = fig.subplots()
    x = np.arange(len(table))
    bottom = np.zeros(len(table))
    for k, name in enumerate(classes):
        counts = table[f"{LABEL_PREFIX}{name}"].to_numpy()
        ax.bar(x, counts, bottom=bottom, color=cmap(k % cmap.N), label=name, width=0.8)
        bottom += counts
    ax.set_xticks(x, [f"{d} {m}" for d, m in zip(table["device_id"], table["modalities"])],
                  rotation=90, fontsize=8)
    ax.set_xlabel("device id and modalities")
    ax.set_ylabel("train samples")
    ax.set_title(title, fontsize=10)
    ax.legend(title="label", fontsize=8, bbox_to_anchor=(1.01, 1.0), loc="upper left")
    fig.tight_layout()
    from .report import png_bytes

    return png_bytes(fig)


def mix_figure(mix: pd.DataFrame, title: str) -> bytes:
    import matplotlib
    from matplotlib.figure import Figure

    wide = mix.pivot_table(index="modalities", columns="device_class", values="devices", fill_value=0)
    cmap = matplotlib.colormaps["Set2"]
    fig = Figure(figsize=(6.5, 4.2), dpi=100)
    ax = fig.subplots()
    x = np.arange(len(wide))
    bottom = np.zeros(len(wide))
    for k, device_class in enumerate(wide.columns):
        counts = wide[device_class].to_numpy()
        ax.bar(x, counts, bottom=bottom, color=cmap(k % cmap.N), label=device_class, width=0.7)
        bottom += counts
    for xi, total in zip(x, bottom):
        ax.annotate(f"{total / bottom.sum():.0%}", (xi, total), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, bottom.max() * 1.12)  # room for the percentages above the bars
    ax.set_xticks(x, list(wide.index))
    ax.set_ylabel("devices")
    ax.set_title(title, fontsize=10)
    ax.legend(title="device class", fontsize=8)
    fig.tight_layout()
    from .report import png_bytes

    return png_bytes(fig)


@dataclass(frozen=True)
class DataView:
    devices: pd.DataFrame  # one row per device shown: see device_table
    modality_mix: pd.DataFrame  # see modality_mix_table
    files: list[Path]


def write_data_view(scenario, out_dir: Path, num_devices: int = DEFAULT_DEVICES,
                    mix_devices: int = MIX_SAMPLE_DEVICES) -> DataView:
    """Compute the first ``num_devices`` shards and the modality mix; write the files atomically."""
    from .report import atomic_write_bytes
    from .context import SimulationContext

    ctx = SimulationContext(scenario)
    population = scenario.population.devices
    table = device_table(ctx, np.arange(min(num_devices, population)))
    mix = modality_mix_table(ctx, np.arange(min(max(mix_devices, num_devices), population)))
    spec = scenario.data.partition
    alpha = "IID" if spec.label_alpha is None else f"alpha={spec.label_alpha:g}"
    mode = "disjoint" if spec.disjoint else "drawn per device"
    files = {
        "labels.png": label_figure(table, ctx.dataset.classes,
                                   f"{scenario.name}: labels of the first {len(table)} of {population:,} devices "
                                   f"({alpha}, sigma={spec.quantity_sigma:g}, {mode})"),
        "modality_mix.png": mix_figure(mix, f"{scenario.name}: modality sets of {int(mix['devices'].sum()):,} "
                                            f"of {population:,} devices"),
        "device_labels.csv": table.to_csv(index=False).encode(),
        "modality_mix.csv": mix.to_csv(index=False).encode(),
    }
    for name, payload in files.items():
        atomic_write_bytes(out_dir / name, payload)
    return DataView(table, mix, [out_dir / name for name in files])


def cmd_data(args) -> int:
    from .errors import FedkdError
    from .checks import load_scenario

    scenario = load_scenario(args.scenario)
    out_dir = Path(args.out) if args.out else Path("results") / scenario.name / "data"
    if out_dir.exists() and not out_dir.is_dir():
        raise FedkdError(f"--out {out_dir} exists and is not a folder")
    view = write_data_view(scenario, out_dir, args.devices)
    counts = view.devices.filter(like=LABEL_PREFIX)
    print(f"{scenario.name}: the first {len(counts)} devices hold {view.devices['samples'].mean():.1f} samples "
          f"and {(counts > 0).sum(axis=1).mean():.1f} of {counts.shape[1]} labels on average")
    print(f"data view in {out_dir}/ ({', '.join(p.name for p in view.files)})")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data", help="plot how a scenario deals its data: per-device labels and the modality mix")
    parser.add_argument("scenario", help="scenario YAML file")
    parser.add_argument("--out", help="folder (default: results/<scenario name>/data/)")
    parser.add_argument("--devices", type=positive_int, default=DEFAULT_DEVICES,
                        help=f"devices whose label histograms to show (default {DEFAULT_DEVICES})")
    parser.set_defaults(func=cmd_data)


