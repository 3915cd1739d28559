"""Constant keep-alive HTTP load for the benchmarks: GET / from N threads until SIGTERM,
then prints "sent failed". A request fails on any error or a status other than 200.

Usage: python3 bench/load.py HOST:PORT [THREADS]
"""
import http.client
import signal
import sys
import threading

host, port = sys.argv[1].rsplit(":", 1)
threads_count = int(sys.argv[2]) if len(sys.argv) > 2 else 4
sent = failed = 0
lock, stop = threading.Lock(), threading.Event()


def client():
    global sent, failed
    conn = None
    while not stop.is_set():
        ok = False
        try:
            conn = conn or http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", "/")
            response = conn.getresponse()
            ok = response.status == 200 and len(response.read()) > 0
        except Exception:
            conn = None
        with lock:
            sent += 1
            failed += not ok


signal.signal(signal.SIGTERM, lambda *_: stop.set())
threads = [threading.Thread(target=client) for _ in range(threads_count)]
for t in threads:
    t.start()
stop.wait()
for t in threads:
    t.join()
print(sent, failed)
