#!/usr/bin/env python3
"""Footprint of cluster mode: a master-aion and a worker-aion on loopback, the worker's link to the master up
(a source on the worker sent its kanbans to a sink on the master, then both idle); reports each runtime's RSS
and CPU over an idle window, and the master's ready time.

Usage: cargo build --release --bin aion --examples, then
  python3 benches/cluster_footprint.py [IDLE_SECS]"""
import json, os, signal, socket, subprocess, sys, tempfile, time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
AION = os.environ.get('AION_BIN', os.path.join(ROOT, 'target', 'release', 'aion'))
KIT = os.path.join(os.path.dirname(AION), 'examples', 'testkit')
IDLE = int(sys.argv[1]) if len(sys.argv) > 1 else 30


def port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(('127.0.0.1', 0))
    p = s.getsockname()[1]
    s.close()
    return p


def aion(d, *args):
    return subprocess.run([AION, '--data-dir', d, *args], capture_output=True, text=True, check=True).stdout


def rss_kb(pid):
    for line in open(f'/proc/{pid}/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1])


def cpu_ticks(pid):
    t = open(f'/proc/{pid}/stat').read().split(')')[1].split()
    return int(t[11]) + int(t[12])


def status(d):
    try:
        return json.loads(aion(d, 'status', '--json'))
    except Exception:
        return None


def wait(what, f, limit=60):
    t = time.monotonic()
    while time.monotonic() - t < limit:
        v = f()
        if v:
            return v
        time.sleep(0.05)
    raise SystemExit(f'timed out waiting for {what}')


tmp = tempfile.mkdtemp()
md, wd = os.path.join(tmp, 'm'), os.path.join(tmp, 'w')
aion(md, 'cluster', 'init', '--name', 'm')
tok = aion(md, 'cluster', 'token').strip().splitlines()[-1]
ma = f'127.0.0.1:{port()}'
t0 = time.monotonic()
m = subprocess.Popen([AION, '--data-dir', md, 'master', '--name', 'm', '--listen', ma, '--grpc', 'off', '--http', '127.0.0.1:0'],
                     stderr=subprocess.PIPE, text=True)
for line in m.stderr:
    if 'runtime started' in line:
        ready = (time.monotonic() - t0) * 1000
        break
# Keep draining the master's stderr.
import threading
threading.Thread(target=lambda: [None for _ in m.stderr], daemon=True).start()
w = subprocess.Popen([AION, '--data-dir', wd, 'worker', '--join', ma, '--token', tok, '--name', 'w1',
                      '--listen', f'127.0.0.1:{port()}', '--grpc', 'off', '--http', '127.0.0.1:0'],
                     stderr=subprocess.DEVNULL)
wait('the worker attached', lambda: (s := status(md)) and any(n['name'] == 'w1' and n['connected'] for n in s['cluster']['nodes']))
proj = os.path.join(tmp, 'p.yml')
open(proj, 'w').write(f'''microservices:
  source:
    command: ["{KIT}"]
    startup: yes
    targetNode: w1
    env: {{ EMIT_COUNT: 10 }}
    nextService: {{ default: [ {{ name: sink }} ] }}
  sink:
    command: ["{KIT}"]
    always: yes
    startup: yes
''')
aion(md, 'apply', proj)
wait('the kanbans at the master', lambda: (s := status(md)) and any(i['service'] == 'sink' and i['kanbans_in'] >= 10 for i in s['instances']))
wait('the worker link up', lambda: (s := status(wd)) and any(d['name'] == 'm' and d['state'] == 'up' for d in s['federation']['devices']))
time.sleep(2)
c0 = {p.pid: cpu_ticks(p.pid) for p in (m, w)}
time.sleep(IDLE)
hz = os.sysconf('SC_CLK_TCK')
for name, p in (('master', m), ('worker', w)):
    cpu = (cpu_ticks(p.pid) - c0[p.pid]) / hz / IDLE * 100
    print(f'{name}: idle RSS {rss_kb(p.pid) / 1024:.1f} MB with the link up; CPU over {IDLE} s idle: {cpu:.2f} %')
print(f'master ready in {ready:.1f} ms')
for p in (w, m):
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)
