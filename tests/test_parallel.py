"""--jobs: (seed, strategy) runs side by side in worker processes give the same files."""
from __future__ import annotations

from fedkd.cli import main


def test_runs_in_worker_processes_equal_runs_one_by_one(write_scenario, tiny_scenario, tmp_path):
    # Prepare: two strategies, two seeds: four runs.
    path = write_scenario(tiny_scenario)
    one, two = tmp_path / "one", tmp_path / "two"
    # Execute
    assert main(["simulate", str(path), "--seeds", "0-1", "--jobs", "1", "--out", str(one)]) == 0
    assert main(["simulate", str(path), "--seeds", "0-1", "--jobs", "2", "--out", str(two)]) == 0
    # Assert: byte-identical tables (wall times live only in summary.json).
    for name in ("rounds.csv", "devices.csv"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_every_round_of_every_run_is_reported(tiny_scenario):
    # Prepare: FedAvg on two seeds: two runs of two rounds, side by side.
    import io

    from fedkd.parallel import RunTask, run_in_processes
    from fedkd.runner import for_seed
    from fedkd.scenario import parse_scenario

    scenario = parse_scenario(tiny_scenario, "tiny.yaml")
    tasks = [RunTask(for_seed(scenario, seed), 0, None) for seed in (0, 1)]
    seen: list[tuple[int, str, int, int]] = []

    class Pipe(io.StringIO):  # not a terminal: rounds go to the callbacks
        def isatty(self) -> bool:
            return False

    # Execute
    runs = run_in_processes(tasks, 2, lambda seed: lambda label, record, total: seen.append(
        (seed, label, record.round, total)), stream=Pipe())
    # Assert: each run's rounds 0 (the initial model's score), 1 and 2, in order within the run.
    for seed in (0, 1):
        assert [r for s, lab, r, _ in seen if (s, lab) == (seed, "fedavg")] == [0, 1, 2]
    assert len(seen) == 6 and {t for *_, t in seen} == {2}
    assert sorted(run.seed for run in runs) == [0, 1]


def test_runs_share_one_rich_display_on_a_terminal(tiny_scenario):
    import io

    from fedkd.parallel import RunTask, run_in_processes
    from fedkd.runner import for_seed
    from fedkd.scenario import parse_scenario

    scenario = parse_scenario(tiny_scenario, "tiny.yaml")
    tasks = [RunTask(for_seed(scenario, seed), 0, None) for seed in (0, 1)]
    called: list = []

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    run_in_processes(tasks, 2, lambda seed: lambda *args: called.append(args), stream=screen)
    text = screen.getvalue()
    assert "fedavg seed 0" in text and "fedavg seed 1" in text and "2/2" in text
    assert called == []  # the display replaces the one-line bars


def test_keep_state_with_runs_as_ray_tasks_is_refused_before_anything_runs(write_scenario, tiny_scenario,
                                                                         tmp_path, capsys):
    # Each Ray task keeps its devices' state on its own node: --keep-state cannot keep it.
    tiny_scenario["backend"] = {"kind": "ray"}
    out = tmp_path / "out"

    code = main(["simulate", str(write_scenario(tiny_scenario)), "--jobs", "2", "--keep-state", "--out", str(out)])

    [line] = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--keep-state with runs as Ray tasks" in line and "--jobs 1" in line
    assert not out.exists()


def test_a_ray_task_asks_for_a_gpu_only_when_the_scenario_trains_on_cuda():
    # A task that asks for a GPU gets one of its own from Ray (CUDA_VISIBLE_DEVICES); no GPU here to run it.
    from fedkd.ray_jobs import task_resources
    from fedkd.scenario import BackendSpec

    assert task_resources(BackendSpec(kind="ray")) == {"num_cpus": 1, "num_gpus": 0}
    assert task_resources(BackendSpec.model_construct(kind="ray", torch_device="cuda")) == {"num_cpus": 1,
                                                                                            "num_gpus": 1}
