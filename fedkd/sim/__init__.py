"""The simulated device world: population, dynamics, task timelines, the simulated grid."""
