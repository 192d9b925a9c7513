"""The device catalogue: every figure cited, derived figures consistent with their inputs,
classes filled from it, bad names refused in one line."""
from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError

from fedkd.cli import main
from fedkd.scenario import DeviceClassSpec
from fedkd.sim.catalogue import LINK_FIELDS, PROFILE_FIELDS, Catalogue, describe, load_catalogue
from fedkd.sim.catalogue_data import LINKS, PROFILES, SOURCES

from .conftest import TINY

ISSUE_PROFILES = {"raspberry_pi_4", "jetson_nano", "android_midrange", "esp32_s3", "nrf52840"}
ISSUE_LINKS = {"nb_iot", "lte_m", "lte_cat4", "wifi_n", "lora_sf7"}


def figure(kind: dict, entry: str, name: str) -> float:
    return kind[entry]["figures"][name]["value"]


def test_the_catalogue_has_the_entries_the_issue_asks_for():
    catalogue = load_catalogue()
    assert ISSUE_PROFILES <= set(catalogue.profiles)
    assert ISSUE_LINKS <= set(catalogue.links)


def test_every_figure_names_a_source_that_exists():
    catalogue = load_catalogue()
    for entries in (catalogue.profiles, catalogue.links):
        for entry in entries.values():
            for f in entry.figures.values():
                assert catalogue.sources[f.source]


def test_a_dangling_source_or_an_unexplained_derivation_is_refused():
    data = {"sources": dict(SOURCES), "profiles": copy.deepcopy(PROFILES), "links": copy.deepcopy(LINKS)}
    data["profiles"]["nrf52840"]["figures"]["compute_flops"]["source"] = "nowhere"
    with pytest.raises(ValidationError, match="unknown source 'nowhere'"):
        Catalogue.model_validate(data)
    data = {"sources": dict(SOURCES), "profiles": copy.deepcopy(PROFILES), "links": copy.deepcopy(LINKS)}
    data["links"]["lte_m"]["figures"]["energy_per_byte_up_j"]["note"] = ""
    with pytest.raises(ValidationError, match="must say how"):
        Catalogue.model_validate(data)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_energy_per_flop_is_load_minus_idle_power_over_sustained_speed(name):
    derived = (figure(PROFILES, name, "load_power_w") - figure(PROFILES, name, "idle_power_w")) \
        / figure(PROFILES, name, "compute_flops")
    # Two significant digits: within 5 % of the formula.
    assert figure(PROFILES, name, "energy_per_flop_j") == pytest.approx(derived, rel=0.05)


@pytest.mark.parametrize("name", ["nb_iot", "lte_m", "lora_sf7"])
def test_radio_energy_per_byte_is_power_over_rate(name):
    up = figure(LINKS, name, "tx_power_w") * 8 / figure(LINKS, name, "uplink_bps")
    down = figure(LINKS, name, "rx_power_w") * 8 / figure(LINKS, name, "downlink_bps")
    assert figure(LINKS, name, "energy_per_byte_up_j") == pytest.approx(up, rel=0.05)
    assert figure(LINKS, name, "energy_per_byte_down_j") == pytest.approx(down, rel=0.05)


@pytest.mark.parametrize("name", ["lte_cat4", "wifi_n"])
def test_energy_per_byte_follows_huangs_power_model(name):
    # P = alpha t + beta (mW, t in Mbit/s): energy per byte at rate t = 8e-9 (alpha + beta / t) J.
    beta = figure(LINKS, name, "beta_mw")
    for direction, rate in (("up", "uplink_bps"), ("down", "downlink_bps")):
        mbps = figure(LINKS, name, rate) / 1e6
        expected = 8e-9 * (figure(LINKS, name, f"alpha_{direction}_mw_per_mbps") + beta / mbps)
        assert figure(LINKS, name, f"energy_per_byte_{direction}_j") == pytest.approx(expected, rel=0.05)


def test_lte_energy_per_byte_by_hand():
    # Uplink at 6 Mbit/s: 438.39 + 1288.04 / 6 = 653.06 mW per Mbit/s; x 8e-9 = 5.22e-6 J/byte.
    assert figure(LINKS, "lte_cat4", "energy_per_byte_up_j") == pytest.approx(5.22e-6, rel=0.01)


def test_a_class_takes_its_figures_from_profile_and_link():
    cls = DeviceClassSpec.model_validate({"name": "pole", "share": 1.0, "profile": "raspberry_pi_4",
                                          "link": "lte_m"})
    for key in PROFILE_FIELDS + LINK_FIELDS:
        if key in PROFILES["raspberry_pi_4"]["figures"]:
            assert getattr(cls, key) == figure(PROFILES, "raspberry_pi_4", key)
        if key in LINKS["lte_m"]["figures"]:
            assert getattr(cls, key) == figure(LINKS, "lte_m", key)
    assert cls.battery_j is None  # the Pi's profile has no battery: mains powered
    assert (cls.profile, cls.link) == ("raspberry_pi_4", "lte_m")


def test_keys_the_class_gives_itself_override_the_catalogue():
    cls = DeviceClassSpec.model_validate({"name": "phone", "share": 1.0, "profile": "android_midrange",
                                          "link": "lte_cat4", "battery_j": 1000.0, "uplink_bps": 1e6})
    assert cls.battery_j == 1000.0 and cls.uplink_bps == 1e6
    assert cls.downlink_bps == figure(LINKS, "lte_cat4", "downlink_bps")
    assert cls.compute_flops == figure(PROFILES, "android_midrange", "compute_flops")


def test_a_profile_without_a_link_still_needs_link_keys():
    with pytest.raises(ValidationError, match="uplink_bps"):
        DeviceClassSpec.model_validate({"name": "mote", "share": 1.0, "profile": "nrf52840"})


def test_catalogue_names_do_not_change_the_run_fingerprint():
    # The filled figures are what a run depends on; the names are left out of dumps.
    by_name = DeviceClassSpec.model_validate({"name": "n", "share": 1.0, "profile": "esp32_s3", "link": "nb_iot"})
    by_hand = DeviceClassSpec.model_validate({"name": "n", "share": 1.0, **{
        k: getattr(by_name, k) for k in PROFILE_FIELDS + LINK_FIELDS}})
    assert by_name.model_dump_json() == by_hand.model_dump_json()


def _with_class(write_scenario, **keys):
    raw = copy.deepcopy(TINY)
    raw["population"]["classes"][0] |= keys
    return write_scenario(raw)


@pytest.mark.parametrize("keys, key, expected", [
    ({"profile": "raspberry_pi_5"}, "population.classes[0].profile", "unknown profile 'raspberry_pi_5'"),
    ({"link": "5g"}, "population.classes[0].link", "unknown link '5g'"),
    ({"profile": 3}, "population.classes[0].profile", "valid string"),
])
def test_a_malformed_profile_is_one_line_naming_file_and_key(write_scenario, capsys, keys, key, expected):
    path = _with_class(write_scenario, **keys)
    assert main(["validate", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert str(path) in lines[0] and key in lines[0] and expected in lines[0]


def test_an_unknown_profile_lists_the_known_ones(write_scenario, capsys):
    main(["validate", str(_with_class(write_scenario, profile="pi"))])
    err = capsys.readouterr().err
    assert all(name in err for name in ISSUE_PROFILES)


def test_devices_lists_every_entry_and_every_source(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    catalogue = load_catalogue()
    for name in [*catalogue.profiles, *catalogue.links]:
        assert f"\n{name}: " in out
    for key in catalogue.sources:
        assert f"[{key}] {catalogue.sources[key]}" in out  # listed under Sources
    assert out.strip() == describe().strip()
