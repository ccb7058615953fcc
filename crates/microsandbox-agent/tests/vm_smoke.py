#!/usr/bin/env python3
"""End-to-end smoke test of msb-agent as PID 1 of a real QEMU VM (TCG, no KVM needed).

How to run, from the repository root:

    RUSTFLAGS="-C target-feature=+crt-static" cargo build --release \
        -p microsandbox-agent --target x86_64-unknown-linux-gnu
    python3 crates/microsandbox-agent/tests/vm_smoke.py \
        --kernel /tmp/k/vmlinux \
        --modules /tmp/k/x/lib/modules/6.1.0-56-cloud-amd64/kernel/drivers

Needs qemu-system-x86_64, mke2fs/debugfs (e2fsprogs) and a static busybox (/bin/busybox).
Root is not needed: the initramfs (newc cpio, with a /dev/console node) is written here.

What it does:
  1. builds an initramfs: /init = the agent, the virtio modules flat in /lib/modules and
     listed in /lib/modules.order;
  2. builds an ext4 root disk from busybox (applet symlinks in /bin, /etc/passwd);
  3. boots QEMU with the disk as virtio-blk and a `msb.agent` virtserialport on a unix
     socket, then talks the wire protocol (see crates/microsandbox-protocol) to it:
     Ready, stdout/stderr/exit codes, stdin, exec failures, timeouts, signals, concurrent
     sessions, streaming, background grandchildren, protocol errors, big transfers,
     `true` round-trip timing, Shutdown (QEMU must exit, disk must be clean and synced);
  4. boots again and connects only after the agent is up (Ready must wait for the host),
     then disconnects and reconnects (the agent must keep serving) (skip with
     --no-reconnect-boot);
  5. boots once more without a root disk: the agent must print why on the console and
     make the VM exit (skip with --no-failure-boot).
Exit status 0 when every check passed. Use --keep to leave the work directory.
"""

import argparse
import collections
import json
import os
import queue
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

# Frame kinds: crates/microsandbox-protocol/src/frame.rs
READY, EXEC, STDOUT, STDERR, STDIN, STDIN_EOF, EXITED, ERROR, SIGNAL, SHUTDOWN = range(1, 11)
KIND_NAMES = {1: "Ready", 2: "Exec", 3: "Stdout", 4: "Stderr", 5: "Stdin", 6: "StdinEof",
              7: "Exited", 8: "Error", 9: "Signal", 10: "Shutdown"}
MAX_CHUNK = 64 * 1024
MODULES = ["virtio/virtio_ring.ko", "virtio/virtio.ko", "virtio/virtio_pci_legacy_dev.ko",
           "virtio/virtio_pci_modern_dev.ko", "virtio/virtio_pci.ko",
           "char/virtio_console.ko", "block/virtio_blk.ko"]
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DEFAULT_AGENT = os.path.join(REPO, "target/x86_64-unknown-linux-gnu/release/msb-agent")

failures = []


def check(cond, what):
    print(("  ok   " if cond else "  FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)
    return cond


# ---------------------------------------------------------------- images

def cpio_newc(entries, out_path):
    """entries: (name, mode, data_bytes_or_None, (rdev_major, rdev_minor))"""
    with open(out_path, "wb") as out:
        def pad(n):
            out.write(b"\0" * ((4 - n % 4) % 4))
        for ino, (name, mode, data, rdev) in enumerate(entries + [("TRAILER!!!", 0, None, (0, 0))], 1):
            data = data or b""
            nm = name.encode() + b"\0"
            fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nm), 0]
            hdr = b"070701" + b"".join(b"%08x" % f for f in fields)
            out.write(hdr + nm)
            pad(len(hdr) + len(nm))
            out.write(data)
            pad(len(data))


def build_initramfs(work, agent, moddir):
    entries = [(d, 0o040755, None, (0, 0)) for d in
               ["dev", "proc", "sys", "newroot", "lib", "lib/modules"]]
    entries.append(("dev/console", 0o020600, None, (5, 1)))
    with open(agent, "rb") as f:
        entries.append(("init", 0o100755, f.read(), (0, 0)))
    for m in MODULES:
        with open(os.path.join(moddir, m), "rb") as f:
            entries.append(("lib/modules/" + os.path.basename(m), 0o100644, f.read(), (0, 0)))
    order = "".join(os.path.basename(m) + "\n" for m in MODULES).encode()
    entries.append(("lib/modules.order", 0o100644, order, (0, 0)))
    path = os.path.join(work, "initramfs.cpio")
    cpio_newc(entries, path)
    return path


