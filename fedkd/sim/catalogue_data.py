"""The device catalogue's figures and where each one comes from (validated by
:mod:`fedkd.sim.catalogue`; ``fedkd devices`` prints them).

Every figure says its ``basis``:

- ``nominal``: a datasheet or standard's rated / peak value (a real device rarely sustains it);
- ``measured``: a published measurement;
- ``derived``: computed from other figures here; ``note`` gives the formula;
- ``assumed``: no source gives this number for this use; the note says what it rests on.

Figures are rounded to the precision the source supports (two significant digits at most
for anything derived or assumed). Figures named like a device class's keys
(:data:`fedkd.sim.catalogue.PROFILE_FIELDS`, :data:`fedkd.sim.catalogue.LINK_FIELDS`) fill a
scenario's class; the others are the inputs of a derivation, shown for checking.

Energy accounting (why the derived energies subtract idle power): the simulated world drains
``idle_power_w`` from every battery all the time, busy or not, and charges
``energy_per_flop_j`` / ``energy_per_byte_*_j`` on top for work done. So a compute energy is
(power under load - idle power) / sustained FLOP/s, and a radio's energy per byte is the radio's
power while moving data divided by its rate. What the model has no term for is said in a note
(an LTE radio's tail after a transfer, a LoRaWAN duty-cycle limit).
"""
from __future__ import annotations

SOURCES: dict[str, str] = {
    "rpi4_brief": "Raspberry Pi Ltd, Raspberry Pi 4 Model B product brief (BCM2711, 4x Cortex-A72 at 1.5 GHz), "
                  "https://datasheets.raspberrypi.com/rpi4/raspberry-pi-4-product-brief.pdf",
    "rpi4_hpl": "dadul96, 'HPL Benchmark on a Raspberry Pi 4B' (blog post), 2022, "
                "https://dadul96.github.io/posts/hpl_benchmark_on_pi4/ (Pi 4B at 1.5 GHz, 64-bit OS: 14.6 GFLOP/s HPL "
                "against a 24.0 GFLOP/s FP64 peak)",
    "pidramble_power": "J. Geerling, 'Power Consumption Benchmarks', Raspberry Pi Dramble, "
                       "https://www.pidramble.com/wiki/benchmarks/power-consumption (Pi 4 B at 5 V: idle 540 mA, "
                       "4-core stress 1280 mA)",
    "jetson_nano_module": "NVIDIA, Jetson Nano module data sheet (128-core Maxwell GPU, 472 GFLOPS FP16; "
                          "5 W / 10 W power modes), https://developer.nvidia.com/embedded/jetson-nano",
    "jetson_l4t_power": "NVIDIA, L4T Development Guide, 'Power Management for Jetson Nano': nvpmodel modes "
                        "MAXN (10 W, GPU up to 921.6 MHz) and 5W (GPU up to 640 MHz)",
    "ignatov2019": "A. Ignatov et al., 'AI Benchmark: All About Deep Learning on Smartphones in 2019', "
                   "ICCV Workshops 2019 (phone NN throughput varies over an order of magnitude by SoC and framework)",
    "halpern2016": "M. Halpern, Y. Zhu, V. J. Reddi, 'Mobile CPU's Rise to Power: Quantifying the Impact of "
                   "Generational Mobile CPU Design Trends on Performance, Energy, and User Satisfaction', HPCA 2016 "
                   "(phone CPUs under sustained load run at a few watts, above what the phone can dissipate for long)",
    "carroll2010": "A. Carroll, G. Heiser, 'An Analysis of Power Consumption in a Smartphone', USENIX ATC 2010 "
                   "(suspended phone: tens of mW)",
    "phone_battery": "Typical 2023 mid-range Android phone: 5000 mAh Li-ion at 3.85 V nominal (e.g. Samsung "
                     "Galaxy A54 5G specifications)",
    "esp32s3_datasheet": "Espressif, ESP32-S3 Series Datasheet (Xtensa LX7 dual core up to 240 MHz, single-precision "
                         "FPU, 128-bit SIMD; Light-sleep about 240 uA, Deep-sleep about 7 uA), "
                         "https://www.espressif.com/sites/default/files/documentation/esp32-s3_datasheet_en.pdf",
    "ncr18650b": "Panasonic NCR18650B Li-ion cell datasheet: 3200 mAh minimum, 3.6 V nominal",
    "nrf52840_ps": "Nordic Semiconductor, nRF52840 Product Specification v1.x (Cortex-M4F at 64 MHz; CPU running "
                   "CoreMark from flash with DC/DC at 3 V: 3.3 mA; System ON idle, RTC running: about 1.5 uA), "
                   "https://infocenter.nordicsemi.com/pdf/nRF52840_PS_v1.1.pdf",
    "cr2032": "Energizer CR2032 lithium coin cell datasheet: 235 mAh (to 2.0 V), 3.0 V nominal",
    "tr45820": "3GPP TR 45.820 v13.1.0, 'Cellular system support for ultra-low complexity and low throughput "
               "Internet of Things (CIoT)', Rel-13, 2015: battery-life evaluation assumes a device drawing 500 mW "
               "transmitting (23 dBm), 80 mW receiving, 3 mW in light sleep, 0.015 mW in deep sleep; latency "
               "objective 10 s for exception reports",
    "nbiot_rel13": "3GPP TS 36.306 Rel-13 UE category NB1, as summarised by Y.-P. E. Wang et al., 'A Primer on 3GPP "
                   "Narrowband Internet of Things', IEEE Communications Magazine 55(3), 2017: peak rates about "
                   "26 kbit/s downlink, about 62 kbit/s uplink (multi-tone)",
    "ltem_rel13": "3GPP Rel-13 UE category M1 (TS 36.306): 1 Mbit/s peak in full-duplex FDD; half-duplex FDD "
                  "(what most modules run) about 300 kbit/s downlink and 375 kbit/s uplink, as summarised in "
                  "GSMA, 'LTE-M Deployment Guide to Basic Feature Set Requirements', 2019",
    "lte_cat4": "3GPP TS 36.306 UE category 4: 150 Mbit/s downlink, 50 Mbit/s uplink peak (20 MHz, 2x2 MIMO)",
    "huang2012": "J. Huang, F. Qian, A. Gerber, Z. M. Mao, S. Sen, O. Spatscheck, 'A Close Examination of "
                 "Performance and Power Characteristics of 4G LTE Networks', ACM MobiSys 2012: 4GTest median LTE "
                 "throughput 13 Mbit/s down, 6 Mbit/s up; power model P = alpha_u t_u + alpha_d t_d + beta (mW, "
                 "t in Mbit/s) with LTE alpha_u 438.39, alpha_d 51.97, beta 1288.04 and WiFi alpha_u 283.17, "
                 "alpha_d 137.01, beta 132.86; LTE tail 11.576 s at 1060 mW",
    "ieee80211n": "IEEE 802.11n-2009: 72.2 Mbit/s PHY rate for one spatial stream, 20 MHz, MCS 7, short guard "
                  "interval",
    "sx1276": "Semtech SX1276/77/78/79 datasheet: LoRa SF7, 125 kHz, CR 4/5 equivalent bit rate 5469 bit/s; supply "
              "current about 29 mA transmitting at +13 dBm (RFO pin), about 11 mA receiving",
    "etsi_en300220": "ETSI EN 300 220 / ERC Rec 70-03, EU 868 MHz band g1: 1 % transmit duty cycle",
}

