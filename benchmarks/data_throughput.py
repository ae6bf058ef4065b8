"""Data numbers for docs/DATA.md: Omniglot first and cached load times, sampler episodes/s.

    python benchmarks/data_throughput.py                # first load into a fresh temp folder
    python benchmarks/data_throughput.py --data-dir D   # reuse D (first load only if D is empty)

Needs the Omniglot zips (`$METANET_DATASETS/omniglot` or `--manual-dir`) or a network.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

_CACHED = """
import json, time
t0 = time.perf_counter()
from metanet_jax import data
t1 = time.perf_counter()
s = data.load_omniglot("standard", data_dir={data_dir!r})
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="cache folder (default: a fresh one)")
    parser.add_argument("--manual-dir", default=None, help="folder of the Omniglot zips")
    parser.add_argument("--iters", type=int, default=500, help="timed sampler calls")
    args = parser.parse_args()

    import jax

    from metanet_jax import data

    tmp = None
    if args.data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="metanet_data_")
        args.data_dir = tmp.name
    t = time.perf_counter()
    parts = data.load_omniglot_parts(manual_dir=args.manual_dir, data_dir=args.data_dir)
    first = time.perf_counter() - t
    n = sum(p.images.shape[0] for p in parts.values())
    print(f"omniglot first load (4 zips, {n} classes, prepare + preprocess + cache): {first:.1f} s")

    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _CACHED.format(data_dir=args.data_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - start
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"omniglot cached load, fresh process: load_omniglot('standard') {r['load_s']:.3f} s "
        f"(+ import metanet_jax.data {r['import_s']:.2f} s; whole process {wall:.2f} s)"
    )

    images = jax.device_put(data.load_omniglot("standard", data_dir=args.data_dir)["train"].images)
    ways, shots, queries, batch = 5, 1, 10, 16
    sample = lambda k: data.sample_episodes(k, images, ways, shots, queries, batch)
    keys = jax.random.split(jax.random.key(0), args.iters + 5)
    for k in keys[:5]:  # compile and warm up
        jax.block_until_ready(sample(k))
    t = time.perf_counter()
    for k in keys[5:]:
        result = sample(k)
    jax.block_until_ready(result)
    dt = time.perf_counter() - t
    print(
        f"sampler {ways}-way {shots}-shot, {queries} queries/class, batch {batch} "
        f"({jax.devices()[0].platform}): {args.iters * batch / dt:,.0f} episodes/s "
        f"({dt / args.iters * 1e3:.2f} ms per batch)"
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
