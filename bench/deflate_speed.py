#!/usr/bin/env python3
"""Deflate and CRC-32 speed of zipmiddleware.compression (ISA-L when installed) against stock zlib.

    .venv/bin/python bench/deflate_speed.py                  # 32 MB log, 16 MB words, 16 MB random; median of 3
    .venv/bin/python bench/deflate_speed.py --only log       # one data set (--only may be repeated)
    .venv/bin/python bench/deflate_speed.py --clock wall     # wall-clock time instead of CPU time
    .venv/bin/python bench/deflate_speed.py --log-mb 4 --words-mb 4 --random-mb 4 --repeat 1   # smoke run

Data sets, generated in memory from --seed, so every run compresses the same bytes (their
sha256 is printed):
  log     web-server access-log lines (combined format plus a request time): 3,000 clients,
          each making a short run of requests, over a catalogue of 1,200 files of fixed
          sizes; 28 user agents. Redundant like real logs: zlib 6 keeps ~11%.
  words   lines of pseudo-words drawn from a Zipf law (vocabulary of 8,000 made of letters
          in English frequency order), with punctuation but no grammar: zlib 6 keeps ~43%,
          about what it keeps of English prose, or a little more.
  random  random bytes, incompressible: what deflate costs on already compressed files.

Every compressor is fed the data in --piece-size pieces (64 KiB, the middleware's default
chunk_size) with compress(), then flush(). MB/s counts input bytes (1 MB = 10**6 bytes) per
second of this thread's CPU time (time.thread_time), so that other processes on a shared
machine skew the figures little; on an idle machine that is the wall-clock speed, which
--clock wall measures instead. ratio = output / input; "x z6" = output / zlib 6's output.

Compressors: zlib's compressobj(level, DEFLATED, -15) at levels 1, 6 and 9, and
zipmiddleware.compression.compressobj(level) for levels 1-9 (the ISA-L level in brackets).
Each figure is the median of --repeat runs; the first run of each of ours is also inflated
with zlib and compared with the input. CRC-32: 64 MiB of random bytes in --piece-size pieces
and in 1 MiB pieces, zlib.crc32 against zipmiddleware.compression.crc32 (GB/s, values
checked equal).

Target, on each text data set: our fastest level (1) deflates at >= 500 MB/s and its output
is at most 5% larger than zlib level 6's. Runs in about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import platform
import random
import statistics
import sys
import time
import zlib
from collections.abc import Callable

from zipmiddleware import compression
from zipmiddleware.compression import COMPRESSOR, CRC32_NAME, LEVELS, Compressor

MB = 10**6
SPEED_TARGET = 500  # MB/s at our level 1
SIZE_TARGET = 1.05  # at most this times zlib 6's output, at our level 1
TEXT_SETS = ("log", "words")
# What times one run: this thread's CPU time by default, wall-clock time with --clock wall.
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.thread_time, "wall": time.perf_counter}


# -- the data sets --------------------------------------------------------------------------


def log_lines(size: int, seed: int) -> bytes:
    """Access-log lines, each visit a few requests from one client."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    games = ["".join(rng.choices(letters, k=rng.randint(4, 12))) for _ in range(300)]
    kinds = [
        "disc1.bin",
        "disc2.bin",
        "manual.pdf",
        "cover.jpg",
        "patch-1.2.zip",
        "soundtrack.ogg",
        "readme.txt",
    ]
    files = [
        (f"/files/{game}/{kind}", rng.randrange(1000, 1 << 31))
        for game in games
        for kind in rng.sample(kinds, 4)
    ]
    platforms = ("Windows NT 10.0; Win64; x64", "X11; Linux x86_64", "Macintosh; Intel Mac OS X 10_15_7")
    agents = [
        f"Mozilla/5.0 ({system}) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{version}.0.0.0 Safari/537.36"
        for system in platforms
        for version in range(118, 123)
    ]
    agents += [
        f"Mozilla/5.0 (X11; Linux x86_64; rv:{v}.0) Gecko/20100101 Firefox/{v}.0" for v in range(115, 124)
    ]
    agents += ["curl/8.5.0", "Wget/1.21.4", "aria2/1.37.0", "python-requests/2.31.0"]
    clients = [
        (
            f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
            rng.choice(agents),
        )
        for _ in range(3000)
    ]
    statuses = [200] * 80 + [206] * 10 + [304] * 6 + [404] * 3 + [500]
    when = 1_764_000_000
    lines: list[str] = []
    total = 0
    while total < size:
        ip, agent = rng.choice(clients)
        referer = f"https://library.example/games/{rng.choice(games)}"
        for _ in range(rng.randint(1, 6)):
            when += rng.random() < 0.3
            stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(when))
            path, length = rng.choice(files)
            status = rng.choice(statuses)
            sent = {200: length, 206: rng.randrange(length), 304: 0}.get(status, 153)
            line = (
                f'{ip} - - [{stamp}] "GET {path} HTTP/1.1" {status} {sent} "{referer}" "{agent}"'
                f" rt={rng.random() * 2:.3f}\n"
            )
            lines.append(line)
            total += len(line)
    return "".join(lines).encode()[:size]


