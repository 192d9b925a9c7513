"""The device catalogue: named hardware profiles and link profiles, every figure
with its source (the figures themselves: :mod:`fedkd.sim.catalogue_data`).

A scenario's device class says ``profile: raspberry_pi_4`` and / or
``link: lte_m``; the catalogue fills in the class keys it has figures for
(:data:`PROFILE_FIELDS`, :data:`LINK_FIELDS`) and keys the class gives itself
win. ``fedkd devices`` lists the catalogue with its sources.

This module imports no numpy and nothing of the simulator: the scenario loader
calls it while validating a file.
"""
from __future__ import annotations

import argparse
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The device class keys each kind of entry fills in.
PROFILE_FIELDS = ("compute_flops", "energy_per_flop_j", "idle_power_w", "battery_j")
LINK_FIELDS = ("uplink_bps", "downlink_bps", "latency_s", "energy_per_byte_up_j", "energy_per_byte_down_j")
# Of those, the ones every entry must have (a mains-powered board has no battery).
REQUIRED = {"profile": ("compute_flops", "energy_per_flop_j", "idle_power_w"), "link": LINK_FIELDS}


class Figure(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    value: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    basis: Literal["nominal", "measured", "derived", "assumed"]
    source: Annotated[str, Field(min_length=1)]
    note: str = ""


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: Annotated[str, Field(min_length=1)]
    figures: dict[str, Figure]


class Catalogue(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: dict[str, Annotated[str, Field(min_length=1)]]
    profiles: dict[str, Entry]
    links: dict[str, Entry]

    @model_validator(mode="after")
    def _complete_and_cited(self) -> "Catalogue":
        for kind, entries in (("profile", self.profiles), ("link", self.links)):
            for name, entry in entries.items():
                missing = [f for f in REQUIRED[kind] if f not in entry.figures]
                if missing:
                    raise ValueError(f"{kind} {name!r} lacks {missing}")
                for figure_name, figure in entry.figures.items():
                    if figure.source not in self.sources:
                        raise ValueError(f"{kind} {name!r}, figure {figure_name!r}: unknown source "
                                         f"{figure.source!r}")
                    if figure.basis == "derived" and not figure.note:
                        raise ValueError(f"{kind} {name!r}, figure {figure_name!r}: a derived figure must say "
                                         "how (note)")
        return self


@lru_cache(maxsize=1)
def load_catalogue() -> Catalogue:
    from .catalogue_data import LINKS, PROFILES, SOURCES

    return Catalogue.model_validate({"sources": SOURCES, "profiles": PROFILES, "links": LINKS})


def known(kind: Literal["profile", "link"]) -> list[str]:
    catalogue = load_catalogue()
    return sorted(catalogue.profiles if kind == "profile" else catalogue.links)


def check_name(kind: Literal["profile", "link"], name: str) -> str:
    """``name`` if the catalogue has such a profile / link, else ValueError listing the known ones."""
    if name not in known(kind):
        raise ValueError(f"unknown {kind} {name!r}; the catalogue has {', '.join(known(kind))} "
                         "(`fedkd devices` lists them)")
    return name


def class_figures(profile: object = None, link: object = None) -> dict[str, float]:
    """Device class keys filled from a profile and a link (names the catalogue does not
    know are skipped: the class's own validation reports them under their key)."""
    catalogue = load_catalogue()
    out: dict[str, float] = {}
    for name, entries, fields in ((profile, catalogue.profiles, PROFILE_FIELDS),
                                  (link, catalogue.links, LINK_FIELDS)):
        if isinstance(name, str) and name in entries:
            figures = entries[name].figures
            out |= {f: figures[f].value for f in fields if f in figures}
    return out


def describe() -> str:
    """The whole catalogue as text: each entry, its figures (value, basis, source key, note), then the sources."""
    catalogue = load_catalogue()
    lines = []
    for title, entries, fills in (("Hardware profiles (device class key `profile:`)", catalogue.profiles,
                                   PROFILE_FIELDS),
                                  ("Link profiles (device class key `link:`)", catalogue.links, LINK_FIELDS)):
        lines += [title, "=" * len(title)]
        for name, entry in entries.items():
            lines.append(f"{name}: {entry.description}")
            for figure_name, f in entry.figures.items():
                mark = "*" if figure_name in fills else " "
                note = f"  {f.note}" if f.note else ""
                lines.append(f"  {mark} {figure_name:<24} {f.value:>12.4g}  {f.basis:<8} [{f.source}]{note}")
            lines.append("")
    lines += ["* fills the device class key of that name; the others are inputs of a derivation.", "",
              "Sources", "======="]
    lines += [f"[{key}] {text}" for key, text in catalogue.sources.items()]
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    """The ``fedkd devices`` subcommand."""
    parser = subparsers.add_parser("devices", help="list the device catalogue (hardware and link profiles) "
                                                   "with every figure's source")
    parser.set_defaults(func=lambda args: print(describe()) or 0)
