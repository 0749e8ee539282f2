"""Board profiles: what a board is expected to be, and the budgets a training round must meet.

Budgets are for the probe's round (``hardware_tests.probe``): ``train_steps`` AdamW steps of φ on a
tiny bundle's synthetic local data, batch 64, in one process. ``step_ms`` is the mean wall time of
one step; ``round_s`` the whole round including session creation; ``peak_rss_mb`` the process's
peak resident set (under emulation it includes qemu itself). Board numbers leave headroom over
what an idle board does, so a failing budget means a real regression or a throttled board.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dccl.errors import DcclError


@dataclass(frozen=True)
class BoardProfile:
    name: str
    arch: str                       # platform.machine() the board must report
    description: str
    step_ms: float                  # budget: mean portable train step
    round_s: float                  # budget: one round incl. model load
    peak_rss_mb: float              # budget: peak RSS of the agent process
    thermal: bool                   # the board exposes a CPU temperature (checked when True)
    max_temp_c: float = 80.0        # Pi firmware soft-throttles at 80 °C
    train_steps: int = 20
    parity_tol: float = 1e-4        # φ / scores vs the x86 run and the bundle's reference
    qemu_cpu: str | None = None     # emulated CPU model (qemu -cpu)

    def as_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, BoardProfile] = {p.name: p for p in (
    BoardProfile("pi4", "aarch64", "Raspberry Pi 4 (Cortex-A72, 64-bit Pi OS)",
                 step_ms=5.0, round_s=10.0, peak_rss_mb=250, thermal=True),
    BoardProfile("pi5", "aarch64", "Raspberry Pi 5 (Cortex-A76, 64-bit Pi OS)",
                 step_ms=2.5, round_s=6.0, peak_rss_mb=250, thermal=True),
    BoardProfile("jetson-orin-nano", "aarch64", "NVIDIA Jetson Orin Nano (Cortex-A78AE, L4T / JetPack 6)",
                 step_ms=2.5, round_s=6.0, peak_rss_mb=300, thermal=True, max_temp_c=90.0),
    # CI host: 2 cores shared with other jobs, hence the slack
    BoardProfile("host", "x86_64", "this machine (x86_64), the edge environment's interpreter",
                 step_ms=20.0, round_s=30.0, peak_rss_mb=400, thermal=False),
    # qemu user mode runs ORT ~150-250x slower than native (NOTES.md); the RSS includes qemu
    BoardProfile("emulated-aarch64", "aarch64", "real aarch64 Python/numpy/onnxruntime under qemu-aarch64-static",
                 step_ms=300.0, round_s=120.0, peak_rss_mb=1200, thermal=False,
                 qemu_cpu="cortex-a72"),
)}


def get_profile(name: str) -> BoardProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise DcclError(f"--profile = {name!r}: unknown board profile (known: {', '.join(PROFILES)})") from None
