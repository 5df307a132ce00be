"""Benchmark harness: device selection, and a ratio table per group printed after the run.

Each benchmark declares a ``group`` (one workload) and a ``role``: "ours", "fused" (PyTorch's
best fused op for the job), "eager" (the reference), "peer" (another library's way of doing the
same job, e.g. sentence-transformers' training step) or "other" (shown for scale). After the run,
every group prints each entry's median time and its ratio to the group's "fused", "eager" and
"peer" entries: all measured side by side in this one run, on one device. Entries that declare
their ``work`` (e.g. real tokens and examples per call) also print it per second.
"""

import platform
import re
from pathlib import Path

import pytest
import torch

_RESULTS: dict[str, dict[str, dict]] = {}
BASELINES = ("fused", "eager", "peer")
_NOTES: list[str] = []


@pytest.fixture
def note():
    """``note(line)``: print ``line`` after the run (a measurement that is not a timing, e.g. a largest batch)."""
    return _NOTES.append


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_STATUS = Path("/proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident set size (Linux: writing 5 to clear_refs); False where it
    cannot be."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss(field: str) -> int:
    """VmRSS or VmHWM (peak) of this process in bytes."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M).group(1)) * 1024


@pytest.fixture
def measure(benchmark, device):
    """``measure(fn, group=..., name=..., role=..., exclude_bytes=0)``: time ``fn`` and record it
    for the ratio table.

    ``fn`` runs once untimed (warm-up), once more for the peak memory on CUDA (beyond what was
    allocated before it, less ``exclude_bytes``: e.g. gradients every entry of the group
    produces), then under pytest-benchmark with a device synchronisation inside the timed call.
    """

    def run(
        fn,
        *,
        group: str,
        name: str,
        role: str,
        exclude_bytes: int = 0,
        work: dict | None = None,
        rounds: int = 10,
        warmup_rounds: int = 1,
    ):
        benchmark.group = group
        fn()
        synchronize(device)
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn()
            synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base - exclude_bytes
        elif _reset_peak_rss():  # the CPU: the peak resident set size beyond the one before the call
            base = _rss("VmRSS")
            fn()
            peak = _rss("VmHWM") - base - exclude_bytes
        benchmark.extra_info.update(role=role, name=name, peak_extra_bytes=peak, work=work)

        def timed():
            fn()
            synchronize(device)

        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
        _RESULTS.setdefault(group, {})[name] = dict(
            role=role, median=benchmark.stats.stats.median, peak=peak, work=work
        )

    return run


def pytest_terminal_summary(terminalreporter):
    if _NOTES:
        terminalreporter.section("measurements")
        for line in _NOTES:
            terminalreporter.write_line(line)
    if not _RESULTS:
        return
    tr = terminalreporter
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    tr.section(f"ratios (median time / baseline median), device: {dev}, torch {torch.__version__}")
    tr.write_line(
        "peak extra: CUDA's max allocated beyond the call's start, or on the CPU the peak "
        "resident set size (VmHWM) beyond it"
    )
    for group, entries in _RESULTS.items():
        base = {e["role"]: e["median"] for e in entries.values() if e["role"] in BASELINES}
        tr.write_line(f"{group}")
        for name, e in entries.items():
            ratios = "  ".join(
                f"x{e['median'] / base[r]:.2f} vs {r}" for r in BASELINES if r in base and r != e["role"]
            )
            if e.get("work"):
                ratios += "  " + "  ".join(f"{n / e['median']:,.0f} {what}/s" for what, n in e["work"].items())
            peak = "" if e["peak"] is None else f"  peak extra {e['peak'] / 2**20:.1f} MiB"
            eager_peak = next((x["peak"] for x in entries.values() if x["role"] == "eager"), None)
            if e["peak"] is not None and eager_peak and e["role"] != "eager":
                peak += f" (x{e['peak'] / eager_peak:.3f} of eager's)"
            tr.write_line(f"  {name:<40s} {e['median'] * 1e3:10.3f} ms  {ratios}{peak}")
