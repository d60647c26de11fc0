#!/usr/bin/env python3
"""Writes src/startup-order.txt: the functions the release runtime runs while it starts and idles (single mode with
one local service; a master and a worker with their link up), in the linker's symbol names, so that release builds
place them next to each other (build.rs passes the file to lld as --symbol-ordering-file). The kernel maps a
binary's code in 64 KB blocks around every page touched (fault-around): start-up code spread over the whole text
kept most of it resident (docs/performance.md, Footprint).

Regenerate after large changes to what runs at start (names of functions that no longer exist are ignored; new
start-up functions simply land where the linker puts them). Needs valgrind (Debian `valgrind`):

  cargo rustc --release --bin aion -- -C link-arg=-Wl,-Map=target/aion.map
  cargo build --release --examples && cargo bench --bench hops --no-run
  python3 benches/startup_order.py target/aion.map target/release/deps/hops-<hash>

It runs the runtime under callgrind as benches/footprint.py and benches/cluster_footprint.py do (the bench
binary's `forward` role as the idle service; the testkit for the cluster's source and sink), waits until each
scenario is idle, dumps what ran, stops the runtimes, and maps every executed address to its function's input
section in the link map (`.text.<symbol>`), single mode first.
"""
import bisect, json, os, re, signal, socket, subprocess, sys, tempfile, time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
AION = os.path.realpath(os.environ.get('AION_BIN', os.path.join(ROOT, 'target', 'release', 'aion')))
OUT = os.path.join(ROOT, 'src', 'startup-order.txt')


def text_sections(map_path):
    """(start, size, symbol) of every input section of the output section .text in an lld map."""
    secs, out = [], None
    for line in open(map_path):
        p = line.split()
        if len(p) < 5:
            continue
        try:
            vma, size = int(p[0], 16), int(p[2], 16)
        except ValueError:
            continue
        col = len(line) - len(line.split(None, 4)[4])
        if col <= 50:  # an output section
            out = p[4]
        elif out == '.text' and col <= 58 and ':(' in line:  # an input section: file:(name)
            name = line.split(':(', 1)[1].rstrip().rstrip(')')
            for prefix in ('.text.unlikely.', '.text.hot.', '.text.startup.', '.text.exit.', '.text.'):
                if name.startswith(prefix):
                    secs.append((vma, size, name[len(prefix):]))
                    break
    secs.sort()
    return secs


def executed(dump, binary):
    """Addresses executed in `binary`, from a callgrind dump made with --dump-instr=yes."""
    names, ob, last, addrs = {}, None, 0, []
    for line in open(dump):
        m = re.match(r'c?ob=\((\d+)\)\s*(.*)', line)
        if m:
            if m.group(2):
                names[m.group(1)] = m.group(2).strip()
            if line.startswith('ob='):
                ob = names.get(m.group(1))
            continue
        tok = line.split(None, 1)[0] if line.strip() else ''
        if line.startswith('calls='):
            continue
        if tok.startswith('0x'):
            last = int(tok, 16)
        elif tok[:1] in ('+', '-') and tok[1:].isdigit():
            last += int(tok)
        elif tok != '*':
            continue
        if ob == binary:
            addrs.append(last)
    return addrs


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait(what, f, limit=300):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if f():
                return
        except (ValueError, KeyError, TypeError):
            pass
        time.sleep(0.5)
    sys.exit(f'timed out waiting for {what} (under valgrind)')


def status(data):
    out = subprocess.run([AION, '--data-dir', data, 'status', '--json'], capture_output=True, text=True).stdout
    return json.loads(out)