# name -> {"description": ..., "figures": {figure: {"value", "basis", "source", "note"}}}
PROFILES: dict[str, dict] = {
    "raspberry_pi_4": {
        "description": "Raspberry Pi 4 Model B: 4x Cortex-A72 at 1.5 GHz, mains powered; a camera node or a gateway",
        "figures": {
            "peak_flops_fp64": {"value": 24.0e9, "basis": "nominal", "source": "rpi4_hpl",
                                "note": "4 cores x 1.5 GHz x 4 FP64 FLOP/cycle"},
            "hpl_flops": {"value": 14.6e9, "basis": "measured", "source": "rpi4_hpl",
                          "note": "dense LU (HPL), 4 processes: an upper bound for any CNN"},
            "compute_flops": {"value": 3.0e9, "basis": "assumed", "source": "rpi4_hpl",
                              "note": "about 20 % of the HPL figure: small conv layers, batch 16-32, and PyTorch "
                                      "training overheads reach a fraction of dense-GEMM efficiency"},
            "load_power_w": {"value": 6.4, "basis": "measured", "source": "pidramble_power",
                             "note": "1280 mA at 5 V, all four cores under stress"},
            "idle_power_w": {"value": 2.7, "basis": "measured", "source": "pidramble_power",
                             "note": "540 mA at 5 V, idle, no peripherals"},
            "energy_per_flop_j": {"value": 1.2e-9, "basis": "derived", "source": "pidramble_power",
                                  "note": "(load_power_w - idle_power_w) / compute_flops = 3.7 W / 3.0e9"},
        },
    },
    "jetson_nano": {
        "description": "NVIDIA Jetson Nano (module or developer kit) in its 10 W mode; mains powered",
        "figures": {
            "peak_flops_fp16": {"value": 472e9, "basis": "nominal", "source": "jetson_nano_module",
                                "note": "128 CUDA cores x 921.6 MHz x 2 (FMA) x 2 (FP16 pairs)"},
            "peak_flops_fp32": {"value": 236e9, "basis": "derived", "source": "jetson_nano_module",
                                "note": "half the FP16 peak: 128 x 921.6 MHz x 2"},
            "compute_flops": {"value": 2.4e10, "basis": "assumed", "source": "jetson_nano_module",
                              "note": "10 % of the FP32 peak: small CNNs in FP32 leave the GPU mostly idle "
                                      "(kernel launch and memory bound)"},
            "load_power_w": {"value": 10.0, "basis": "nominal", "source": "jetson_l4t_power",
                             "note": "the MAXN mode's power budget"},
            "idle_power_w": {"value": 1.5, "basis": "assumed", "source": "jetson_l4t_power",
                             "note": "no data-sheet idle figure; the order of what the module draws with "
                                     "nothing running"},
            "energy_per_flop_j": {"value": 3.5e-10, "basis": "derived", "source": "jetson_l4t_power",
                                  "note": "(load_power_w - idle_power_w) / compute_flops = 8.5 W / 2.4e10"},
        },
    },
    "android_midrange": {
        "description": "Mid-range Android phone (2+6-core big.LITTLE SoC), CPU training, on battery",
        "figures": {
            "compute_flops": {"value": 5.0e9, "basis": "assumed", "source": "ignatov2019",
                              "note": "CPU training of a small CNN, sustained under thermal limits; AI Benchmark "
                                      "shows a spread of 10x across SoCs and frameworks, so take this as an order"},
            "load_power_w": {"value": 3.0, "basis": "assumed", "source": "halpern2016",
                             "note": "sustained SoC power under full CPU load, a few watts"},
            "idle_power_w": {"value": 0.03, "basis": "assumed", "source": "carroll2010",
                             "note": "screen off, suspended between rounds: tens of mW"},
            "energy_per_flop_j": {"value": 5.9e-10, "basis": "derived", "source": "halpern2016",
                                  "note": "(load_power_w - idle_power_w) / compute_flops = 2.97 W / 5.0e9"},
            "battery_j": {"value": 69_300.0, "basis": "nominal", "source": "phone_battery",
                          "note": "5.0 Ah x 3.85 V x 3600 s/h"},
        },
    },
    "esp32_s3": {
        "description": "ESP32-S3 class microcontroller (dual Xtensa LX7, 240 MHz, 512 KB SRAM + PSRAM) on one "
                       "18650 cell",
        "figures": {
            "peak_flops_fp32": {"value": 9.6e8, "basis": "nominal", "source": "esp32s3_datasheet",
                                "note": "2 cores x 240 MHz x 2 (one single-precision multiply-add a cycle)"},
            "compute_flops": {"value": 1.0e8, "basis": "assumed", "source": "esp32s3_datasheet",
                              "note": "about 10 % of the FP32 peak for FP32 training from PSRAM; the SIMD "
                                      "unit speeds up int8 inference (ESP-NN), not FP32 training"},
            "load_power_w": {"value": 0.2, "basis": "assumed", "source": "esp32s3_datasheet",
                             "note": "about 60 mA at 3.3 V with both cores at 240 MHz and the radio off, the "
                                     "order of the data sheet's Modem-sleep currents"},
            "idle_power_w": {"value": 0.0008, "basis": "nominal", "source": "esp32s3_datasheet",
                             "note": "Light-sleep, 240 uA at 3.3 V, keeping RAM (a model) between rounds"},
            "energy_per_flop_j": {"value": 2.0e-9, "basis": "derived", "source": "esp32s3_datasheet",
                                  "note": "(load_power_w - idle_power_w) / compute_flops = 0.199 W / 1.0e8"},
            "battery_j": {"value": 41_000.0, "basis": "nominal", "source": "ncr18650b",
                          "note": "one cell: 3.2 Ah x 3.6 V x 3600 s/h = 41.5 kJ, rounded down"},
        },
    },
    "nrf52840": {
        "description": "nRF52840 class sensor mote (Cortex-M4F at 64 MHz, 256 KB RAM) on a CR2032 coin cell",
        "figures": {
            "peak_flops_fp32": {"value": 6.4e7, "basis": "nominal", "source": "nrf52840_ps",
                                "note": "64 MHz x 1 single-precision FLOP a cycle (the M4F's FPU issues one "
                                        "add or multiply a cycle; a fused multiply-add takes 3)"},
            "compute_flops": {"value": 1.0e7, "basis": "assumed", "source": "nrf52840_ps",
                              "note": "about 15 % of the FP32 peak for FP32 training of a tiny model; CMSIS-NN's "
                                      "speed-ups are for int8 inference"},
            "load_power_w": {"value": 0.0099, "basis": "nominal", "source": "nrf52840_ps",
                             "note": "3.3 mA at 3 V, CPU running from flash with the DC/DC regulator"},
            "idle_power_w": {"value": 4.5e-6, "basis": "nominal", "source": "nrf52840_ps",
                             "note": "System ON idle with the RTC running, about 1.5 uA at 3 V"},
            "energy_per_flop_j": {"value": 9.9e-10, "basis": "derived", "source": "nrf52840_ps",
                                  "note": "(load_power_w - idle_power_w) / compute_flops = 9.9 mW / 1.0e7"},
            "battery_j": {"value": 2_500.0, "basis": "nominal", "source": "cr2032",
                          "note": "0.235 Ah x 3.0 V x 3600 s/h = 2.54 kJ, rounded down"},
        },
    },
}

