"""One table format for every benchmark, so `make bench` prints one table."""
import os
import platform
from pathlib import Path

import torch


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def cpu_flags() -> str:
    """The vector units of this CPU that decide how fast heads train (bf16 is native only with the last two)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    return " ".join(flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags) or "none"


def print_table(rows: list[dict]) -> None:
    print(f"machine: {machine()}")
    widths = {key: max(len(key), *(len(str(row[key])) for row in rows)) for key in ("stage", "measure", "value")}
    header = f"{'stage':<{widths['stage']}}  {'measure':<{widths['measure']}}  {'value':>{widths['value']}}  note"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['stage']:<{widths['stage']}}  {row['measure']:<{widths['measure']}}  "
              f"{row['value']:>{widths['value']}}  {row['note']}")


def print_measured(measure) -> None:
    """Run `measure()` (which returns table rows) between the machine's CPU flags and load
    average before and after, then print its table: every figure comes with its machine."""
    print(f"cpu flags: {cpu_flags()}; nproc {os.cpu_count()}; load before {os.getloadavg()}")
    print_table(measure())
    print(f"load after {os.getloadavg()}")