def traced(work, name, args):
    """`aion ARGS` under callgrind, its dumps in WORK/NAME.*."""
    dump = os.path.join(work, name)
    return subprocess.Popen(['valgrind', '--tool=callgrind', '--dump-instr=yes', f'--callgrind-out-file={dump}', AION,
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), dump


def dump_and_stop(work, procs):
    """Dumps what each traced runtime ran so far (idle now), stops them; the dump files."""
    time.sleep(2)  # a few idle ticks
    dumps = []
    for p, dump in procs:
        subprocess.run(['callgrind_control', '--dump', str(p.pid)], check=True, capture_output=True)
    for p, dump in procs:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
        parts = sorted(f for f in os.listdir(work) if f.startswith(os.path.basename(dump) + '.'))
        if not parts:
            sys.exit(f'callgrind wrote no dump for {dump}')
        dumps.append(os.path.join(work, parts[0]))
    return dumps


def single(work, bench):
    """Single mode: `aion run` with one idle service, as benches/footprint.py."""
    yml = os.path.join(work, 's.yml')
    open(yml, 'w').write(f'microservices:\n  idle:\n    command: ["{bench}"]\n    startup: yes\n    always: yes\n'
                         f'    env: {{ AION_BENCH_ROLE: forward }}\n')
    data = os.path.join(work, 'single')
    p = traced(work, 'single.cg', ['--data-dir', data, 'run', yml])
    wait('the instance connected', lambda: all(i['connected'] for i in status(data)['instances']))
    return dump_and_stop(work, [p])


def cluster(work):
    """Cluster mode: a master and a worker with the link up after a few kanbans, as benches/cluster_footprint.py."""
    kit = os.path.join(os.path.dirname(AION), 'examples', 'testkit')
    md, wd = os.path.join(work, 'm'), os.path.join(work, 'w')
    subprocess.run([AION, '--data-dir', md, 'cluster', 'init', '--name', 'm'], check=True, capture_output=True)
    tok = subprocess.run([AION, '--data-dir', md, 'cluster', 'token'], check=True, capture_output=True,
                         text=True).stdout.strip().splitlines()[-1]
    ma, wa = f'127.0.0.1:{free_udp_port()}', f'127.0.0.1:{free_udp_port()}'
    m = traced(work, 'master.cg', ['--data-dir', md, 'master', '--name', 'm', '--listen', ma, '--grpc', 'off',
                                   '--http', '127.0.0.1:0'])
    wait('the master', lambda: status(md))
    w = traced(work, 'worker.cg', ['--data-dir', wd, 'worker', '--join', ma, '--token', tok, '--name', 'w1',
                                   '--listen', wa, '--grpc', 'off', '--http', '127.0.0.1:0'])
    wait('the worker attached', lambda: any(n['name'] == 'w1' and n['connected'] for n in status(md)['cluster']['nodes']))
    proj = os.path.join(work, 'p.yml')
    open(proj, 'w').write(f'''microservices:
  source:
    command: ["{kit}"]
    startup: yes
    targetNode: w1
    env: {{ EMIT_COUNT: 10 }}
    nextService: {{ default: [ {{ name: sink }} ] }}
  sink:
    command: ["{kit}"]
    always: yes
    startup: yes
''')
    subprocess.run([AION, '--data-dir', md, 'apply', proj], check=True, capture_output=True)
    wait('the kanbans at the master',
         lambda: any(i['service'] == 'sink' and i['kanbans_in'] >= 10 for i in status(md)['instances']))
    wait('the worker link up',
         lambda: any(d['name'] == 'm' and d['state'] == 'up' for d in status(wd)['federation']['devices']))
    return dump_and_stop(work, [m, w])


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    map_path, bench = sys.argv[1], sys.argv[2]
    work = tempfile.mkdtemp()
    dumps = single(work, bench) + cluster(work)
    secs = text_sections(map_path)
    starts = [s[0] for s in secs]
    seen, order = set(), []
    for dump in dumps:
        for a in executed(dump, AION):
            i = bisect.bisect_right(starts, a) - 1
            if i >= 0 and a < secs[i][0] + secs[i][1] and i not in seen:
                seen.add(i)
                order.append(secs[i][2])
    size = sum(secs[i][1] for i in seen)
    with open(OUT, 'w') as f:
        f.write('\n'.join(order) + '\n')
    print(f'{len(order)} functions, {size / 1e6:.2f} MB of code, written to {OUT}')


if __name__ == '__main__':
    main()
