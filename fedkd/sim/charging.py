"""Charge power of a device class over simulated time, integrated in closed form.

A class charges from up to three sources that add up: a constant trickle
(``recharge_power_w``), charging windows by hour of day (a phone on its
charger at night) and a solar panel whose power follows a half-sine from
sunrise to sunset. The hour of day is ``WorldSpec.start_hour`` plus the
simulated time. The energy over any span is exact (the antiderivative of each
source is known), so the world can let hours pass in one step.
"""
from __future__ import annotations

import math

from ..scenario import DeviceClassSpec

DAY_S = 86_400.0
HOUR_S = 3_600.0


class ChargeProfile:
    def __init__(self, spec: DeviceClassSpec, start_hour: float):
        self.constant_w = spec.recharge_power_w
        self.offset_s = start_hour * HOUR_S  # day clock at simulated time 0
        # Windows as (start, end, power) within one day; one past midnight is split in two.
        self.windows: list[tuple[float, float, float]] = []
        for w in spec.charging_windows:
            start, end = w.start_hour * HOUR_S, w.end_hour * HOUR_S
            if start < end:
                self.windows.append((start, end, w.power_w))
            else:
                self.windows += [(start, DAY_S, w.power_w), (0.0, end, w.power_w)]
        solar = spec.solar
        self.solar = None if solar is None else (solar.sunrise_hour * HOUR_S, solar.sunset_hour * HOUR_S, solar.peak_w)
        self._day_j = self._within_day(DAY_S)

    @property
    def varies(self) -> bool:
        """Whether power depends on the hour of day (else it is the constant trickle)."""
        return bool(self.windows) or self.solar is not None

    def power_w(self, t_s: float) -> float:
        x = (t_s + self.offset_s) % DAY_S
        power = self.constant_w + sum(p for a, b, p in self.windows if a <= x < b)
        if self.solar is not None:
            rise, set_, peak = self.solar
            if rise <= x <= set_:
                power += peak * math.sin(math.pi * (x - rise) / (set_ - rise))
        return power

    def energy_j(self, start_s: float, end_s: float) -> float:
        """Energy charged over simulated time [start_s, end_s]."""
        energy = self.constant_w * (end_s - start_s)
        if self.varies:
            energy += self._cumulative(end_s + self.offset_s) - self._cumulative(start_s + self.offset_s)
        return energy

    def breakpoints_s(self, start_s: float, end_s: float) -> list[float]:
        """Times in (start_s, end_s) where a window opens or closes, or the sun rises, peaks or sets.

        Between two of them net power is monotone, so clipping the battery to
        [0, capacity] at each of them keeps a full battery from "storing" charge
        for later.
        """
        edges = {e for a, b, _ in self.windows for e in (a, b)}
        if self.solar is not None:
            rise, set_, _ = self.solar
            edges |= {rise, (rise + set_) / 2, set_}
        out = []
        day = math.floor((start_s + self.offset_s) / DAY_S)
        while day * DAY_S - self.offset_s < end_s:
            out += [day * DAY_S + e - self.offset_s for e in edges]
            day += 1
        return sorted(t for t in set(out) if start_s < t < end_s)

    def net_sign_changes_s(self, idle_w: float, start_s: float, end_s: float) -> list[float]:
        """Times in (start_s, end_s) where charge power minus ``idle_w`` changes sign inside a
        span between two :meth:`breakpoints_s`.

        Between breakpoints net power is monotone, but a battery may still drain and then
        fill (the sun comes up past the idle draw) or fill and then drain: cut there too
        and the battery is monotone in each piece, so clipping it at [0, capacity] at the
        piece's ends is exact. Only the sun's half-sine can cross a constant level; the
        crossing is where peak * sin(pi (x - rise) / length) equals idle_w minus the rest.
        """
        if self.solar is None:
            return []
        rise, set_, peak = self.solar
        length = set_ - rise
        edges = [start_s, *self.breakpoints_s(start_s, end_s), end_s]
        out = []
        for a, b in zip(edges, edges[1:]):
            middle = (a + b) / 2
            day, x = divmod(middle + self.offset_s, DAY_S)
            windows_w = sum(p for lo, hi, p in self.windows if lo <= x < hi)
            level = (idle_w - self.constant_w - windows_w) / peak
            if 0 < level < 1:
                into = length / math.pi * math.asin(level)
                dawn, dusk = (day * DAY_S + x - self.offset_s for x in (rise + into, set_ - into))
                out += [t for t in (dawn, dusk) if a < t < b]
        return out

    def _cumulative(self, clock_s: float) -> float:
        # Energy of windows and sun from day-clock 0 to clock_s (constant trickle excluded).
        days, x = divmod(clock_s, DAY_S)
        return days * self._day_j + self._within_day(x)

    def _within_day(self, x: float) -> float:
        energy = sum(p * min(max(x - a, 0.0), b - a) for a, b, p in self.windows)
        if self.solar is not None:
            rise, set_, peak = self.solar
            length = set_ - rise
            into = min(max(x - rise, 0.0), length)
            energy += peak * length / math.pi * (1 - math.cos(math.pi * into / length))
        return energy
