"""What a panel following a model costs the serving path: serving-layer CPU per 1,000 tokens
(the benchmark's measure: every process of the cluster's session but vLLM's engine) over loads
with a panel showing the model (its watcher reads status and live metrics every 2 s) and without,
alternating (ABBA), on one server start. Prints each load and the ratio of the medians.

    .venv/bin/python benchmarks/panel_overhead.py --rounds 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import rayvllm_nb
from rayvllm_nb._internal import processes
from rayvllm_nb._internal.cpu_meter import CpuMeter
from rayvllm_nb._internal.loadgen import run_load_in_subprocess

NAME = "overhead"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="loads per side (default 8)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests-per-stream", type=int, default=16)
    args = parser.parse_args()

    cluster = rayvllm_nb.init()
    head = next(record for record in processes.recorded_heads() if record.address == cluster.address)
    meter = CpuMeter(lambda: processes.session_processes(head.session_id))
    status = rayvllm_nb.start("tiny-cpu", [f"served_model_name={NAME}"], wait_ready=True)
    root = status.base_url.removesuffix("/v1")
    try:
        run_load_in_subprocess(root, NAME, count=16, input_words=32, seed=1, concurrency=4, output_len=64)
        per_1k: dict[str, list[float]] = {"without": [], "with panel": []}
        order = ["without", "with panel", "with panel", "without"]
        for index in range(2 * args.rounds):
            side = order[index % 4]
            panel = rayvllm_nb.panel() if side == "with panel" else None
            if panel is not None:
                panel.show(NAME)
                time.sleep(3)  # the watcher is reading status and metrics every 2 s
            meter.start()
            summary, _ = run_load_in_subprocess(
                root, NAME, count=args.requests_per_stream * args.concurrency, input_words=32,
                seed=100 + index, concurrency=args.concurrency, output_len=64,
            )
            cpu = meter.stop()
            if panel is not None:
                assert "data-live" in panel.status_area.live.value, "the panel's live strip never showed"
                panel.close()
            if summary["errors"]:
                raise SystemExit(f"the load failed: {summary}")
            value = cpu.serving_s / (int(summary["output_tokens"] or 0) / 1000)
            per_1k[side].append(value)
            print(f"{index + 1:2d} {side:10s} serving CPU {value:.3f} s per 1k tokens, "
                  f"{summary['output_tok_per_s']:.0f} tok/s, errors {summary['errors']}", flush=True)
        medians = {side: statistics.median(values) for side, values in per_1k.items()}
        for side, values in per_1k.items():
            print(f"{side:10s} median {medians[side]:.3f} (min {min(values):.3f}, max {max(values):.3f})")
        print(f"with panel / without: {medians['with panel'] / medians['without']:.3f}")
    finally:
        rayvllm_nb.stop(NAME)
        print(rayvllm_nb.shutdown())


if __name__ == "__main__":
    main()