def zipf_words(size: int, seed: int) -> bytes:
    """Lines of Zipf-distributed pseudo-words.

    Words are drawn through a table of 65,536 slots, each holding a word and the separator
    after it (a space mostly; a comma, a full stop or a line end sometimes), filled in
    proportion to the word's Zipf-Mandelbrot weight; random 16-bit numbers pick the slots.
    """
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [1 / (rank + 3) for rank in range(len(letters))]
    vocabulary: list[str] = []
    seen: set[str] = set()
    while len(vocabulary) < 8000:
        word = "".join(rng.choices(letters, weights, k=max(1, round(rng.lognormvariate(1.5, 0.5)))))
        if word not in seen:
            seen.add(word)
            vocabulary.append(word)
    slots = 1 << 16
    cumulative = list(itertools.accumulate(1 / (rank + 2.7) for rank in range(len(vocabulary))))
    scale = slots / cumulative[-1]
    table: list[bytes] = []
    for word, top in zip(vocabulary, cumulative, strict=True):
        while len(table) < round(top * scale):
            separator = rng.choices((" ", ", ", ". ", "\n"), (80, 6, 5, 9))[0]
            table.append((word + separator).encode())
    table += [table[-1]] * (slots - len(table))
    out = bytearray()
    while len(out) < size:
        picks = memoryview(rng.randbytes(2 * 65536)).cast("H")
        out += b"".join(map(table.__getitem__, picks))
    return bytes(out[:size])


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


GENERATORS: dict[str, tuple[str, Callable[[int, int], bytes]]] = {
    "log": ("log lines", log_lines),
    "words": ("Zipf words", zipf_words),
    "random": ("random bytes", random_bytes),
}


# -- measuring ------------------------------------------------------------------------------


def deflate(make: Callable[[], Compressor], data: bytes, piece: int) -> bytes:
    compressor = make()
    view = memoryview(data)
    out = [compressor.compress(view[offset : offset + piece]) for offset in range(0, len(data), piece)]
    out.append(compressor.flush())
    return b"".join(out)


def deflate_runs(
    make: Callable[[], Compressor],
    data: bytes,
    piece: int,
    repeat: int,
    check: bool,
    clock: Callable[[], float],
) -> tuple[float, float, list[float]]:
    """(median MB/s, ratio, MB/s of every run); with ``check``, the output must inflate to ``data``."""
    speeds = []
    size = 0
    for run in range(repeat):
        start = clock()
        output = deflate(make, data, piece)
        elapsed = clock() - start
        speeds.append(len(data) / MB / elapsed)
        size = len(output)
        if check and run == 0:
            inflater = zlib.decompressobj(-15)
            if inflater.decompress(output) + inflater.flush() != data or not inflater.eof:
                raise SystemExit(f"{make}: the deflate stream does not inflate back to the input")
        del output
    return statistics.median(speeds), size / len(data), speeds


def crc_speed(
    crc: Callable[[memoryview, int], int], data: bytes, piece: int, repeat: int, clock: Callable[[], float]
) -> tuple[float, int]:
    """(median GB/s, CRC-32) of ``data`` fed in ``piece``-byte pieces."""
    view = memoryview(data)
    speeds = []
    value = 0
    for _ in range(repeat):
        start = clock()
        value = 0
        for offset in range(0, len(data), piece):
            value = crc(view[offset : offset + piece], value)
        speeds.append(len(data) / 1e9 / (clock() - start))
    return statistics.median(speeds), value


