"""Spare the weak devices: low batteries sit out, slow links and slow chips do less."""
from fedkd.allocator import Allocator, DevicePlan


class SparingAllocator(Allocator):
    """Low batteries sit out; slow uplinks send int8 logits; slow chips train one epoch."""

    def __init__(self, min_battery_j: float = 50.0, slow_uplink_bps: float = 1e5,
                 slow_compute_flops: float = 1e8):
        self.min_battery_j = min_battery_j
        self.slow_uplink_bps = slow_uplink_bps
        self.slow_compute_flops = slow_compute_flops

    def allocate(self, server_round, device_ids, telemetry):
        plans = {}
        for d in device_ids:
            plans[d] = DevicePlan(
                take_part=bool(telemetry.battery_j[d] >= self.min_battery_j),
                codec="int8" if telemetry.uplink_bps[d] < self.slow_uplink_bps else "fp32",
                local_epochs=1 if telemetry.compute_flops[d] < self.slow_compute_flops else None,
            )
        return plans
