"""Repair cost at scale, in the simulator: the real sender and receiver state machines with
N receivers, each losing datagrams independently at random.

    .venv/bin/python bench/sim_scale.py [--receivers 10,100,1000] [--loss 0.01] [--pages 2048]

Prints, per N, the bytes sent beyond the first pass (page resends and parity symbols) as a
share of the data, with parity repair and with plain page retransmission. Deterministic: the
same seed gives the same figures on any machine (wall time aside).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import time

from mrsync.engine.simulator import simulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--receivers", default="10,100,1000")
    ap.add_argument("--loss", type=float, default=0.01)
    ap.add_argument("--pages", type=int, default=2048)
    ap.add_argument("--page-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-plain", action="store_true", help="skip plain retransmission runs")
    args = ap.parse_args()
    size = args.page_size * args.pages
    sizes = {0: size}

    @functools.lru_cache(maxsize=4096)
    def content(obj: int, page: int) -> bytes:
        length = min(args.page_size, sizes[obj] - page * args.page_size)
        seed = hashlib.blake2b(f"{obj}:{page}".encode(), digest_size=16).digest()
        return (seed * (length // 16 + 1))[:length]

    print(f"{args.pages} pages of {args.page_size} B, loss {args.loss:.1%} per receiver, "
          f"seed {args.seed}")
    print(f"{'receivers':>9} {'repair':>7} {'repair share':>12} {'identical':>9} {'wall s':>7}")
    for n in (int(x) for x in args.receivers.split(",")):
        for fec in (True, False):
            if not fec and args.no_plain:
                continue
            t0 = time.perf_counter()
            r = simulate(objects=list(sizes.items()), content=content, receivers=n,
                         loss=args.loss, seed=args.seed, page_size=args.page_size, fec=fec)
            wall = time.perf_counter() - t0
            kind = "parity" if fec else "resend"
            print(f"{n:>9} {kind:>7} {r.repair_share:>11.2%} {str(r.all_identical):>9} "
                  f"{wall:>7.1f}")


if __name__ == "__main__":
    main()