def build_rootfs(work):
    root = os.path.join(work, "rootfs")
    os.makedirs(os.path.join(root, "bin"))
    for d in ["etc", "tmp", "root"]:
        os.makedirs(os.path.join(root, d))
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    shutil.copy("/bin/busybox", os.path.join(root, "bin/busybox"))
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for a in applets:
        if a != "busybox":
            os.symlink("busybox", os.path.join(root, "bin", a))
    with open(os.path.join(root, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")
    with open(os.path.join(root, "etc/group"), "w") as f:
        f.write("root:x:0:\n")
    img = os.path.join(work, "root.ext4")
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", root, img, "256M"], check=True)
    return img


def start_qemu(work, kernel, initrd, disk, tag):
    sock = os.path.join(work, f"agent-{tag}.sock")
    console = os.path.join(work, f"console-{tag}.log")
    cmd = ["qemu-system-x86_64", "-M", "pc", "-nodefaults", "-no-user-config", "-display", "none",
           "-no-reboot", "-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "1",
           "-kernel", kernel, "-initrd", initrd,
           "-append", "console=ttyS0 quiet panic=-1 reboot=t msb.hostname=t1",
           "-chardev", f"file,id=con,path={console}", "-serial", "chardev:con",
           "-device", "virtio-serial-pci",
           "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
           "-device", "virtserialport,chardev=agent,name=msb.agent"]
    if disk:
        cmd += ["-drive", f"file={disk},if=none,id=root,format=raw",
                "-device", "virtio-blk-pci,drive=root"]
    # Extra QEMU arguments for debugging, e.g. MSB_SMOKE_QEMU_ARGS="-trace virtio_serial_*".
    cmd += os.environ.get("MSB_SMOKE_QEMU_ARGS", "").split()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    return proc, sock, console, t0


# ---------------------------------------------------------------- protocol client

class Conn:
    """Frames demultiplexed by session id, each with its arrival time."""

    def __init__(self, path, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.queues = collections.defaultdict(queue.Queue)
        self.lock = threading.Lock()
        self.closed = threading.Event()
        threading.Thread(target=self._reader, daemon=True).start()

    def _recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def _reader(self):
        try:
            while True:
                ln, sid, kind = struct.unpack(">IIB", self._recv_exact(9))
                payload = self._recv_exact(ln)
                with self.lock:
                    q = self.queues[sid]
                q.put((time.monotonic(), kind, payload))
        except (EOFError, OSError):
            self.closed.set()

    def q(self, sid):
        with self.lock:
            return self.queues[sid]

    def close(self):
        # shutdown() first: a bare close() while the reader thread sits in recv() keeps the
        # socket alive, so QEMU would never see the disconnect.
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def send(self, sid, kind, payload=b""):
        self.sock.sendall(struct.pack(">IIB", len(payload), sid, kind) + payload)

    def send_json(self, sid, kind, obj):
        self.send(sid, kind, json.dumps(obj).encode())

    def next(self, sid, timeout=30):
        return self.q(sid).get(timeout=timeout)


class Result:
    def __init__(self):
        self.stdout = b""
        self.stderr = b""
        self.exited = None
        self.error = None
        self.frames = []  # (time, kind, len)
        self.max_chunk = 0


_next_id = [100]


def new_id():
    _next_id[0] += 1
    return _next_id[0]


def start(conn, program, args=(), sid=None, **kw):
    sid = sid or new_id()
    req = {"program": program, "args": list(args)}
    req.update(kw)
    req.setdefault("env", [["PATH", "/bin"]])
    conn.send_json(sid, EXEC, req)
    return sid


def collect(conn, sid, timeout=30):
    r = Result()
    deadline = time.monotonic() + timeout
    while True:
        t, kind, payload = conn.next(sid, timeout=max(0.01, deadline - time.monotonic()))
        r.frames.append((t, kind, len(payload)))
        if kind == STDOUT:
            r.stdout += payload
            r.max_chunk = max(r.max_chunk, len(payload))
        elif kind == STDERR:
            r.stderr += payload
            r.max_chunk = max(r.max_chunk, len(payload))
        elif kind == EXITED:
            r.exited = json.loads(payload)
            return r
        elif kind == ERROR:
            r.error = json.loads(payload)
            return r
        else:
            raise AssertionError(f"unexpected {KIND_NAMES.get(kind, kind)} frame on session {sid}")


def run(conn, program, args=(), stdin_chunks=None, timeout=30, **kw):
    if stdin_chunks is not None:
        kw["stdin"] = True
    sid = start(conn, program, args, **kw)
    if stdin_chunks is not None:
        for c in stdin_chunks:
            conn.send(sid, STDIN, c)
        conn.send(sid, STDIN_EOF)
    return sid, collect(conn, sid, timeout)


def exited(r, code=None, signal=None, timed_out=False):
    return r.exited == {"code": code, "signal": signal, "timed_out": timed_out}


# ---------------------------------------------------------------- scenarios

def session_checks(conn):
    print("sessions:")
    _, r = run(conn, "echo", ["hi"])
    check(r.stdout == b"hi\n" and r.stderr == b"" and exited(r, code=0), f"echo hi -> {r.stdout!r} {r.exited}")

    _, r = run(conn, "sh", ["-c", "echo err >&2; exit 3"])
    check(r.stderr == b"err\n" and r.stdout == b"" and exited(r, code=3), f"stderr + exit 3 -> {r.stderr!r} {r.exited}")

    _, r = run(conn, "cat", stdin_chunks=[b"hello ", b"world\n"])
    check(r.stdout == b"hello world\n" and exited(r, code=0), f"cat with stdin -> {r.stdout!r} {r.exited}")

    sid, r = run(conn, "no-such-program")
    check(r.error is not None and r.error["code"] == "exec-failed" and r.error["errno"] == 2
          and len(r.frames) == 1, f"missing program -> {r.error}")

    t = time.monotonic()
    _, r = run(conn, "sleep", ["10"], timeout_ms=500)
    dt = time.monotonic() - t
    check(exited(r, signal=9, timed_out=True) and dt < 3, f"sleep 10 with timeout_ms 500 -> {r.exited} after {dt:.2f}s")

    t = time.monotonic()
    a = start(conn, "sh", ["-c", "sleep 1; echo a"])
    b = start(conn, "sh", ["-c", "echo b; sleep 1; echo b2 >&2"])
    ra, rb = collect(conn, a), collect(conn, b)
    dt = time.monotonic() - t
    check(ra.stdout == b"a\n" and rb.stdout == b"b\n" and rb.stderr == b"b2\n" and exited(ra, code=0)
          and exited(rb, code=0) and dt < 1.9, f"two concurrent 1s sessions finished together in {dt:.2f}s")

    sid = start(conn, "sleep", ["10"])
    time.sleep(0.3)
    conn.send_json(sid, SIGNAL, {"signal": 15})
    r = collect(conn, sid)
    check(exited(r, signal=15), f"Signal 15 -> {r.exited}")

    t = time.monotonic()
    _, r = run(conn, "sh", ["-c", "echo a; sleep 1; echo b"])
    first = r.frames[0][0] - t
    check(r.stdout == b"a\nb\n" and len([f for f in r.frames if f[1] == STDOUT]) == 2 and first < 0.9,
          f"output streams: first chunk after {first:.2f}s, total {r.frames[-1][0] - t:.2f}s")

    t = time.monotonic()
    _, r = run(conn, "sh", ["-c", "sleep 5 & echo started"])
    dt = time.monotonic() - t
    check(r.stdout == b"started\n" and exited(r, code=0) and 0.9 < dt < 3,
          f"background grandchild holding pipes: Exited after {dt:.2f}s (1 s grace)")

    _, r = run(conn, "hostname")
    check(r.stdout == b"t1\n", f"hostname from msb.hostname= -> {r.stdout!r}")

    _, r = run(conn, "env", env=[["A", "1"], ["B", "x y"], ["A", "2"]])
    check(sorted(r.stdout.decode().split("\n")) == ["", "A=2", "B=x y"] and exited(r, code=0),
          f"exact env, default PATH lookup -> {r.stdout!r}")

    _, r = run(conn, "env", env=[["PATH", "/nonexistent"]])
    check(r.error and r.error["code"] == "exec-failed", f"PATH from the request env is used -> {r.error}")

    _, r = run(conn, "pwd")
    check(r.stdout == b"/\n", f"default cwd -> {r.stdout!r}")
    _, r = run(conn, "pwd", cwd="/tmp")
    check(r.stdout == b"/tmp\n", f"cwd /tmp -> {r.stdout!r}")

    _, r = run(conn, "/bin/sh", ["-c", "read x; echo \"[$x]\""])
    check(r.stdout == b"[]\n" and exited(r, code=0), f"stdin defaults to /dev/null -> {r.stdout!r}")

    # grep directly: busybox sh itself ignores SIGQUIT and would pass that on.
    _, r = run(conn, "grep", ["-E", "^Sig(Blk|Ign)", "/proc/self/status"])
    check(r.stdout == b"SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n",
          f"no blocked/ignored signals inherited from PID 1 -> {r.stdout!r}")

    _, r = run(conn, "sh", ["-c", "read pid comm state ppid pgrp sid rest < /proc/$$/stat; echo $pid $ppid $pgrp $sid"])
    pid, ppid, pgrp, sid_ = r.stdout.split()
    check(ppid == b"1" and pid == pgrp == sid_, f"child of PID 1, own session and group -> pid {pid} ppid {ppid} pgrp {pgrp} sid {sid_}")

    _, r = run(conn, "ls", ["/proc/self/fd"])
    check(r.stdout == b"0\n1\n2\n3\n", f"no agent fds leak into sessions -> {r.stdout!r}")

    _, r = run(conn, "head", ["-c", "5"], stdin_chunks=[b"x" * MAX_CHUNK] * 16)
    check(r.stdout == b"xxxxx" and exited(r, code=0), f"stdin after the child closed it is dropped -> {r.exited}")

    sid = start(conn, "sleep", ["30"], stdin=True)
    t = time.monotonic()
    for _ in range(17 * 16):
        conn.send(sid, STDIN, b"y" * MAX_CHUNK)
    r = collect(conn, sid, timeout=60)
    check(r.error and r.error["code"] == "stdin-overflow", f"17 MiB to a child not reading stdin -> {r.error} after {time.monotonic() - t:.1f}s")

    sid = start(conn, "sleep", ["5"])
    start(conn, "true", sid=sid)
    t, kind, payload = conn.next(sid)
    err = json.loads(payload) if kind == ERROR else None
    check(err and err["code"] == "invalid-request", f"duplicate live session id -> {err}")
    conn.send_json(sid, SIGNAL, {"signal": 9})
    r = collect(conn, sid)
    check(exited(r, signal=9), f"original session unaffected -> {r.exited}")

    sid = new_id()
    conn.send(sid, EXEC, b"{not json")
    t, kind, payload = conn.next(sid)
    check(kind == ERROR and json.loads(payload)["code"] == "protocol", f"bad JSON -> {payload!r}")
    sid = new_id()
    conn.send(sid, 77, b"abc")
    t, kind, payload = conn.next(sid)
    check(kind == ERROR and json.loads(payload)["code"] == "protocol", f"unknown kind -> {payload!r}")
    sid = new_id()
    conn.send(sid, STDOUT, b"x")
    t, kind, payload = conn.next(sid)
    check(kind == ERROR and json.loads(payload)["code"] == "protocol", f"host-sent Stdout -> {payload!r}")
    conn.send(424242, STDIN, b"ignored")
    conn.send_json(424242, SIGNAL, {"signal": 9})
    _, r = run(conn, "echo", ["still serving"])
    check(r.stdout == b"still serving\n", "still serving after bad frames; unknown session ids ignored")

    _, r = run(conn, "head", ["-c", "3000000", "/dev/urandom"], timeout=120)
    check(len(r.stdout) == 3000000 and r.max_chunk <= MAX_CHUNK and exited(r, code=0),
          f"3 MB stdout in {len([f for f in r.frames if f[1] == STDOUT])} chunks, max {r.max_chunk}")

    data = os.urandom(2 * 1024 * 1024)
    chunks = [data[i:i + MAX_CHUNK] for i in range(0, len(data), MAX_CHUNK)]
    t = time.monotonic()
    _, r = run(conn, "cat", stdin_chunks=chunks, timeout=120)
    dt = time.monotonic() - t
    check(r.stdout == data and exited(r, code=0), f"2 MiB through cat (stdin -> stdout) intact in {dt:.2f}s")

    _, r = run(conn, "sh", ["-c", "echo persisted > /root/persist"])
    check(exited(r, code=0), "wrote /root/persist for the post-shutdown check")

    n = 50
    t = time.monotonic()
    for _ in range(n):
        _, r = run(conn, "true")
        assert exited(r, code=0), r.exited
    per = (time.monotonic() - t) / n * 1000
    print(f"  time `true` round trip: {per:.1f} ms average over {n} runs")
    return per


def stray_frames(conn):
    stray = []
    with conn.lock:
        for sid, q in conn.queues.items():
            while not q.empty():
                stray.append((sid, KIND_NAMES.get(q.get()[1])))
    return stray


def main_boot(args, work, initrd, disk):
    print("boot:")
    proc, sock, console, t0 = start_qemu(work, args.kernel, initrd, disk, "main")
    try:
        conn = Conn(sock)
        t, kind, payload = conn.next(0, timeout=120)
        ready_s = t - t0
        ready = json.loads(payload)
        check(kind == READY and ready["protocol"] == 1 and ready["kernel"].startswith("6.1.0"),
              f"Ready {ready}")
        print(f"  time QEMU start -> Ready: {ready_s:.2f}s (guest uptime at Ready {ready['uptime_ms']} ms)")
        per = session_checks(conn)
        time.sleep(0.5)
        stray = stray_frames(conn)
        check(not stray, f"no frames after a session's final frame (stray: {stray})")

        sleeper = start(conn, "sleep", ["100"])
        t = time.monotonic()
        conn.send(0, SHUTDOWN)
        rc = proc.wait(timeout=60)
        dt = time.monotonic() - t
        check(rc == 0, f"Shutdown: QEMU exited with {rc} after {dt:.2f}s (one live session)")
    finally:
        if proc.poll() is None:
            proc.kill()
    fsck = subprocess.run(["e2fsck", "-fn", disk], capture_output=True, text=True)
    check(fsck.returncode == 0, f"root fs clean after shutdown (e2fsck rc {fsck.returncode})")
    got = subprocess.run(["debugfs", "-R", "cat /root/persist", disk], capture_output=True).stdout
    check(got == b"persisted\n", f"data written before Shutdown reached the disk -> {got!r}")
    with open(console, errors="replace") as f:
        log = f.read()
    if "msb-agent" in log:
        print("  console:\n" + "".join("    " + l + "\n" for l in log.splitlines() if "msb-agent" in l))
    return ready_s, ready["uptime_ms"], per


def reconnect_boot(args, work, initrd, disk):
    print("host connecting late, then reconnecting:")
    proc, sock, console, t0 = start_qemu(work, args.kernel, initrd, disk, "late")
    try:
        time.sleep(args.late)
        conn = Conn(sock)
        t, kind, payload = conn.next(0, timeout=120)
        ready = json.loads(payload)
        check(kind == READY and ready["uptime_ms"] < (t - t0) * 1000 - 500,
              f"Ready held until the host connected {t - t0:.1f}s after start (guest was ready at {ready['uptime_ms']} ms uptime)")
        _, r = run(conn, "echo", ["one"])
        check(r.stdout == b"one\n", "session on the first connection")
        conn.close()
        time.sleep(0.5)
        conn = Conn(sock)
        _, r = run(conn, "echo", ["two"])
        check(r.stdout == b"two\n" and exited(r, code=0), "session after the host reconnected")
        conn.send(0, SHUTDOWN)
        rc = proc.wait(timeout=60)
        check(rc == 0, f"QEMU exited with {rc}")
    finally:
        if proc.poll() is None:
            proc.kill()


def failure_boot(args, work, initrd):
    print("boot without a root disk (must fail loudly and exit):")
    proc, sock, console, t0 = start_qemu(work, args.kernel, initrd, None, "nodisk")
    try:
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    dt = time.monotonic() - t0
    with open(console, errors="replace") as f:
        log = f.read()
    line = next((l for l in log.splitlines() if "msb-agent:" in l), None)
    check(rc == 0 and line and "/dev/vda" in line, f"QEMU exited ({rc}) after {dt:.1f}s, console: {line!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", default="/tmp/k/vmlinux")
    ap.add_argument("--modules", default="/tmp/k/x/lib/modules/6.1.0-56-cloud-amd64/kernel/drivers",
                    help="the kernel's drivers/ module directory")
    ap.add_argument("--agent", default=DEFAULT_AGENT)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--no-failure-boot", action="store_true")
    ap.add_argument("--no-reconnect-boot", action="store_true")
    ap.add_argument("--late", type=float, default=8.0,
                    help="seconds to wait before connecting in the late-connect boot")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="msb-vm-smoke-")
    print(f"work dir {work}")
    try:
        initrd = build_initramfs(work, args.agent, args.modules)
        disk = build_rootfs(work)
        main_boot(args, work, initrd, disk)
        if not args.no_reconnect_boot:
            reconnect_boot(args, work, initrd, disk)
        if not args.no_failure_boot:
            failure_boot(args, work, initrd)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'FAILED: ' + str(len(failures)) + ' check(s)' if failures else 'all checks passed'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
