#!/usr/bin/env python3
"""The partition of an ecst event: FNV-1a 32 of aggregateId's UTF-8 bytes, mod N.

Usage: partition.py ID N [ID N ...]   or   one `ID<TAB>N` a line on standard input.
Prints `<id>\t<hash hex>\t<N>\t<partition>` for each; the key to XADD to is
`S:{S:<partition>}` for a stream S with N > 1 partitions, and S itself for N = 1.
"""
import sys


def fnv1a_32(data: bytes) -> int:
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def partition_of(aggregate_id: str, n: int) -> int:
    return fnv1a_32(aggregate_id.encode("utf-8")) % n if n > 1 else 0


def main() -> None:
    sys.stdout.reconfigure(encoding="utf-8")
    args = sys.argv[1:]
    if args:
        pairs = list(zip(args[0::2], args[1::2]))
    else:
        sys.stdin.reconfigure(encoding="utf-8")
        pairs = [line.rstrip("\n").rsplit("\t", 1) for line in sys.stdin if line.strip("\n")]
    for aggregate_id, n in pairs:
        n = int(n)
        h = fnv1a_32(aggregate_id.encode("utf-8"))
        print(f"{aggregate_id}\t{h:08x}\t{n}\t{partition_of(aggregate_id, n)}")


if __name__ == "__main__":
    main()
