"""Where the CPU goes while a server streams: the probe behind docs/performance.md's "stall".

Starts vLLM's own OpenAI server for the tiny model exactly as by hand (the command is printed),
then runs loads of 24 requests at concurrency 1 from this process. For each load it prints TTFT
and end-to-end p50, each core's busy time (/proc/stat) and the threads that ran most, with the
time each spent running and waiting for a core (/proc/PID/task/TID/schedstat). After
``--runs`` loads it applies rayvllm_nb's CPU placement to the running server
(``cpu_placement.place``) and runs as many again. With ``--py-spy`` it also samples the engine
core's main thread (py-spy --native --idle) during each load and prints where it was.

    .venv/bin/python benchmarks/stall_probe.py --runs 6 [--py-spy]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from rayvllm_nb._internal import cpu_placement
from rayvllm_nb._internal.loadgen import make_prompts, run_load
from rayvllm_nb.benchmark import local_resources, vllm_alone_server
from rayvllm_nb.config import load_config

_CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_times() -> dict[str, list[int]]:
    """Per core, the clock ticks of /proc/stat."""
    found = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            fields = line.split()
            found[fields[0]] = [int(value) for value in fields[1:9]]
    return found


def thread_times() -> dict[tuple[int, int], tuple[str, int, int]]:
    """Every thread of the machine: (pid, tid) -> (name, ns running, ns waiting for a core)."""
    found = {}
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        try:
            for task in (process / "task").iterdir():
                running, waiting, _ = map(int, (task / "schedstat").read_text().split())
                found[(int(process.name), int(task.name))] = ((task / "comm").read_text().strip(), running, waiting)
        except OSError:
            continue
    return found


def engine_core(server_pid: int) -> psutil.Process:
    return next(p for p in psutil.Process(server_pid).children(recursive=True)
                if " ".join(p.cmdline()).startswith("VLLM::EngineCore"))


def main_thread_profile(raw: Path) -> list[tuple[float, str]]:
    """Shares of py-spy's samples of the main thread, by the last three Python frames."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if "MainThread" not in frames[0]:
            continue
        python = [frame.split(" (")[0] for frame in frames if ".py:" in frame]
        counts[" > ".join(python[-3:])] += int(count)
    total = sum(counts.values()) or 1
    return [(100 * count / total, where) for where, count in counts.most_common(3)]


async def probe(server_pid: int, base_url: str, label: str, seed: int, py_spy: bool) -> None:
    spy, raw = None, Path(tempfile.mkstemp(suffix=".txt")[1])
    if py_spy:
        spy = subprocess.Popen(
            [str(Path(sys.executable).with_name("py-spy")), "record", "--native", "--idle", "--threads", "-r", "100",
             "-d", "2", "-f", "raw", "-o", str(raw), "--pid", str(engine_core(server_pid).pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    cores_before, threads_before = cpu_times(), thread_times()
    result = await run_load(base_url, "tiny", make_prompts(24, 32, seed), concurrency=1, output_len=64)
    cores_after, threads_after = cpu_times(), thread_times()
    summary = result.summary()
    print(f"{label}: TTFT p50 {summary['ttft_p50_ms']:.1f} ms, e2e p50 {summary['e2e_p50_ms']:.1f} ms, "
          f"{summary['duration_s']:.2f} s")
    for core, after in cores_after.items():
        spent = dict(zip(_CPU_FIELDS, (b - a for a, b in zip(cores_before[core], after, strict=True)), strict=True))
        print(f"    {core}: busy {sum(spent.values()) - spent['idle']} ticks, idle {spent['idle']}")
    rows = []
    for key, (name, running, waiting) in threads_after.items():
        _, running_before, waiting_before = threads_before.get(key, (name, 0, 0))
        rows.append((running - running_before, waiting - waiting_before, f"{name} (pid {key[0]}, tid {key[1]})"))
    for running, waiting, who in sorted(rows, reverse=True)[:5]:
        print(f"    {who:<40} ran {running / 1e6:6.0f} ms, waited for a core {waiting / 1e6:6.0f} ms")
    own = f"(pid {psutil.Process().pid}, tid {psutil.Process().pid})"
    me = next(row for row in rows if row[2].endswith(own))
    print(f"    {'this load generator':<40} ran {me[0] / 1e6:6.0f} ms, waited for a core {me[1] / 1e6:6.0f} ms")
    if spy is not None:
        spy.wait()
        for share, where in main_thread_profile(raw):
            print(f"    engine core main thread {share:4.0f}%: {where}")
    raw.unlink(missing_ok=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6, help="loads before and after the placement")
    parser.add_argument("--py-spy", action="store_true", help="also sample the engine core (py-spy)")
    args = parser.parse_args()
    server = vllm_alone_server(load_config("tiny-cpu", ["served_model_name=tiny"]), local_resources())
    print("vLLM alone, as by hand:", server.by_hand())
    with server:
        server.start()
        assert server.pid is not None
        await run_load(server.base_url, "tiny", make_prompts(8, 32, 1), concurrency=1, output_len=16)
        for run in range(args.runs):
            await probe(server.pid, server.base_url, f"as by hand, load {run + 1}", 100 + run, args.py_spy)
        placement = cpu_placement.place(psutil.Process(server.pid))
        print("placed:", placement.summary() if placement else "nothing to place")
        for run in range(args.runs):
            await probe(server.pid, server.base_url, f"placed, load {run + 1}", 200 + run, args.py_spy)


if __name__ == "__main__":
    asyncio.run(main())
