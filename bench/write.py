"""Write-path benchmark: the project's write step against `ssh dd` and a `zstd | ssh | zstd -d | dd` pipeline.

Everything runs on this machine: a real OpenSSH sshd on a loopback address, a loop device over a sparse
file as the target disk, a deterministic sparse GPT test image. Each method is run once to warm up, then
`--runs` times, interleaved (a, b, c, a, b, c, ...) so that drift hits all of them alike. After every run
the disk's content is hashed and compared with what that method must have written.

    python bench/write.py [--size-gib 3] [--runs 5] [--json]

a: ssh root@host 'dd of=DISK bs=4M' < image                                  (OpenSSH, raw)
b: zstd -c image | ssh root@host 'zstd -d | dd of=DISK bs=4M conv=sparse'     (OpenSSH with zstd)
c: dabei_component.disk_writer.write_image, as the component runs it: disk checks, discard and zeroing,
   streaming the prepared (cached) image over asyncssh, verification, seed write, flush.
d: ssh root@host 'zstd -d --sparse -o DISK && sync DISK' < prepared.zst      (OpenSSH, unverified)
e: ssh root@host 'tee >(sha256sum) | zstd -d --sparse -o DISK && sync DISK' < prepared.zst
   (OpenSSH, the compressed stream's sha256 compared with the prepared one)
d and e send c's prepared file and end with the same flush as c (fsync of the block device).
The one-time preparation of c (zstd -3 -T0 and hashing, cached per image) is reported separately.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "component"))

from dabei_firstboot.seed import encode_seed  # noqa: E402
from sshd_fixture import LoopDevices, SshdServer  # noqa: E402

from dabei_component import ssh  # noqa: E402
from dabei_component.disk_writer import WriteProgress, write_image  # noqa: E402
from dabei_component.imaging import PreparedImage, prepare_image  # noqa: E402
from dabei_component.keys import generate_ssh_keypair, known_hosts_line  # noqa: E402
from dabei_component.sim.client import free_port  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
METHODS = "abcde"
EXTENT = 4 * MiB
# BIOS boot, ESP, the seed partition and the root (ZFS) partition, as the project's image has them.
SGDISK_LAYOUT = ["sgdisk", "-o", "-n", "1:2048:+1M", "-t", "1:ef02", "-n", "2:0:+256M", "-t", "2:ef00"]
SGDISK_LAYOUT += ["-c", "2:ESP", "-n", "3:0:+1M", "-c", "3:dabei-seed", "-n", "4:0:0", "-c", "4:root"]
WORDS_TEXT = (
    "nix store lib bin share include python3 site-packages glibc gcc zfs systemd etc usr doc man "
    "openssl libssl.so.3 libcrypto.so.3 ELF x86_64 linux-vdso.so.1 ld-linux-x86-64.so.2 /nix/store "
    "-dev -out -lib .drv .nar propagated-build-inputs nix-support setup-hook patchelf RPATH"
)
WORDS = WORDS_TEXT.split(" ")


def _compressible_corpus(rng: random.Random, size: int) -> bytes:
    """Text and tables like a Nix store: store paths with hashes, words, numbers (zstd -3: about 3:1)."""
    alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
    hashes = ["".join(rng.choice(alphabet) for _ in range(32)) for _ in range(2000)]
    lines = []
    total = 0
    while total < size:
        line = (
            f"/nix/store/{rng.choice(hashes)}-{rng.choice(WORDS)}-{rng.randint(1, 40)}.{rng.randint(0, 9)}"
            f" {' '.join(rng.choices(WORDS, k=rng.randint(2, 9)))} {rng.getrandbits(32):08x}\n"
        )
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


def make_image(path: Path, size: int) -> None:
    """A deterministic GPT image: 20% of it data in 4 MiB extents, half compressible, half random."""
    if path.exists() and path.stat().st_size == size:
        return
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as handle:
        handle.truncate(size)
    subprocess.run(
        [*SGDISK_LAYOUT, str(partial)],
        check=True,
        capture_output=True,
    )
    rng = random.Random(20260101)
    corpus = _compressible_corpus(rng, 16 * MiB)
    first = 300 * MiB // EXTENT  # data starts after the boot, ESP and seed partitions
    slots = list(range(first, size // EXTENT - 1))
    data_extents = sorted(rng.sample(slots, int(size * 0.20) // EXTENT))
    with open(partial, "r+b") as handle:
        for index, extent in enumerate(data_extents):
            if index % 2:
                block = rng.randbytes(EXTENT)
            else:
                start = rng.randrange(0, len(corpus) - EXTENT)
                block = corpus[start : start + EXTENT]
            handle.seek(extent * EXTENT)
            handle.write(block)
    os.replace(partial, path)


def sha256_of(path: str, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        remaining = size
        buffer = bytearray(8 * MiB)
        view = memoryview(buffer)
        while remaining:
            count = handle.readinto(view[: min(len(buffer), remaining)])
            if not count:
                raise RuntimeError(f"{path} ended {remaining} bytes early")
            digest.update(view[:count])
            remaining -= count
    return digest.hexdigest()


def expected_with_seed(image_file: Path, prepared: PreparedImage, seed: bytes) -> str:
    digest = hashlib.sha256()
    padded = seed.ljust(prepared.seed_size, b"\0")
    with open(image_file, "rb") as handle:
        digest.update(handle.read(prepared.seed_offset))
        handle.seek(prepared.seed_offset + prepared.seed_size)
        digest.update(padded)
        while chunk := handle.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def reset_disk(device: str) -> None:
    """Start each run from an empty disk, outside the timing."""
    subprocess.run(["blkdiscard", "-f", device], check=True, capture_output=True)
    subprocess.run(["blockdev", "--flushbufs", device], check=True)


def check_disk(device: str, size: int, expected: str, method: str) -> None:
    subprocess.run(["blockdev", "--flushbufs", device], check=True)
    actual = sha256_of(device, size)
    if actual != expected:
        raise SystemExit(f"method {method}: the disk's sha256 {actual} differs from the expected {expected}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=3.0, help="raw image size (default 3)")
    parser.add_argument("--runs", type=int, default=5, help="measured runs per method after one warm-up")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "dabei-bench-write")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of medians and ratios")
    parser.add_argument("--methods", default="abcde", help="which methods to run, c always included (default abcde)")
    args = parser.parse_args()
    chosen = sorted(set(args.methods) | {"c"})
    if not set(chosen) <= set(METHODS):
        parser.error(f"--methods: choose from {METHODS}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    size = int(args.size_gib * GiB) // MiB * MiB
    if size < 512 * MiB:
        parser.error("--size-gib must be at least 0.5")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(bench(args.work_dir, size, args.runs, args.json, chosen))


async def bench(work: Path, size: int, runs: int, as_json: bool, chosen: list[str]) -> None:
    load_before = list(os.getloadavg())
    image_file = work / f"image-{size // MiB}M.img"
    started = time.monotonic()
    make_image(image_file, size)
    print(f"image {image_file}: {size / GiB:.2f} GiB, made in {time.monotonic() - started:.1f}s", file=sys.stderr)
    raw_sha256 = sha256_of(str(image_file), size)

    zstd3_size = len_of_command(["zstd", "-3", "-c", str(image_file)])
    cache = work / "cache"
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    started = time.monotonic()
    prepared = prepare_image(image_file, cache)
    prepare_seconds = time.monotonic() - started

    address = f"127.78.{random.randint(0, 255)}.{random.randint(2, 254)}"
    server = SshdServer(work / "sshd", address, free_port(address), generate_ssh_keypair(), generate_ssh_keypair())
    loops = LoopDevices(work)
    server.start()
    try:
        device, _ = loops.create(size + 64 * MiB, name="target")
        known_hosts = work / "known_hosts"
        known_hosts.write_text(known_hosts_line(address, server.host.public, port=server.port) + "\n")
        client_key = work / "client_key"
        client_key.write_text(server.client.private_openssh)
        client_key.chmod(0o600)
        ssh_argv = ["ssh", "-F", "none", "-i", str(client_key), "-p", str(server.port)]
        ssh_argv += ["-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes"]
        ssh_argv += ["-o", "BatchMode=yes", f"root@{address}"]

        conn, _ = await ssh.connect(
            address,
            port=server.port,
            client_key=server.client.private_openssh,
            host_key=server.host.public,
            deadline=ssh.deadline_after(10),
        )
        host = generate_ssh_keypair()
        seed = encode_seed(
            {
                "flake": "github:example/infra",
                "hostname": "bench",
                "host_key": {"type": "ssh-ed25519", "private": host.private_openssh, "public": host.public},
                "authorized_keys": [server.client.public],
            }
        )
        c_expected = expected_with_seed(image_file, prepared, seed)

        def run_a() -> None:
            with open(image_file, "rb") as stdin:
                subprocess.run([*ssh_argv, f"dd of={device} bs=4M status=none"], stdin=stdin, check=True)

        def run_b() -> None:
            pipeline = (
                f"zstd -q -c {image_file} | {' '.join(ssh_argv)}"
                f" 'zstd -d -q | dd of={device} bs=4M conv=sparse status=none'"
            )
            subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], check=True)

        peak_rss = [0]

        def sample_rss(_progress: WriteProgress) -> None:
            peak_rss[0] = max(peak_rss[0], rss_bytes())

        async def run_c() -> None:
            await write_image(conn, prepared, disk=device, seed=seed, progress=sample_rss)

        zstd_to_disk = f"zstd -d -q -f --sparse -o {device}"

        def run_d() -> None:
            with open(prepared.compressed_path, "rb") as stdin:
                subprocess.run([*ssh_argv, f"{zstd_to_disk} && sync {device}"], stdin=stdin, check=True)

        def run_e() -> None:
            # The hash goes to stdout after zstd and sync are done; it is compared here, as c compares its own.
            remote = (
                "set -o pipefail; f=$(mktemp); trap 'rm -f $f' EXIT;"
                f" tee >(sha256sum > $f) | {zstd_to_disk} && sync {device} && wait && cat $f"
            )
            with open(prepared.compressed_path, "rb") as stdin:
                out = subprocess.run(
                    [*ssh_argv, f"bash -c {shlex.quote(remote)}"], stdin=stdin, check=True, capture_output=True
                ).stdout
            if out.split()[:1] != [prepared.compressed_sha256.encode()]:
                raise SystemExit(f"method e: the host hashed {out[:64]!r}, expected {prepared.compressed_sha256}")

        every: dict[str, tuple[Callable[[], object], str]] = {
            "a": (run_a, raw_sha256),
            "b": (run_b, raw_sha256),
            "c": (run_c, c_expected),
            "d": (run_d, raw_sha256),
            "e": (run_e, raw_sha256),
        }
        methods = {name: every[name] for name in chosen}
        seconds: dict[str, list[float]] = {name: [] for name in methods}
        for round_ in range(runs + 1):
            for name, (run, expected) in methods.items():
                reset_disk(device)
                t0 = time.monotonic()
                result = run()
                if asyncio.iscoroutine(result):
                    await result
                elapsed = time.monotonic() - t0
                check_disk(device, size, expected, name)
                label = "warm-up" if round_ == 0 else f"run {round_}"
                print(f"{label} {name}: {elapsed:.2f}s", file=sys.stderr)
                if round_:
                    seconds[name].append(elapsed)
        conn.close()
    finally:
        loops.release()
        server.stop()

    medians = {name: statistics.median(values) for name, values in seconds.items()}
    wire = {"a": size, "b": zstd3_size, "c": prepared.compressed_size, "d": prepared.compressed_size}
    wire["e"] = prepared.compressed_size
    result: dict[str, object] = {
        "benchmark": "write",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "image_bytes": size,
        "runs": runs,
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "median_seconds": {name: round(value, 3) for name, value in medians.items()},
        "min_max_seconds": {name: [round(min(v), 3), round(max(v), 3)] for name, v in seconds.items()},
        "raw_bytes_per_second": {name: round(size / value) for name, value in medians.items()},
        "wire_bytes": {name: wire[name] for name in medians},
        "zstd3_bytes": zstd3_size,
        "prepare_once_seconds": round(prepare_seconds, 3),
        "wire_bytes_ratio": round(prepared.compressed_size / zstd3_size, 4),
        # Sampled at each progress report of c: the write path streams, so this does not grow with the image.
        "c_process_rss_mb": round(peak_rss[0] / MiB, 1),
    }
    # c over each peer: the ratio of medians, and the median and range of the per-round ratios (each
    # round runs the methods back to back, so drift in the machine's load cancels within a round).
    for peer, key in PEERS.items():
        if peer in seconds:
            per_round = [c / other for c, other in zip(seconds["c"], seconds[peer], strict=True)]
            result[key] = round(medians["c"] / medians[peer], 3)
            result[key + "_per_round"] = {
                "median": round(statistics.median(per_round), 3),
                "min": round(min(per_round), 3),
                "max": round(max(per_round), 3),
            }
    print_table(result)
    if as_json:
        print(json.dumps(result))


PEERS = {
    "a": "ratio_vs_ssh_dd",
    "b": "ratio_vs_zstd_pipeline",
    "d": "ratio_vs_openssh_zstd_unverified",
    "e": "ratio_vs_openssh_zstd_verified",
}


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def len_of_command(argv: list[str]) -> int:
    process = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert process.stdout is not None
    total = 0
    while chunk := process.stdout.read(8 * MiB):
        total += len(chunk)
    if process.wait() != 0:
        raise SystemExit(f"{argv[0]} failed")
    return total


def print_table(result: dict[str, Any]) -> None:
    print(f"{'method':<8}{'median s':>10}{'min s':>8}{'max s':>8}{'raw MB/s':>10}{'wire MB':>10}")
    for name in result["median_seconds"]:
        low, high = result["min_max_seconds"][name]
        print(
            f"{name:<8}{result['median_seconds'][name]:>10.2f}{low:>8.2f}{high:>8.2f}"
            f"{result['raw_bytes_per_second'][name] / 1e6:>10.0f}{result['wire_bytes'][name] / 1e6:>10.1f}"
        )
    for key in (*PEERS.values(), "wire_bytes_ratio", "prepare_once_seconds", "load_average_before"):
        if key in result:
            print(
                f"{key}: {result[key]}"
                + (f" per round {result[key + '_per_round']}" if key + "_per_round" in result else "")
            )


if __name__ == "__main__":
    main()
