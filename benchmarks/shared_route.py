"""What the shared endpoint's routing by ``model`` costs a model's streaming: output tok/s at c=8
through the shared URL (``/v1``: HAProxy reads the body's model and routes) against the same
model's own prefix (``/rayvllm-nb/models/NAME/v1``: HAProxy routes by path alone), on the same
replica. Several server starts; on each, after a warm-up of both paths, loads alternate
(ABBA). Prints each load, each start's median ratio and the spread over starts.

    .venv/bin/python benchmarks/shared_route.py --starts 3 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics

import rayvllm_nb
from rayvllm_nb._internal.loadgen import run_load_in_subprocess
from rayvllm_nb._internal.shared_endpoint import model_prefix

NAME = "routed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=3, help="server starts (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="loads per side per start (default 3)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests-per-stream", type=int, default=32)
    args = parser.parse_args()

    rayvllm_nb.init()
    ratios = []
    try:
        for start in range(args.starts):
            status = rayvllm_nb.start("tiny-cpu", [f"served_model_name={NAME}"], wait_ready=True)
            root = status.base_url.removesuffix("/v1")
            paths = {"shared": root, "direct": root + model_prefix(status.app_name)}
            for url in paths.values():
                run_load_in_subprocess(url, NAME, count=32, input_words=32, seed=1, concurrency=8, output_len=64)
            tok_s: dict[str, list[float]] = {"shared": [], "direct": []}
            order = ["shared", "direct", "direct", "shared"]
            for index in range(2 * args.rounds):
                side = order[index % 4]
                summary, _ = run_load_in_subprocess(
                    paths[side], NAME, count=args.requests_per_stream * args.concurrency, input_words=32,
                    seed=100 + index, concurrency=args.concurrency, output_len=64,
                )
                if summary["errors"]:
                    raise SystemExit(f"the load failed: {summary}")
                tok_s[side].append(float(summary["output_tok_per_s"] or 0))
                print(f"start {start + 1} load {index + 1} {side:6s} {summary['output_tok_per_s']:.0f} tok/s, "
                      f"TTFT p50 {summary['ttft_p50_ms']:.1f} ms", flush=True)
            ratio = statistics.median(tok_s["shared"]) / statistics.median(tok_s["direct"])
            ratios.append(ratio)
            print(f"start {start + 1}: shared/direct tok/s (medians) {ratio:.3f}", flush=True)
            rayvllm_nb.stop(NAME)
        print(f"shared/direct over {len(ratios)} starts: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    finally:
        if NAME in [model.name for model in rayvllm_nb.status().models]:
            rayvllm_nb.stop(NAME)
        print(rayvllm_nb.shutdown())


if __name__ == "__main__":
    main()
