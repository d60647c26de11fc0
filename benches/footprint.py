#!/usr/bin/env python3
"""Footprint of the release runtime: ready time, idle RSS with 1 and 51 local instances, RSS per instance, idle CPU.

Usage: cargo build --release --bin aion && cargo bench --bench hops --no-run, then
  python3 benches/footprint.py target/release/deps/hops-<hash>
(the bench binary serves as the idle service: its `forward` role connects and waits)."""
import subprocess, time, tempfile, os, statistics, signal, sys
AION=os.environ.get('AION_BIN', os.path.join(os.path.dirname(__file__), '..', 'target', 'release', 'aion'))
BENCH=sys.argv[1]
def rss(pid):
    for l in open(f'/proc/{pid}/status'):
        if l.startswith('VmRSS:'): return int(l.split()[1])
def run(scale, wait_ready=True):
    d=tempfile.mkdtemp()
    y=os.path.join(d,'s.yml')
    open(y,'w').write(f'microservices:\n  idle:\n    command: ["{BENCH}"]\n    startup: yes\n    always: yes\n    scale: {scale}\n    env: {{ AION_BENCH_ROLE: forward }}\n')
    t0=time.monotonic()
    p=subprocess.Popen([AION,'--data-dir',os.path.join(d,'data'),'run',y],stderr=subprocess.PIPE,text=True)
    ready=None
    for line in p.stderr:
        if 'runtime started' in line:
            ready=time.monotonic()-t0; break
    return p,ready,d
readys=[]
for i in range(7):
    p,r,d=run(1)
    readys.append(r*1000)
    p.send_signal(signal.SIGTERM); p.communicate(timeout=30)
print('ready ms median %.1f (%s)'%(statistics.median(readys), ' '.join('%.1f'%x for x in readys)))
res={}
for scale in (1,51):
    p,r,d=run(scale)
    # wait until every instance is connected
    for _ in range(200):
        out=subprocess.run([AION,'--data-dir',os.path.join(d,'data'),'status','--json'],capture_output=True,text=True).stdout
        import json
        try:
            st=json.loads(out)
            if sum(1 for i in st['instances'] if i['connected'])==scale: break
        except Exception: pass
        time.sleep(0.1)
    time.sleep(2)
    res[scale]=rss(p.pid)
    t=open(f'/proc/{p.pid}/stat').read().split(')')[1].split()
    cpu0=int(t[11])+int(t[12])
    time.sleep(10)
    t=open(f'/proc/{p.pid}/stat').read().split(')')[1].split()
    cpu1=int(t[11])+int(t[12])
    print(f'scale {scale}: RSS {res[scale]/1024:.1f} MB; CPU over 10 s idle: {(cpu1-cpu0)/100/10*100:.2f} %')
    p.send_signal(signal.SIGTERM); p.communicate(timeout=60)
print('per additional instance: %.1f KB'%((res[51]-res[1])/50))
