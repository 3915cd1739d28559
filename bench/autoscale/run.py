"""Autoscaling and chaos scenarios against a real `phoenix up` and the hello app."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime


def at_ms(event):
    """A journal event's time (RFC 3339, `...Z`) in Unix milliseconds."""
    return int(datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp() * 1000)

BIN, STEADY, CHAOS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
PHOENIX = os.path.join(BIN, "phoenix")


def fleet(directory, role_extra):
    text = f"""[image.hello]
context = "{BIN}"
copy = [{{ src = "hello", dst = "/bin/hello", libraries = true }}]
env = {{ VERSION = "v1" }}
entrypoint = ["/bin/hello"]

[role.web]
image = "hello"
instances = 1
listen = "127.0.0.1:0"
stop_timeout = "5s"
network = "host"

[role.web.health]
interval = "200ms"
timeout = "1s"
healthy_threshold = 2
unhealthy_threshold = 2
{role_extra}"""
    open(os.path.join(directory, "phoenix.toml"), "w").write(text)


class Up:
    def __init__(self, directory):
        self.dir = directory
        self.log = open(os.path.join(directory, "up.log"), "w")
        self.proc = subprocess.Popen([PHOENIX, "--state", "state", "up"], cwd=directory,
                                     stdout=self.log, stderr=self.log)
        deadline = time.time() + 60
        while time.time() < deadline:
            status = self.status()
            if status and status["roles"][0]["live_generation"]:
                self.proxy = status["roles"][0]["listen"]
                return
            time.sleep(0.1)
        raise SystemExit("phoenix up did not serve; see " + self.log.name)

    def cli(self, *args):
        return subprocess.run([PHOENIX, "--state", "state", *args], cwd=self.dir,
                              capture_output=True, text=True)

    def status(self):
        out = self.cli("status", "--json")
        return json.loads(out.stdout) if out.returncode == 0 else None

    def live(self):
        role = self.status()["roles"][0]
        for generation in role["generations"]:
            if generation["id"] == role["live_generation"]:
                return generation["instances"]
        return []

    def history(self):
        return json.loads(self.cli("history", "web", "--json", "--limit", "100000").stdout)

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)


def load(proxy, rps, seconds):
    return subprocess.Popen([PHOENIX, "load", f"http://{proxy}/", "--rps", str(rps),
                             "--duration", f"{seconds}s", "--json"],
                            stdout=subprocess.PIPE, text=True)


def step_and_steady(work):
    directory = os.path.join(work, "step")
    os.makedirs(directory)
    fleet(directory, """
[role.web.autoscale]
min = 1
max = 8
metric = "rps_per_instance"
target = 100
interval = "1s"
window = "2s"
warmup = "2s"
stabilization = "30s"
""")
    up = Up(directory)
    try:
        rps = 400
        settle = 35  # the 30 s stabilization window, and a little more
        started = time.time()
        generator = load(up.proxy, rps, 20 + settle + STEADY)
        first_serving = final = None
        while time.time() - started < 20:
            healthy = [i for i in up.live() if i["status"] == "healthy"]
            if first_serving is None and len(healthy) > 1:
                first_serving = time.time() - started
            if len(healthy) >= rps // 100:
                final = time.time() - started
                break
            time.sleep(0.05)
        peak = len(up.live())
        # Let a first overshoot settle (HPA's ceil can round 4.1 up to 5), then hold the same
        # rate for STEADY seconds and count the size changes.
        time.sleep(max(0.0, 20 - (time.time() - started)) + settle)
        size = len(up.live())
        before = len([e for e in up.history() if e["kind"] == "autoscale.scaled"])
        time.sleep(STEADY)
        changes = len([e for e in up.history() if e["kind"] == "autoscale.scaled"]) - before
        report = json.loads(generator.communicate()[0])
        return first_serving, final, peak, size, changes, report, rps
    finally:
        up.stop()


def chaos(work):
    directory = os.path.join(work, "chaos")
    os.makedirs(directory)
    fleet(directory, """
[role.web.chaos]
every = "2s"
min_healthy = 2
""")
    text = open(os.path.join(directory, "phoenix.toml")).read().replace("instances = 1", "instances = 4")
    open(os.path.join(directory, "phoenix.toml"), "w").write(text)
    up = Up(directory)
    try:
        report = json.loads(load(up.proxy, 300, CHAOS).communicate()[0])
        time.sleep(3)
        history = up.history()
        kills = {e["detail"]["instance"]: at_ms(e) for e in history if e["kind"] == "chaos.killed"}
        healthy = {e["detail"]["instance"]: at_ms(e) for e in history if e["kind"] == "instance.healthy"}
        started, serving = [], []
        for e in history:
            if e["kind"] == "instance.replaced" and e["detail"]["instance"] in kills:
                killed = kills[e["detail"]["instance"]]
                started.append(at_ms(e) - killed)
                if e["detail"]["replacement"] in healthy:
                    serving.append(healthy[e["detail"]["replacement"]] - killed)
        return report, len(kills), sorted(started), sorted(serving)
    finally:
        up.stop()


def main():
    work = tempfile.mkdtemp(prefix="bench-autoscale-")
    try:
        first, final, peak, size, changes, steady, rps = step_and_steady(work)
        print(f"load step 0 -> {rps} rps on 1 instance (target 100 rps per instance, samples every 1 s, "
              f"evaluation every 1 s):")
        print(f"  first new instance serving     {first:.2f} s after the step (target < 5 s)" if first else
              "  no new instance within 20 s")
        print(f"  {rps // 100} instances serving          {final:.2f} s after the step (size then {peak})"
              if final else f"  size {peak} after 20 s")
        print(f"  settled at {size} instances after the 30 s stabilization window")
        print(f"  steady {rps} rps for {STEADY} s after settling: {changes} size changes (flapping: 0 expected); "
              f"load p50 {steady['latency_ms']['p50']:.2f} ms, p99 {steady['latency_ms']['p99']:.2f} ms, "
              f"{steady['errors']} errors of {steady['scheduled']}")
        report, kills, started, serving = chaos(work)
        print(f"chaos: one kill every 2 s (mean) for {CHAOS} s on 4 instances at 300 rps:")
        print(f"  {kills} instances killed, {report['errors']} failed requests of {report['scheduled']} "
              f"(target 0)")
        for what, times in (("replacement started", started), ("replacement healthy", serving)):
            if times:
                print(f"  kill to {what}: median {times[len(times) // 2]} ms, max {times[-1]} ms "
                      f"({len(times)} of {kills})")
    finally:
        subprocess.run(["chmod", "-R", "u+w", work])
        shutil.rmtree(work, ignore_errors=True)


main()
