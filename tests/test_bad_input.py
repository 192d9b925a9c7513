"""Bad input through the command line, as a user meets it: exit code 2, one line
on stderr naming the file and the key, no traceback, nothing written.

Every case runs ``fedkd simulate`` in its own process; the processes start
together (a module fixture) so the cases cost about as much as the slowest.
"""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedkd.cli import error_line
from fedkd.errors import ScenarioError
from fedkd.checks import load_scenario

from .conftest import REPO, TINY


def _scenario(**changes) -> dict:
    scenario = copy.deepcopy(TINY)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = scenario
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[leaf] = value
    return scenario


def _alias_bomb() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    return "\n".join(lines) + "\n"


def _patch_folders_without_root() -> dict:
    scenario = copy.deepcopy(TINY)
    scenario["data"] = {"dataset": "patch_folders", "options": {"root": "no/such/patches"}}
    for device_class in scenario["population"]["classes"]:
        device_class.pop("modalities")
    return scenario


def _parking(**options) -> dict:
    scenario = copy.deepcopy(TINY)
    scenario["data"] = {"dataset": "parking", "options": options}
    for device_class in scenario["population"]["classes"]:
        device_class.pop("modalities")
    return scenario


# case -> (scenario: dict, YAML text, or None for no file; what the one line must contain)
CASES = {
    "malformed_yaml": ("name: x\nrounds: [1, 2\nseed: 3\n", "line 3, column 5: malformed YAML"),
    "unknown_key": (_scenario(population__classes__1__uplink_kbps=5),
                    "population.classes[1].uplink_kbps: unknown key"),
    "wrong_type": (_scenario(rounds="many"), "rounds: Input should be a valid integer"),
    "wrong_option_type": (_scenario(data__options__image_size="big"), "data.options.image_size: expected int"),
    "negative_bandwidth": (_scenario(population__classes__0__uplink_bps=-1e6),
                           "population.classes[0].uplink_bps: Input should be greater than 0"),
    "zero_devices": (_scenario(population__devices=0), "population.devices: Input should be greater than 0"),
    "more_disjoint_shards_than_samples": (
        _scenario(population__devices=2000, data__partition__disjoint=True, data__partition__min_samples=1),
        "data.partition.disjoint: disjoint shards need devices x min_samples <= train samples"),
    "missing_data_path": (_patch_folders_without_root(), "data.options.root: no/such/patches: no such folder"),
    "missing_scenario_file": (None, "file not found"),
    "wrong_param_type": (_scenario(strategies=[{"name": "fedprox", "params": {"proximal_mu": "strong"}}]),
                         "strategies[0].params: fedprox: proximal_mu expected float (got 'strong')"),
    "unknown_allocator": (_scenario(strategies=[{"name": "ra_cmkd", "params": {"allocator": "nope"}}]),
                          "strategies[0].params: ra_cmkd: unknown allocator 'nope'"),
    "wrong_option_value": (_scenario(data__options__image_size=5),
                           "data.options.image_size: image_size=5: expected a divisor of 28"),
    "wrong_parking_option_value": (_parking(num_cameras=-2),
                                   "data.options.num_cameras: num_cameras=-2: expected 1 or more"),
    "alias_bomb": (_alias_bomb(), "YAML aliases expand past"),
    "ray_address_without_port": (_scenario(backend={"kind": "ray", "address": "headnode"}),
                                 "backend.address: 'headnode': expected HOST:PORT of a Ray cluster's head"),
    # Port 1 on the loopback: nobody listens; Ray would retry it for minutes.
    "ray_address_where_nobody_listens": (_scenario(backend={"kind": "ray", "address": "127.0.0.1:1"}),
                                         "backend.address: 127.0.0.1:1: no Ray head answers there"),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[Path, Path, subprocess.CompletedProcess]]:
    """Every case's scenario file, results folder and finished process, started all at once."""
    root = tmp_path_factory.mktemp("bad_input")
    started = {}
    for name, (content, _) in CASES.items():
        path = root / f"{name}.yaml"
        if content is not None:
            path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
        out = root / f"{name}_results"
        proc = subprocess.Popen([sys.executable, "-m", "fedkd", "simulate", str(path), "--out", str(out)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started[name] = (path, out, proc)
    done = {}
    for name, (path, out, proc) in started.items():
        stdout, stderr = proc.communicate(timeout=120)
        done[name] = (path, out, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_naming_file_and_key(outcomes, case):
    path, out, proc = outcomes[case]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"fedkd: error: {path}: "), lines[0]
    assert CASES[case][1] in lines[0], lines[0]
    assert not out.exists()


def test_an_alias_bomb_is_refused_quickly(outcomes):
    # Prepare: the bomb's file from the fixture (10 levels of 10 aliases: 10^10 nodes expanded).
    path, out, _ = outcomes["alias_bomb"]
    # Execute: expanding it would take hours, so the timeout is the test of "quickly".
    proc = subprocess.run([sys.executable, "-m", "fedkd", "validate", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    # Assert
    assert proc.returncode == 2 and "expand past" in proc.stderr


def test_bad_input_leaves_an_existing_results_folder_as_it_was(tmp_path):
    # Prepare: a results folder from an earlier run, checkpoint included, and a bad scenario.
    out = tmp_path / "results"
    (out / ".checkpoint").mkdir(parents=True)
    files = {out / "rounds.csv": b"strategy,round\nfedavg,0\n", out / ".checkpoint" / "0-fedavg.pt": b"\x80\x02}q"}
    for file, data in files.items():
        file.write_bytes(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_scenario(population__devices=0)))
    # Execute
    for extra in ([], ["--resume"]):
        proc = subprocess.run([sys.executable, "-m", "fedkd", "simulate", str(path), "--out", str(out), *extra],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        # Assert
        assert proc.returncode == 2 and "population.devices" in proc.stderr
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == sorted(
            [Path(".checkpoint"), Path(".checkpoint/0-fedavg.pt"), Path("rounds.csv")])
        assert all(file.read_bytes() == data for file, data in files.items())


# -- any value anywhere: a clean ScenarioError or a valid scenario, never a crash -----------------

def _leaf_paths(node, prefix=()) -> list[tuple]:
    """Every key path of a scenario, down to its leaves (list items by index)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    paths = []
    for key, child in items:
        paths.append(prefix + (key,))
        paths += _leaf_paths(child, prefix + (key,))
    return paths


LEAF_PATHS = _leaf_paths(TINY) + [("data", "options", "audio_frames"), ("data", "options", "test_fraction")]
ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(LEAF_PATHS), value=ANY_VALUE)
def test_the_validator_names_the_file_for_any_value_at_any_key(tmp_path_factory, path, value):
    # Prepare: the tiny scenario with one key, at any depth, set to an arbitrary value.
    scenario = copy.deepcopy(TINY)
    node = scenario
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    file = tmp_path_factory.getbasetemp() / "any_value.yaml"
    file.write_text(yaml.safe_dump(scenario))
    # Execute / Assert: either it loads, or one line names the file (no other exception escapes).
    try:
        load_scenario(file)
    except ScenarioError as exc:
        assert str(exc).startswith(f"{file}: ") and "\n" not in error_line(exc)
