#!/usr/bin/python3
"""The same 60 checks of this machine with Phoenix (goss format), serverspec (local backend)
and testinfra, in one run. Prints the median wall time of each and the ratios.

Usage: run.py PHOENIX_BINARY [RUNS]
"""

import http.server
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PHOENIX = sys.argv[1]
RUNS = int(sys.argv[2]) if len(sys.argv) > 2 else 5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_fixture():
    """A real HTTP server on loopback: the port, process and http checks look at it."""
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler)
    server.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return port


def checks(port, closed):
    """The 60 checks, as (kind, subject, attribute, expected)."""
    c = []
    for path in ["/etc/passwd", "/etc/group", "/etc/login.defs", "/etc/nsswitch.conf", "/etc/debian_version"]:
        c += [("file", path, "exists", True), ("file", path, "owner", "root"), ("file", path, "mode", "0644")]
    for path in ["/var", "/usr/bin", "/etc"]:
        c += [("file", path, "directory", True)]
    c += [("file", "/etc/passwd", "contains", "root:x:0:0"), ("file", "/phoenix/nonexistent", "exists", False),
          ("file", "/etc/shells", "exists", True)]
    c += [("port", port, "listening", True), ("port", closed, "listening", False), ("port", closed + 1, "listening", False)]
    c += [("process", "python3", "running", True), ("process", "phxbenchnope", "running", False)]
    c += [("command", "true", "exit", 0), ("command", "false", "exit", 1), ("command", "uname -s", "stdout", "Linux"),
          ("command", "echo phoenix", "stdout", "phoenix"), ("command", "printf abc", "stdout", "abc"),
          ("command", "test -d /etc", "exit", 0), ("command", "sh -c 'exit 3'", "exit", 3),
          ("command", "id -u", "stdout", str(os.getuid()))]
    for user, uid in [("root", 0), ("daemon", 1), ("bin", 2), ("nobody", 65534)]:
        c += [("user", user, "exists", True), ("user", user, "uid", uid)]
    c += [("user", "phxbenchnope", "exists", False), ("user", "root", "home", "/root")]
    for group in ["root", "daemon", "adm", "bin", "sys"]:
        c += [("group", group, "exists", True)]
    for package in ["bash", "coreutils", "dpkg", "grep", "sed", "tar", "gzip", "findutils"]:
        c += [("package", package, "installed", True)]
    c += [("package", "phoenix-nonexistent", "installed", False)]
    url = f"http://127.0.0.1:{port}/"
    c += [("http", url, "status", 200), ("http", url + "nope", "status", 404)]
    assert len(c) == 60, len(c)
    return c


def goss(cs):
    by_kind = {}
    for kind, subject, attr, want in cs:
        if kind == "file":
            key, attr, want = (subject, "filetype", "directory") if attr == "directory" else (subject, attr, want)
            if attr == "contains":
                attr, want = "contents", [want]
            by_kind.setdefault("file", {}).setdefault(key, {})[attr] = want
        elif kind == "port":
            by_kind.setdefault("port", {})[f"tcp:{subject}"] = {"listening": want}
        elif kind == "process":
            by_kind.setdefault("process", {})[subject] = {"running": want}
        elif kind == "command":
            entry = by_kind.setdefault("command", {}).setdefault(subject, {})
            entry["exit-status" if attr == "exit" else "stdout"] = want if attr == "exit" else [want]
        elif kind == "user":
            by_kind.setdefault("user", {}).setdefault(subject, {})[attr] = want
        elif kind == "group":
            by_kind.setdefault("group", {})[subject] = {"exists": want}
        elif kind == "package":
            by_kind.setdefault("package", {})[subject] = {"installed": want}
        elif kind == "http":
            by_kind.setdefault("http", {})[subject] = {"status": want}
    import json
    return json.dumps(by_kind, indent=1)


def rb(s):
    return "'" + str(s).replace("\\", "\\\\").replace("'", "\\'") + "'"


