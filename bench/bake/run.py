"""Bake benchmark: Phoenix vs tar|gzip|sha256sum vs umoci on one 200 MB tree."""
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PHOENIX, RUNS = sys.argv[1], int(sys.argv[2])
MB = 1 << 20


def make_tree(root):
    """About 200 MB, deterministic: what an application image holds."""
    rng = random.Random(42)
    words = [("".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 12))))
             for _ in range(5000)]
    total = 0
    # Source-like text: 3000 files, about 60 MB, compressible about 4x.
    for i in range(3000):
        path = os.path.join(root, "src", f"pkg{i % 60}", f"file{i}.py")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lines = [" ".join(rng.choices(words, k=rng.randint(3, 14))) for _ in range(rng.randint(200, 500))]
        data = "\n".join(lines).encode()
        open(path, "wb").write(data)
        total += len(data)
    # Random binaries: 40 files, 80 MB, incompressible (models, media, compressed assets).
    for i in range(40):
        path = os.path.join(root, "assets", f"blob{i}.bin")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = rng.randbytes(2 * MB)
        open(path, "wb").write(data)
        total += len(data)
    # Log-like text: 4 files, about 40 MB, highly compressible.
    for i in range(4):
        path = os.path.join(root, "data", f"log{i}.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as out:
            written = 0
            n = 0
            while written < 10 * MB:
                line = f"2024-01-01T00:00:{n % 60:02d}Z level=info msg=\"{rng.choice(words)} {rng.choice(words)}\" id={rng.randint(0, 10**9)}\n".encode()
                out.write(line)
                written += len(line)
                n += 1
            total += written
    # Small config files: 2000 of them.
    for i in range(2000):
        path = os.path.join(root, "etc", f"d{i % 40}", f"conf{i}.toml")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = f"name = \"{rng.choice(words)}\"\nport = {rng.randint(1000, 9999)}\n".encode() * rng.randint(1, 40)
        open(path, "wb").write(data)
        total += len(data)
    app = os.path.join(root, "bin", "app")
    os.makedirs(os.path.dirname(app), exist_ok=True)
    open(app, "w").write("#!/bin/sh\necho app\n")
    os.chmod(app, 0o755)
    return total


def timed(command, **kwargs):
    started = time.perf_counter()
    result = subprocess.run(command, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    return time.perf_counter() - started, result.stdout


def median(samples):
    return statistics.median(samples)


def main():
    work = tempfile.mkdtemp(prefix="bench-bake-")
    try:
        ctx = os.path.join(work, "ctx")
        tree = os.path.join(ctx, "tree")
        total = make_tree(tree)
        files = sum(len(f) for _, _, f in os.walk(tree))
        open(os.path.join(ctx, "phoenix.toml"), "w").write(
            '[image.app]\ncopy = [{ src = "tree", dst = "/srv" }]\nentrypoint = ["/srv/bin/app"]\n')
        # Warm the page cache so every tool reads from memory.
        subprocess.run(["tar", "-cf", "/dev/null", "-C", ctx, "tree"], check=True)
        print(f"tree: {files} files, {total / MB:.0f} MB; {os.cpu_count()} CPUs; {RUNS} runs each, medians")

        pipeline = []
        for _ in range(RUNS):
            seconds, out = timed(["sh", "-c",
                                  "tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 "
                                  "-cf - -C tree . | gzip -n | sha256sum"], cwd=ctx)
            pipeline.append(seconds)

        cold, sizes = [], []
        for run in range(RUNS):
            state = os.path.join(work, f"state-cold-{run}")
            seconds, out = timed([PHOENIX, "--state", state, "bake", "--json"], cwd=ctx)
            cold.append(seconds)
            sizes.append(json.loads(out)[0]["size"])
        # Warm: the layer cache holds everything; an unchanged recipe.
        state = os.path.join(work, "state-cold-0")
        warm, inner = [], []
        for _ in range(max(RUNS, 5)):
            seconds, out = timed([PHOENIX, "--state", state, "bake", "--json"], cwd=ctx)
            warm.append(seconds)
            inner.append(json.loads(out)[0]["duration_ms"])
        # One file changed: the copy layer is rebuilt, its sources mostly known to the stat cache.
        changed = []
        for run in range(RUNS):
            open(os.path.join(tree, "etc", "d0", "conf0.toml"), "a").write(f"# change {run}\n")
            seconds, _ = timed([PHOENIX, "--state", state, "bake", "--json"], cwd=ctx)
            changed.append(seconds)

        umoci = []
        for run in range(RUNS):
            layout = os.path.join(work, f"umoci-{run}")
            bundle = os.path.join(work, f"bundle-{run}")
            subprocess.run(["umoci", "init", "--layout", layout], check=True)
            subprocess.run(["umoci", "new", "--image", f"{layout}:t"], check=True)
            subprocess.run(["umoci", "unpack", "--image", f"{layout}:t", bundle], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            shutil.copytree(tree, os.path.join(bundle, "rootfs", "srv"), symlinks=True)
            seconds, _ = timed(["umoci", "repack", "--image", f"{layout}:t", bundle])
            umoci.append(seconds)
            shutil.rmtree(bundle)
            shutil.rmtree(layout)

        p, c, u = median(pipeline), median(cold), median(umoci)
        rows = [
            ("tar --sort=name | gzip -n | sha256sum", p, "1.00x (the practical limit)"),
            ("phoenix bake, cold (empty store)", c, f"{c / p:.2f}x of the pipeline (target <= 1.3x)"),
            ("umoci repack of the same tree", u, f"{u / p:.2f}x of the pipeline; Phoenix is {u / c:.1f}x faster"),
            ("phoenix bake, one file changed", median(changed), f"{median(changed) / p:.2f}x of the pipeline"),
            ("phoenix bake, unchanged (whole command)", median(warm), f"target < 100 ms; bake itself {median(inner):.0f} ms"),
        ]
        for name, seconds, note in rows:
            print(f"{name:<42} {seconds * 1000:>9.1f} ms   {note}")
        print(f"phoenix layer: {median(sizes) / MB:.1f} MB compressed")
    finally:
        subprocess.run(["chmod", "-R", "u+w", work])
        shutil.rmtree(work, ignore_errors=True)


main()