LINKS: dict[str, dict] = {
    "nb_iot": {
        "description": "NB-IoT, 3GPP Rel-13 category NB1, in good coverage",
        "figures": {
            "uplink_bps": {"value": 62_000.0, "basis": "nominal", "source": "nbiot_rel13",
                           "note": "multi-tone peak; single-tone devices reach about 17 kbit/s"},
            "downlink_bps": {"value": 26_000.0, "basis": "nominal", "source": "nbiot_rel13",
                             "note": "peak"},
            "latency_s": {"value": 1.0, "basis": "assumed", "source": "tr45820",
                          "note": "well inside the 10 s objective, which is for the worst coverage"},
            "tx_power_w": {"value": 0.5, "basis": "nominal", "source": "tr45820",
                           "note": "evaluation assumption at 23 dBm"},
            "rx_power_w": {"value": 0.08, "basis": "nominal", "source": "tr45820", "note": ""},
            "energy_per_byte_up_j": {"value": 6.5e-5, "basis": "derived", "source": "tr45820",
                                     "note": "tx_power_w x 8 / uplink_bps = 0.5 x 8 / 62000"},
            "energy_per_byte_down_j": {"value": 2.5e-5, "basis": "derived", "source": "tr45820",
                                       "note": "rx_power_w x 8 / downlink_bps = 0.08 x 8 / 26000"},
        },
    },
    "lte_m": {
        "description": "LTE-M, 3GPP Rel-13 category M1, half-duplex FDD",
        "figures": {
            "uplink_bps": {"value": 375_000.0, "basis": "nominal", "source": "ltem_rel13",
                           "note": "half-duplex peak"},
            "downlink_bps": {"value": 300_000.0, "basis": "nominal", "source": "ltem_rel13",
                             "note": "half-duplex peak"},
            "latency_s": {"value": 0.1, "basis": "assumed", "source": "ltem_rel13",
                          "note": "connected-mode round trip of the order of 100 ms"},
            "tx_power_w": {"value": 0.5, "basis": "assumed", "source": "tr45820",
                           "note": "the Rel-13 CIoT study's 23 dBm device power, applied to LTE-M as well"},
            "rx_power_w": {"value": 0.08, "basis": "assumed", "source": "tr45820", "note": "as above"},
            "energy_per_byte_up_j": {"value": 1.1e-5, "basis": "derived", "source": "tr45820",
                                     "note": "tx_power_w x 8 / uplink_bps = 0.5 x 8 / 375000"},
            "energy_per_byte_down_j": {"value": 2.1e-6, "basis": "derived", "source": "tr45820",
                                       "note": "rx_power_w x 8 / downlink_bps = 0.08 x 8 / 300000"},
        },
    },
    "lte_cat4": {
        "description": "LTE category 4 (a phone or an LTE router), at the median throughput Huang et al. measured",
        "figures": {
            "peak_uplink_bps": {"value": 50e6, "basis": "nominal", "source": "lte_cat4", "note": ""},
            "peak_downlink_bps": {"value": 150e6, "basis": "nominal", "source": "lte_cat4", "note": ""},
            "uplink_bps": {"value": 6.0e6, "basis": "measured", "source": "huang2012",
                           "note": "4GTest median over > 3000 users, 2012"},
            "downlink_bps": {"value": 13.0e6, "basis": "measured", "source": "huang2012",
                             "note": "4GTest median"},
            "latency_s": {"value": 0.07, "basis": "assumed", "source": "huang2012",
                          "note": "of the order of the LTE round-trip times 4GTest measured"},
            "alpha_up_mw_per_mbps": {"value": 438.39, "basis": "measured", "source": "huang2012",
                                     "note": "LTE power model"},
            "alpha_down_mw_per_mbps": {"value": 51.97, "basis": "measured", "source": "huang2012",
                                       "note": "LTE power model"},
            "beta_mw": {"value": 1288.04, "basis": "measured", "source": "huang2012",
                        "note": "LTE power model: base power while the radio is active"},
            "energy_per_byte_up_j": {"value": 5.2e-6, "basis": "derived", "source": "huang2012",
                                     "note": "8e-9 x (alpha_up + beta / 6 Mbit/s) = 8e-9 x 653.1 mW/(Mbit/s)"},
            "energy_per_byte_down_j": {"value": 1.2e-6, "basis": "derived", "source": "huang2012",
                                       "note": "8e-9 x (alpha_down + beta / 13 Mbit/s) = 8e-9 x 151.0"},
            "tail_energy_j": {"value": 12.0, "basis": "derived", "source": "huang2012",
                              "note": "1.06 W x 11.576 s after each transfer; the simulator has no per-transfer "
                                      "energy term, so this is NOT charged (add it to a class by hand if it "
                                      "matters: about 24 J a round, one tail per direction)"},
        },
    },
    "wifi_n": {
        "description": "Wi-Fi 802.11n, one spatial stream, 20 MHz, good signal",
        "figures": {
            "peak_bps": {"value": 72.2e6, "basis": "nominal", "source": "ieee80211n", "note": "PHY rate"},
            "uplink_bps": {"value": 30e6, "basis": "assumed", "source": "ieee80211n",
                           "note": "about 40 % of the PHY rate reaches the application (MAC overhead, "
                                   "contention)"},
            "downlink_bps": {"value": 30e6, "basis": "assumed", "source": "ieee80211n", "note": "as uplink"},
            "latency_s": {"value": 0.005, "basis": "assumed", "source": "ieee80211n",
                          "note": "a LAN round trip, a few ms"},
            "alpha_up_mw_per_mbps": {"value": 283.17, "basis": "measured", "source": "huang2012",
                                     "note": "WiFi power model (measured on a phone)"},
            "alpha_down_mw_per_mbps": {"value": 137.01, "basis": "measured", "source": "huang2012",
                                       "note": "WiFi power model"},
            "beta_mw": {"value": 132.86, "basis": "measured", "source": "huang2012", "note": "WiFi power model"},
            "energy_per_byte_up_j": {"value": 2.3e-6, "basis": "derived", "source": "huang2012",
                                     "note": "8e-9 x (alpha_up + beta / 30 Mbit/s) = 8e-9 x 287.6"},
            "energy_per_byte_down_j": {"value": 1.1e-6, "basis": "derived", "source": "huang2012",
                                       "note": "8e-9 x (alpha_down + beta / 30 Mbit/s) = 8e-9 x 141.4"},
        },
    },
    "lora_sf7": {
        "description": "LoRa at SF7, 125 kHz, CR 4/5 (EU 868 MHz); PHY rate, duty cycle NOT modelled",
        "figures": {
            "uplink_bps": {"value": 5469.0, "basis": "nominal", "source": "sx1276",
                           "note": "equivalent bit rate while on air"},
            "downlink_bps": {"value": 5469.0, "basis": "nominal", "source": "sx1276", "note": "same PHY"},
            "duty_cycle_bps": {"value": 54.7, "basis": "derived", "source": "etsi_en300220",
                               "note": "1 % of 5469 bit/s: the long-run rate a device may send in the EU; "
                                       "set uplink_bps to this in a scenario that must respect it"},
            "latency_s": {"value": 1.0, "basis": "nominal", "source": "sx1276",
                          "note": "LoRaWAN class A opens its first receive window 1 s after an uplink"},
            "tx_power_w": {"value": 0.096, "basis": "nominal", "source": "sx1276", "note": "29 mA x 3.3 V"},
            "rx_power_w": {"value": 0.036, "basis": "nominal", "source": "sx1276", "note": "11 mA x 3.3 V"},
            "energy_per_byte_up_j": {"value": 1.4e-4, "basis": "derived", "source": "sx1276",
                                     "note": "tx_power_w x 8 / uplink_bps = 0.096 x 8 / 5469"},
            "energy_per_byte_down_j": {"value": 5.3e-5, "basis": "derived", "source": "sx1276",
                                       "note": "rx_power_w x 8 / downlink_bps = 0.036 x 8 / 5469"},
        },
    },
}