def serverspec(cs):
    out = ["require 'serverspec'", "set :backend, :exec", ""]
    for kind, subject, attr, want in cs:
        neg = "to" if want not in (False,) else "not_to"
        if kind == "file":
            body = {"exists": lambda: f"it {{ is_expected.{neg} exist }}",
                    "owner": lambda: f"it {{ is_expected.to be_owned_by {rb(want)} }}",
                    "mode": lambda: f"it {{ is_expected.to be_mode {want[1:]} }}",
                    "directory": lambda: "it { is_expected.to be_directory }",
                    "contains": lambda: f"its(:content) {{ is_expected.to include {rb(want)} }}"}[attr]()
            out.append(f"describe file({rb(subject)}) do\n  {body}\nend")
        elif kind == "port":
            out.append(f"describe port({subject}) do\n  it {{ is_expected.{neg} be_listening.with('tcp') }}\nend")
        elif kind == "process":
            out.append(f"describe process({rb(subject)}) do\n  it {{ is_expected.{neg} be_running }}\nend")
        elif kind == "command":
            body = f"its(:exit_status) {{ is_expected.to eq {want} }}" if attr == "exit" else f"its(:stdout) {{ is_expected.to include {rb(want)} }}"
            out.append(f"describe command({rb(subject)}) do\n  {body}\nend")
        elif kind == "user":
            body = {"exists": f"it {{ is_expected.{neg} exist }}", "uid": f"it {{ is_expected.to have_uid {want} }}",
                    "home": f"it {{ is_expected.to have_home_directory {rb(want)} }}"}[attr]
            out.append(f"describe user({rb(subject)}) do\n  {body}\nend")
        elif kind == "group":
            out.append(f"describe group({rb(subject)}) do\n  it {{ is_expected.to exist }}\nend")
        elif kind == "package":
            out.append(f"describe package({rb(subject)}) do\n  it {{ is_expected.{neg} be_installed }}\nend")
        elif kind == "http":
            cmd = f"curl -s -o /dev/null -w '%{{http_code}}' {subject}"
            out.append(f"describe command({rb(cmd)}) do\n  its(:stdout) {{ is_expected.to eq '{want}' }}\nend")
    return "\n".join(out) + "\n"


def testinfra(cs):
    out = []
    for i, (kind, subject, attr, want) in enumerate(cs):
        s = repr(subject)
        if kind == "file":
            expr = {"exists": lambda: f"host.file({s}).exists == {want}",
                    "owner": lambda: f"host.file({s}).user == {want!r}",
                    "mode": lambda: f"host.file({s}).mode == 0o{want[1:]}",
                    "directory": lambda: f"host.file({s}).is_directory",
                    "contains": lambda: f"host.file({s}).contains({want!r})"}[attr]()
        elif kind == "port":
            expr = f"host.socket('tcp://127.0.0.1:{subject}').is_listening == {want}"
        elif kind == "process":
            expr = f"(len(host.process.filter(comm={s})) > 0) == {want}"
        elif kind == "command":
            expr = f"host.run({s}).rc == {want}" if attr == "exit" else f"{want!r} in host.run({s}).stdout"
        elif kind == "user":
            expr = {"exists": f"host.user({s}).exists == {want}", "uid": f"host.user({s}).uid == {want}",
                    "home": f"host.user({s}).home == {want!r}"}[attr]
        elif kind == "group":
            expr = f"host.group({s}).exists"
        elif kind == "package":
            expr = f"host.package({s}).is_installed == {want}"
        elif kind == "http":
            expr = f"host.run(\"curl -s -o /dev/null -w '%{{http_code}}' {subject}\").stdout == '{want}'"
        out.append(f"def test_{i}(host):\n    assert {expr}\n")
    return "\n".join(out)


def timed(argv, cwd):
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{argv[0]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return elapsed


def main():
    port = start_fixture()
    closed = free_port()
    cs = checks(port, closed)
    work = tempfile.mkdtemp(prefix="phoenix-bench-verify-")
    with open(f"{work}/goss.yaml", "w") as f:
        f.write(goss(cs))
    os.makedirs(f"{work}/spec")
    with open(f"{work}/spec/localhost_spec.rb", "w") as f:
        f.write(serverspec(cs))
    with open(f"{work}/test_infra.py", "w") as f:
        f.write(testinfra(cs))
    tools = {
        "phoenix": [PHOENIX, "verify", "--host", "goss.yaml", "--format", "silent"],
        "serverspec": ["rspec", "spec/localhost_spec.rb"],
        "testinfra": ["/usr/bin/python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_infra.py"],
    }
    # Count the examples each tool ran, so that the comparison is like for like.
    rspec = subprocess.run(tools["serverspec"], cwd=work, capture_output=True, text=True).stdout
    pytest = subprocess.run(tools["testinfra"], cwd=work, capture_output=True, text=True).stdout
    print(f"checks: 60 (serverspec: {rspec.strip().splitlines()[-1]}; testinfra: {pytest.strip().splitlines()[-1]})")
    times = {}
    for _ in range(RUNS):
        for name, argv in tools.items():
            times.setdefault(name, []).append(timed(argv, work))
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"{'tool':<12} {'median wall':>12} {'min':>9} {'max':>9}   ({RUNS} runs, 60 checks)")
    for name, t in times.items():
        print(f"{name:<12} {medians[name]*1000:>10.1f}ms {min(t)*1000:>7.1f}ms {max(t)*1000:>7.1f}ms")
    for peer in ["serverspec", "testinfra"]:
        print(f"phoenix is {medians[peer] / medians['phoenix']:.1f}x faster than {peer}")
    # The checks alone, without process start-up: Phoenix's own report.
    out = subprocess.run([PHOENIX, "verify", "--host", "goss.yaml", "--format", "json"], cwd=work, capture_output=True, text=True).stdout
    import json
    print(f"phoenix checks alone (its report): {json.loads(out)['summary']['total-duration'] / 1e6:.1f}ms")


main()
