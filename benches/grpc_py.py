#!/usr/bin/env python3
"""A Python AION client's throughput on aion's gRPC API, against what the same client pushes to a trivial gRPC
server that only answers (the ratio tells whether the runtime's gRPC edge limits a Python pipeline).

Usage (after `cargo build --release --bin aion --example grpc-trivial`; needs grpcio and grpcio-tools):
    python3 benches/grpc_py.py [N] [--json]

`--json` prints one JSON object instead of the lines (the comparison suite, `benches/compare.sh`, reads it for its
`aion-grpc-py` rows).

Rows: unary `SendKanban` calls per second from one client (as AION's library sends outputs: one call per output,
no deadline) to (1) a trivial Python grpc server, (2) aion routing each output to a `delivery: memory` Python
sink on `ReceiveKanban`; and the sink's hop latency at a fixed rate of 500 kanbans/s (p50/p99, send to receive).
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
N = int(ARGS[0]) if ARGS else 5000
JSON = "--json" in sys.argv[1:]
# The latency run: LATENCY_N kanbans at LATENCY_RATE a second.
LATENCY_RATE = 500
LATENCY_N = 2000


def stubs():
    d = tempfile.mkdtemp()
    import grpc_tools

    inc = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO}/transport/proto", f"-I{inc}",
                    f"--python_out={d}", f"--grpc_python_out={d}", "status.proto"], check=True,
                   stdout=sys.stderr)
    sys.path.insert(0, d)
    return d


STUBS = stubs()
import status_pb2  # noqa: E402
import status_pb2_grpc  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402


def message(i):
    m = status_pb2.StatusKanban(priorSuccess=True, connectionKey="default", processNumber=1)
    s = struct_pb2.Struct()
    s.update({"seq": i, "t": time.time()})
    m.metadata.CopyFrom(s)
    return m


def push(addr, name, n):
    ch = grpc.insecure_channel(addr)
    grpc.channel_ready_future(ch).result(timeout=10)
    stub = status_pb2_grpc.KanbanStub(ch)
    t = time.perf_counter()
    for i in range(n):
        stub.SendKanban(status_pb2.Request(microserviceName=name, message=message(i)))
    return n / (time.perf_counter() - t)


class Trivial(status_pb2_grpc.KanbanServicer):
    def SendKanban(self, request, context):
        return status_pb2.Response(status=status_pb2.SUCCESS)


def trivial_rust_rate():
    """The same client against `examples/grpc_trivial.rs` (tonic, answers only): the client's own ceiling."""
    exe = os.path.join(REPO, "target", "release", "examples", "grpc-trivial")
    if not os.path.exists(exe):
        return None
    port = 22000 + os.getpid() % 1000
    p = subprocess.Popen([exe, f"127.0.0.1:{port}"])
    try:
        return push(f"127.0.0.1:{port}", "src", N)
    finally:
        p.kill()
        p.wait()


def trivial_rate():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    status_pb2_grpc.add_KanbanServicer_to_server(Trivial(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        return push(f"127.0.0.1:{port}", "src", N)
    finally:
        server.stop(0)


SINK = r'''
import os, sys, time, json, grpc, status_pb2, status_pb2_grpc
from google.protobuf import json_format
ch = grpc.insecure_channel(os.environ["KANBAN_ADDR"])
s = status_pb2_grpc.KanbanStub(ch).ReceiveKanban(status_pb2.InitializeService(microserviceName="sink", processNumber=1))
with open(os.environ["OUT"], "a") as f:
    for k in s:
        f.write("%f %f\n" % (json_format.MessageToDict(k.metadata)["t"], time.time()))
        f.flush()
'''


def wait_lines(path, n, limit=30.0):
    """Lines in `path` once it has `n` of them, or after `limit` seconds (then fewer: lost or late)."""
    deadline = time.monotonic() + limit
    while True:
        count = sum(1 for line in open(path) if line.strip()) if os.path.exists(path) else 0
        if count >= n or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def aion_rates():
    work = tempfile.mkdtemp()
    sink = os.path.join(work, "sink.py")
    open(sink, "w").write(SINK)
    out = os.path.join(work, "out.txt")
    yml = os.path.join(work, "s.yml")
    open(yml, "w").write(f"""microservices:
  src:
    command: ["sleep", "100000"]
    delivery: memory
    nextService:
      default:
        - name: sink
  sink:
    command: ["{sys.executable}", "{sink}"]
    startup: yes
    always: yes
    delivery: memory
    env:
      PYTHONPATH: "{STUBS}"
      OUT: "{out}"
""")
    aion = os.environ.get("AION_BIN", os.path.join(REPO, "target", "release", "aion"))
    port = 21000 + os.getpid() % 1000
    p = subprocess.Popen([aion, "--data-dir", os.path.join(work, "data"), "run", "--grpc", f"127.0.0.1:{port}", yml],
                         stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            st = subprocess.run([aion, "--data-dir", os.path.join(work, "data"), "status", "--json"],
                                capture_output=True, text=True)
            if st.returncode == 0 and any(i["service"] == "sink" and i["connected"]
                                          for i in json.loads(st.stdout)["instances"]):
                break
            time.sleep(0.1)
        rate = push(f"127.0.0.1:{port}", "src", N)
        # Every output of the closed loop at the sink before the file is emptied for the latency run.
        got = wait_lines(out, N)
        open(out, "w").close()
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = status_pb2_grpc.KanbanStub(ch)
        start = time.perf_counter()
        for i in range(LATENCY_N):
            due = start + i / LATENCY_RATE
            while time.perf_counter() < due:
                time.sleep(0.0002)
            stub.SendKanban(status_pb2.Request(microserviceName="src", message=message(i)))
        wait_lines(out, LATENCY_N)
        lat = sorted((float(b) - float(a)) * 1e6 for a, b in (l.split() for l in open(out) if l.strip()))
        return rate, got, lat[len(lat) // 2], lat[int(len(lat) * 0.99)], len(lat)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)


if __name__ == "__main__":
    trivial = trivial_rate()
    rust = trivial_rust_rate()
    rate, got, p50, p99, n = aion_rates()
    ceiling = max(trivial, rust or 0)
    if JSON:
        print(json.dumps({"n": N, "received": got, "trivial_python": trivial, "trivial_tonic": rust, "aion": rate,
                          "ratio": rate / ceiling, "latency_rate": LATENCY_RATE, "latency_sent": LATENCY_N,
                          "latency_received": n, "hop_p50_us": p50, "hop_p99_us": p99}))
        sys.exit(0)
    print(f"Python client SendKanban to a trivial Python gRPC server: {trivial:,.0f}/s")
    if rust:
        print(f"Python client SendKanban to a trivial tonic server (examples/grpc_trivial.rs): {rust:,.0f}/s")
    print(f"Python client SendKanban to aion, routed to a Python sink: {rate:,.0f}/s (ratio to the best trivial server {rate / ceiling:.2f})")
    print(f"  received at the sink: {got} of {N}")
    print(f"hop latency at {LATENCY_RATE}/s, Python source -> aion -> Python sink: p50 {p50:,.0f} us, p99 {p99:,.0f} us ({n} of {LATENCY_N} kanbans)")