# -- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--log-mb", type=float, default=32, help="size of the log data set in MB (default 32)"
    )
    parser.add_argument(
        "--words-mb", type=float, default=16, help="size of the words data set in MB (default 16)"
    )
    parser.add_argument(
        "--random-mb", type=float, default=16, help="size of the random data set in MB (default 16)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per figure; the median counts (default 3)"
    )
    parser.add_argument(
        "--piece-size", type=int, default=65536, help="bytes per compress() call (default 65536)"
    )
    parser.add_argument("--seed", type=int, default=2026, help="seed of the data sets (default 2026)")
    parser.add_argument(
        "--only", choices=sorted(GENERATORS), action="append", help="data set(s) to run (default all)"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="time per run: this thread's CPU time (default) or wall",
    )
    args = parser.parse_args()
    sizes = {"log": args.log_mb, "words": args.words_mb, "random": args.random_mb}
    if args.repeat < 1 or args.piece_size < 1 or min(sizes.values()) <= 0:
        parser.error("--repeat, --piece-size and the sizes must be positive")
    clock = CLOCKS[args.clock]
    names = [name for name in GENERATORS if name in (args.only or GENERATORS)]
    began, cpu_began = time.perf_counter(), time.process_time()

    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, "
        f"zlib {zlib.ZLIB_RUNTIME_VERSION}, ours: {COMPRESSOR}, "
        f"{args.piece_size // 1024} KiB pieces, median of {args.repeat}, {args.clock} time\n"
    )
    data_sets: dict[str, bytes] = {}
    for name in names:
        label, generate = GENERATORS[name]
        size = round(sizes[name] * MB)
        started = time.perf_counter()
        data_sets[name] = generate(size, args.seed)
        digest = hashlib.sha256(data_sets[name]).hexdigest()[:16]
        print(
            f"{name:<7} {label}: {size / MB:.1f} MB, sha256 {digest}..., built in {time.perf_counter() - started:.1f} s"
        )
    print()

    def zlib_maker(level: int) -> Callable[[], Compressor]:
        return lambda: zlib.compressobj(level, zlib.DEFLATED, -15)

    def our_maker(level: int) -> Callable[[], Compressor]:
        return lambda: compression.compressobj(level)

    isal = COMPRESSOR.startswith("isal/")
    rows: list[tuple[str, Callable[[], Compressor], bool]] = [
        (f"zlib {level}", zlib_maker(level), False) for level in (1, 6, 9)
    ]
    rows += [
        (f"ours {level}" + (f" [isal {LEVELS[level]}]" if isal else " [zlib]"), our_maker(level), True)
        for level in range(1, 10)
    ]
    results: dict[tuple[str, str], tuple[float, float, list[float]]] = {}
    for name, data in data_sets.items():
        for label, make, check in rows:
            results[label, name] = deflate_runs(make, data, args.piece_size, args.repeat, check, clock)

    width = max(len(label) for label, _, _ in rows)
    header = f"{'compressor':<{width}}"
    for name in data_sets:
        header += f" | {name + ' MB/s':>13} {'ratio':>6} {'x z6':>5}"
    print(header)
    print("-" * len(header))
    for label, _, _ in rows:
        line = f"{label:<{width}}"
        for name in data_sets:
            speed, ratio, _ = results[label, name]
            line += f" | {speed:>13,.0f} {ratio:>6.4f} {ratio / results['zlib 6', name][1]:>5.3f}"
        print(line)
    print("(x z6: output size relative to zlib level 6 on the same data)")

    crc_data = random_bytes(64 << 20, args.seed + 1)
    print()
    for piece in sorted({args.piece_size, 1 << 20}):
        stock, stock_value = crc_speed(zlib.crc32, crc_data, piece, args.repeat, clock)
        ours, our_value = crc_speed(compression.crc32, crc_data, piece, args.repeat, clock)
        if stock_value != our_value:
            raise SystemExit(f"CRC-32 differs: zlib {stock_value:08x}, ours {our_value:08x}")
        print(
            f"CRC-32 of 64 MiB in {piece // 1024} KiB pieces: zlib {stock:.2f} GB/s, "
            f"ours ({CRC32_NAME}) {ours:.2f} GB/s, x{ours / stock:.2f}"
        )

    met = True
    if any(name in TEXT_SETS for name in data_sets):
        print()
    for name in data_sets:
        if name not in TEXT_SETS:
            continue
        speed, ratio, runs = results["ours 1" + (" [isal 1]" if isal else " [zlib]"), name]
        relative = ratio / results["zlib 6", name][1]
        ok = speed >= SPEED_TARGET and relative <= SIZE_TARGET
        met = met and ok
        failing = [
            what
            for what, good in (("speed", speed >= SPEED_TARGET), ("size", relative <= SIZE_TARGET))
            if not good
        ]
        print(
            f"target on {name}: level 1 at {speed:,.0f} MB/s (>= {SPEED_TARGET}; runs "
            f"{', '.join(f'{run:,.0f}' for run in runs)}) and {relative:.3f} x zlib 6's size "
            f"(<= {SIZE_TARGET}): " + ("met" if ok else f"NOT MET ({', '.join(failing)})")
        )
    if any(name in TEXT_SETS for name in data_sets):
        print(f"target on every text data set: {'met' if met else 'NOT MET'}")
    print(
        f"\n(ran {time.perf_counter() - began:.0f} s, {time.process_time() - cpu_began:.0f} s of CPU; "
        f"load {os.getloadavg()[0]:.2f})"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
