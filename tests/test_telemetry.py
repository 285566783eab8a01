"""Telemetry: summaries from a scripted fake NVML, and absent NVML reported rather than raised."""

import sys
import time
import types

import pytest

from distpp import telemetry
from distpp.telemetry import Telemetry, throttle_names


class FakeNVML(types.ModuleType):
    """pynvml stand-in: power ramps 100, 110, 120 W ...; energy counter advances 5 J per read."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2

    def __init__(self, energy=True):
        super().__init__("pynvml")
        self.reads = 0
        self.energy = 1_000_000.0
        self.has_energy = energy

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA Fake H100"

    def nvmlSystemGetDriverVersion(self):
        return "999.1"

    def nvmlDeviceGetMemoryInfo(self, h):
        self.reads += 1
        return types.SimpleNamespace(total=80 * 2**30, used=(1000 + 10 * self.reads) * 2**20)

    def nvmlDeviceGetPowerUsage(self, h):
        return 100_000 + 10_000 * min(self.reads, 5)

    def nvmlDeviceGetClockInfo(self, h, which):
        return 1980 if which == self.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return 0x4 if self.reads % 2 else 0x1

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.has_energy:
            raise RuntimeError("NVMLError_NotSupported")
        self.energy += 5000.0
        return self.energy


@pytest.fixture
def fake(monkeypatch):
    mod = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    return mod


def test_summary_from_samples(fake):
    tel = Telemetry(interval_s=0.001)
    assert tel.available and tel.info["gpu_name"] == "NVIDIA Fake H100" and tel.info["driver"] == "999.1"
    with tel.sampling():
        time.sleep(0.05)
    s = tel.summary(images=4, peak_allocated_mb=123.0)
    assert s["available"] and s["samples"] >= 3
    assert s["energy_j"] == pytest.approx(5.0) and s["energy_per_image_j"] == pytest.approx(1.25)
    assert 100 < s["power_mean_w"] <= s["power_max_w"] <= 150
    assert s["sm_clock_mhz"] == 1980 and s["mem_clock_mhz"] == 2619 and s["memory_used_mb"] > 1000
    assert set(s["throttle_reasons"]) == {"gpu_idle", "sw_power_cap"}
    assert s["torch_peak_allocated_mb"] == 123.0 and s["memory_total_mb"] == 80 * 1024


def test_energy_falls_back_to_integrated_power(monkeypatch):
    mod = FakeNVML(energy=False)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    tel = Telemetry(interval_s=0.002)
    with tel.sampling():
        time.sleep(0.05)
    s = tel.summary(images=2)
    assert tel.energy_mj() is None
    # about 100-150 W over the sampled span (~0.05 s): a few joules, not zero and not the counter's 5 J
    assert 0 < s["energy_j"] < 150 * 0.2 and s["energy_per_image_j"] == pytest.approx(s["energy_j"] / 2)


def test_absent_nvml_is_reported_not_raised(monkeypatch):
    def missing():
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(telemetry, "_nvml", missing)
    tel = Telemetry()
    with tel.sampling():
        pass
    s = tel.summary(images=1)
    assert s == {"available": False, "reason": tel.error} and "distpp[nvml]" in s["reason"]
    assert tel.energy_mj() is None


def test_driverless_machine_reports_reason(monkeypatch):
    class NoDriver(FakeNVML):
        def nvmlInit(self):
            raise OSError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", NoDriver())
    s = Telemetry().summary()
    assert not s["available"] and "NVML unavailable" in s["reason"]


def test_sampling_failure_mid_run_is_reported(fake, monkeypatch):
    tel = Telemetry(interval_s=0.001)
    monkeypatch.setattr(fake, "nvmlDeviceGetPowerUsage", lambda h: (_ for _ in ()).throw(RuntimeError("gone")))
    with tel.sampling():
        time.sleep(0.01)
    assert "sampling failed" in tel.error and not tel.summary()["available"]


def test_throttle_names():
    assert throttle_names(0) == []
    assert throttle_names(0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert throttle_names(0x1000) == ["0x1000"]
