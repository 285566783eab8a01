"""GPU telemetry through NVML (nvidia-ml-py, imported lazily): what the card did during a benchmark.

``Telemetry(device_index)`` opens NVML (absent NVML or no driver is reported in ``summary()``, never
raised), samples power, memory used, SM/memory clocks and throttle reasons in a background thread while
``running`` (``with tel.sampling(): ...``), and reads the card's energy counter (mJ, Volta and newer)
around whatever the caller wants charged: ``tel.energy_mj()`` before and after.
"""

from __future__ import annotations

import statistics
import threading
import time
from contextlib import contextmanager

# NVML clocks-event / throttle-reason bits (nvml.h nvmlClocksThrottleReason*), named as nvidia-smi does.
THROTTLE_REASONS = {
    0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting",
}


def throttle_names(mask: int) -> list[str]:
    """The reason names set in an NVML throttle-reason bitmask (unknown bits as hex)."""
    names = [n for bit, n in THROTTLE_REASONS.items() if mask & bit]
    rest = mask & ~sum(THROTTLE_REASONS)
    return names + ([hex(rest)] if rest else [])


def _nvml():
    import pynvml  # nvidia-ml-py

    return pynvml


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def nvml_handle(nv, cuda_index: int):
    """(handle, how): the NVML handle of CUDA device ``cuda_index``, matched by UUID (NVML numbers the
    cards of the whole machine, CUDA only those in CUDA_VISIBLE_DEVICES, possibly reordered); by index
    where the UUID is not available (old torch, MIG slices)."""
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
        return nv.nvmlDeviceGetHandleByUUID("GPU-" + uuid), "uuid"
    except Exception:  # noqa: BLE001 - no uuid attribute, no CUDA, or NVML cannot find it: fall back
        return nv.nvmlDeviceGetHandleByIndex(int(cuda_index)), "index"


class Telemetry:
    """NVML readings of one GPU, given by its CUDA index (matched to NVML's numbering by UUID).

    interval_s: sampling period of the background thread (default 50 ms: a 4-step SD1.5 call on an
                H100 is tens of ms, so a run of repeats gets hundreds of samples).
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.05):
        self.interval_s = float(interval_s)
        self.error: str | None = None
        self.info: dict = {}
        self._samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._energy_ok = True
        try:
            nv = _nvml()
            nv.nvmlInit()
            self._h, how = nvml_handle(nv, int(device_index))
            self._nv = nv
            # renamed "clocks event reasons" in newer NVML; same bits
            self._reasons = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) \
                or nv.nvmlDeviceGetCurrentClocksThrottleReasons
            self.info = {"gpu_name": _s(nv.nvmlDeviceGetName(self._h)),
                         "driver": _s(nv.nvmlSystemGetDriverVersion()),
                         "memory_total_mb": nv.nvmlDeviceGetMemoryInfo(self._h).total / 2**20, "matched_by": how}
        except ImportError as e:
            self.error = f"nvidia-ml-py is not installed ({e}); pip install 'distpp[nvml]'"
        except Exception as e:  # noqa: BLE001 - pynvml raises NVMLError subclasses for missing drivers/GPUs
            self.error = f"NVML unavailable: {type(e).__name__}: {e}"

    @property
    def available(self) -> bool:
        return self.error is None

    # ------------------------------------------------------------------------------------------------
    def read(self) -> dict:
        """One sample: power_w, memory_used_mb, sm_clock_mhz, mem_clock_mhz, throttle (bitmask)."""
        nv, h = self._nv, self._h
        return {"t": time.perf_counter(), "power_w": nv.nvmlDeviceGetPowerUsage(h) / 1e3,
                "memory_used_mb": nv.nvmlDeviceGetMemoryInfo(h).used / 2**20,
                "sm_clock_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
                "mem_clock_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
                "throttle": int(self._reasons(h))}

    def energy_mj(self) -> float | None:
        """The card's energy counter in mJ since driver load (None where unsupported or NVML absent)."""
        if not self.available or not self._energy_ok:
            return None
        try:
            return float(self._nv.nvmlDeviceGetTotalEnergyConsumption(self._h))
        except Exception:  # noqa: BLE001 - pre-Volta cards: NVMLError_NotSupported
            self._energy_ok = False
            return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._samples.append(self.read())
            except Exception as e:  # noqa: BLE001 - keep the bench running; report the failure
                self.error = f"NVML sampling failed: {type(e).__name__}: {e}"
                return
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        if self.available and self._thread is None:
            self._samples, self._t0, self._e0 = [], time.perf_counter(), self.energy_mj()
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="distpp-telemetry", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._t1, self._e1 = time.perf_counter(), self.energy_mj()

    @contextmanager
    def sampling(self):
        self.start()
        try:
            yield self
        finally:
            self.stop()

    # ------------------------------------------------------------------------------------------------
    def summary(self, images: int | None = None, peak_allocated_mb: float | None = None) -> dict:
        """What the card did while sampling: {"available": False, "reason"} without NVML, else GPU name,
        driver, memory used (max over samples, MB), torch's peak allocation if given, power mean/max (W),
        energy (J, from the counter, else power integrated over samples), energy per image if ``images``,
        median SM and memory clocks (MHz), and the throttle reasons seen."""
        if not self.available:
            return {"available": False, "reason": self.error}
        out = {"available": True, **self.info, "samples": len(self._samples)}
        if peak_allocated_mb is not None:
            out["torch_peak_allocated_mb"] = peak_allocated_mb
        if not self._samples:
            return out
        p = [s["power_w"] for s in self._samples]
        mask = 0
        for s in self._samples:
            mask |= s["throttle"]
        energy = None
        if getattr(self, "_e0", None) is not None and getattr(self, "_e1", None) is not None:
            energy = (self._e1 - self._e0) / 1e3
        elif len(self._samples) > 1:
            ts = [s["t"] for s in self._samples]
            energy = sum(0.5 * (p[i] + p[i + 1]) * (ts[i + 1] - ts[i]) for i in range(len(p) - 1))
        out.update(memory_used_mb=max(s["memory_used_mb"] for s in self._samples),
                   power_mean_w=statistics.fmean(p), power_max_w=max(p),
                   sm_clock_mhz=statistics.median(s["sm_clock_mhz"] for s in self._samples),
                   mem_clock_mhz=statistics.median(s["mem_clock_mhz"] for s in self._samples),
                   throttle_reasons=throttle_names(mask), energy_j=energy)
        if images and energy is not None:
            out["energy_per_image_j"] = energy / images
        return out
