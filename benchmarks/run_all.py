"""Every A/B benchmark in sequence, each in its own process (ours = A, torch/transformers = B):

    python benchmarks/run_all.py [--quick] [--pairs 5] [--only likelihood_vs_torch,...]

(a) likelihood_vs_torch, (b) sampling_vs_generate, (c) likelihood_vs_sampling, (d) train_vs_torch,
(e) greedy_vs_generate; each writes benchmarks/results/<name>.json. Run it alone on the machine:
a result is void when the load per core exceeds 1.0 before or after.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

SCRIPTS = ("likelihood_vs_torch", "sampling_vs_generate", "likelihood_vs_sampling", "train_vs_torch",
           "greedy_vs_generate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every script")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--only", default=",".join(SCRIPTS))
    args = parser.parse_args()
    here = pathlib.Path(__file__).parent
    failed = []
    for name in args.only.split(","):
        command = [sys.executable, str(here / f"{name}.py"), f"--pairs={args.pairs}"]
        if args.quick:
            command += ["--quick", f"--out=/tmp/jaxsft-bench-quick/{name}.json"]
        print("==>", " ".join(command), flush=True)
        if subprocess.run(command, cwd=here).returncode:
            failed.append(name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
