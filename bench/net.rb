# frozen_string_literal: true

# Guest network benchmark: our user-space stack against QEMU's own `-netdev user` (slirp)
# and Debian's `passt`, in the same run, on the same kernel, busybox image and VM size.
# Usage: ruby -Ilib bench/net.rb [--mib N] [--conns N] [--queries N] [--runs N]
# See bench/README.md for what is measured and how.
#
# Network rule: every byte goes to servers this script runs on 127.0.0.1 (reached from
# the guest through each back-end's gateway address, which each maps to host loopback).

require "etc"
require "io/wait"
require "optparse"
require "resolv"
require "socket"
require "tmpdir"
require_relative "../spec/support/rootfs"
require "microsandbox"
require_relative "scratch_home"

BenchScratchHome.setup!

opts = { mib: 64, conns: 100, queries: 100, runs: 3, timeout: 1800, only: %w[slirp passt] }
OptionParser.new do |o|
  o.on("--mib N", Integer, "MiB per bulk transfer, each way (default 64)") { |v| opts[:mib] = v }
  o.on("--conns N", Integer, "sequential connect + 1-byte exchanges (default 100)") { |v| opts[:conns] = v }
  o.on("--queries N", Integer, "sequential DNS queries (default 100)") { |v| opts[:queries] = v }
  o.on("--runs N", Integer, "runs per back-end; medians are reported (default 3)") { |v| opts[:runs] = v }
  o.on("--timeout S", Integer, "seconds one baseline VM may take (default 1800)") { |v| opts[:timeout] = v }
  o.on("--baselines LIST", Array, "baselines to run (default slirp,passt)") { |v| opts[:only] = v }
end.parse!

def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

def median(xs)
  s = xs.compact.sort
  s.empty? ? nil : s[(s.size - 1) / 2]
end

# ---- host-side servers (127.0.0.1 only) -------------------------------------------------

# Accepts forever on a loopback port, one thread per client.
def serve(&handler)
  server = TCPServer.new("127.0.0.1", 0)
  Thread.new do
    loop do
      Thread.new(server.accept) do |c|
        handler.call(c)
      rescue IOError, SystemCallError
        nil
      ensure
        c.close
      end
    end
  rescue IOError
    nil
  end
  server.addr[1]
end

BYTES = opts[:mib] << 20
CHUNK = ("\0" * (1 << 20)).b.freeze
# Bytes each upload delivered (checked after each run: a transfer that ended early is
# not timed).
SINK_COUNTS = Queue.new
SINK = serve do |c|
  buf = +"".b
  total = 0
  total += buf.bytesize while c.read(1 << 20, buf)
  SINK_COUNTS << total
end

# The byte count of the last upload (waits up to 10 s for the sink to see its end).
def uploaded
  100.times do
    return SINK_COUNTS.pop(true)
  rescue ThreadError
    sleep 0.1
  end
  nil
end
# Writes the bytes, then half-closes and waits for the guest's end: closing a socket with
# unread input would send a RST that can overtake data still in flight.
SOURCE = serve do |c|
  (BYTES / CHUNK.bytesize).times { c.write(CHUNK) }
  c.close_write
  c.wait_readable(600) && c.read
end
ECHO = serve { |c| c.write(c.read(1)) }

# A DNS stub answering every A question with 203.0.113.10 (never forwarded anywhere).
DNS_SOCKET = UDPSocket.new.tap { |s| s.bind("127.0.0.1", 0) }
DNS = DNS_SOCKET.addr[1]
Thread.new do
  loop do
    data, from = DNS_SOCKET.recvfrom(512)
    q = Resolv::DNS::Message.decode(data)
    r = Resolv::DNS::Message.new(q.id)
    r.qr = 1
    r.rd = q.rd
    r.ra = 1
    q.each_question do |name, typeclass|
      r.add_question(name, typeclass)
      r.add_answer(name, 60, Resolv::DNS::Resource::IN::A.new("203.0.113.10")) if typeclass == Resolv::DNS::Resource::IN::A
    end
    DNS_SOCKET.send(r.encode, 0, from[3], from[1])
  rescue StandardError
    nil
  end
end

# ---- the guest workload (busybox sh) ----------------------------------------------------

# Prints `name start end` lines (seconds from /proc/uptime, 10 ms resolution). Arguments:
# gateway, DNS server (addr or addr:port), MiB.
WORKLOAD = <<~SH
  gw=$1; dns=$2; mib=$3; conns=#{opts[:conns]}; queries=#{opts[:queries]}
  t() { cut -d' ' -f1 /proc/uptime; }
  a=$(t); dd if=/dev/zero bs=65536 count=$((mib * 16)) 2>/dev/null | nc $gw #{SINK}; echo "up $a $(t)"
  a=$(t); nc $gw #{SOURCE} </dev/null | wc -c > /tmp/down; echo "down $a $(t) $(cat /tmp/down)"
  a=$(t); i=0; while [ $i -lt $conns ]; do echo x | nc $gw #{ECHO} >/dev/null; i=$((i + 1)); done; echo "conn $a $(t)"
  a=$(t); i=0; while [ $i -lt $queries ]; do nslookup bench.test $dns >/dev/null 2>&1; i=$((i + 1)); done; echo "dns $a $(t)"
SH

def parse(out, mib, label)
  r = {}
  out.each_line do |l|
    name, a, b, extra = l.split
    next unless %w[up down conn dns].include?(name)

    r[name.to_sym] = b.to_f - a.to_f
    r[:down_bytes] = extra.to_i if name == "down"
  end
  raise "workload output incomplete: #{out[-500..]}" unless r.size == 5

  up = uploaded
  unless up == mib << 20
    warn "  #{label}: guest→host transfer delivered #{up.inspect} of #{mib << 20} bytes; not counted"
    r[:up] = nil
  end
  unless r[:down_bytes] == mib << 20
    # Seen with Debian 12's passt: the guest's nc half-closes at once (stdin is empty) and
    # the download stops after one window. Reported, not timed.
    warn "  #{label}: host→guest transfer ended after #{r[:down_bytes]} of #{mib << 20} bytes; not counted"
    r[:down] = nil
  end
  r
end

# ---- baselines: our kernel + busybox, the engine's VM settings, another NIC back-end ----

def cpio(entries)
  out = +"".b
  entries.each_with_index do |(name, mode, data, rdev), i|
    data = data.to_s.b
    major, minor = rdev || [0, 0]
    fields = [i + 1, mode, 0, 0, 1, 0, data.bytesize, 0, 0, major, minor, name.bytesize + 1, 0]
    out << "070701" << fields.map { |f| format("%08x", f) }.join << name << "\0"
    out << "\0" * (-out.bytesize % 4) << data << "\0" * (-data.bytesize % 4)
  end
  out
end

# The files of a newc archive: { path => data } (regular files only).
def uncpio(bytes)
  files = {}
  i = 0
  while bytes[i, 6] == "070701"
    f = bytes[i + 6, 104].scan(/.{8}/).map { |x| x.to_i(16) }
    mode, size, namesize = f[1], f[6], f[11]
    name = bytes[i + 110, namesize - 1]
    i += 110 + namesize
    i += -i % 4
    data = bytes[i, size]
    i += size + (-size % 4)
    break if name == "TRAILER!!!"

    files[name] = data if (mode & 0o170000) == 0o100000
  end
  files
end

MARKER = "MSB-NET-BENCH-DONE"

# An initramfs with busybox, the runtime's virtio (incl. net) modules and an init that
# configures eth0 as `net` says, runs the workload and powers off.
def baseline_initramfs(dir, runtime_cpio, net, mib)
  mods = uncpio(File.binread(runtime_cpio))
  order = (mods.fetch("lib/modules.order") + mods.fetch("lib/modules.net.order")).split
  init = <<~SH
    #!/bin/busybox sh
    /bin/busybox --install -s /bin
    mount -t proc proc /proc; mount -t sysfs sys /sys
    for m in #{order.join(' ')}; do insmod /lib/modules/$m; done
    ip link set lo up
    ip link set eth0 mtu #{net[:mtu]} up
    ip addr add #{net[:addr]} dev eth0
    ip route add default via #{net[:gw]}
    sh #{ENV['MSB_BENCH_TRACE'] ? '-x ' : ''}/workload.sh #{net[:gw]} #{net[:dns]} #{mib}
    echo #{MARKER}
    poweroff -f
  SH
  entries = [["bin", 0o40755], ["dev", 0o40755], ["dev/console", 0o20600, nil, [5, 1]], ["proc", 0o40755],
             ["sys", 0o40755], ["tmp", 0o41777], ["lib", 0o40755], ["lib/modules", 0o40755],
             ["bin/busybox", 0o100755, File.binread("/bin/busybox")], ["init", 0o100755, init],
             ["workload.sh", 0o100644, WORKLOAD]]
  order.each { |m| entries << ["lib/modules/#{m}", 0o100644, mods.fetch("lib/modules/#{m}")] }
  entries << ["TRAILER!!!", 0]
  File.join(dir, "net-bench.cpio").tap { |p| File.binwrite(p, cpio(entries)) }
end

NO_VALUE = %w[-nodefaults -no-user-config -no-reboot -enable-kvm -no-hpet -no-acpi].freeze
KEPT = (NO_VALUE + %w[-M -machine -accel -cpu -m -smp -kernel -append -display -bios -L]).freeze

# The engine's binary, machine, accelerator, CPU, memory, kernel and parameters; the NIC
# given by `netdev`; the baseline initramfs; the console on stdout.
def baseline_argv(engine, initrd, netdev, mtu)
  binary, *rest = engine
  argv = [binary]
  until rest.empty?
    opt = rest.shift
    value = NO_VALUE.include?(opt) ? nil : rest.shift
    next unless KEPT.include?(opt)

    value = value.split.reject { |w| w.start_with?("msb.", "quiet", "loglevel") }.join(" ") + " loglevel=1" if opt == "-append"
    argv.push(opt, *value)
  end
  argv + ["-initrd", initrd, "-serial", "stdio", "-netdev", netdev,
          "-device", "virtio-net-pci,netdev=n0,host_mtu=#{mtu}"]
end

def run_vm(argv, timeout)
  rd, wr = IO.pipe
  pid = Process.spawn(*argv, in: File::NULL, out: wr, err: File::NULL)
  wr.close
  out = +""
  deadline = now + timeout
  until out.include?(MARKER)
    raise "baseline VM: no result within #{timeout} s; console: #{out[-1500..] || out}" if now > deadline || !rd.wait_readable(deadline - now)

    chunk = rd.read_nonblock(4096, exception: false)
    raise "baseline VM exited early: #{out[-400..]}" if chunk.nil?

    out << chunk if chunk.is_a?(String)
  end
  out
ensure
  rd&.close
  if pid
    Process.kill(:KILL, pid) unless 50.times.any? { Process.wait(pid, Process::WNOHANG) || (sleep(0.1) && nil) }
    begin
      Process.wait(pid)
    rescue Errno::ECHILD
      nil
    end
  end
end

# passt (Debian package `passt`), started for one VM on a private socket path.
def with_passt(dir)
  # passt started as root drops to `nobody`, which must be able to create its socket.
  sock_dir = File.join(dir, "passt-#{rand(1 << 30)}")
  Dir.mkdir(sock_dir)
  File.chmod(0o777, dir, sock_dir) if Process.uid.zero?
  sock = File.join(sock_dir, "passt.sock")
  pid = Process.spawn("passt", "-f", "-q", "-t", "none", "-u", "none", "-a", "10.0.2.15", "-n", "24", "-g", "10.0.2.2",
                      "--socket", sock, out: File::NULL, err: File::NULL)
  50.times { File.socket?(sock) ? break : sleep(0.1) }
  raise "passt did not create its socket" unless File.socket?(sock)

  yield sock
ensure
  if pid
    Process.kill(:TERM, pid) rescue nil
    Process.wait(pid) rescue nil
  end
end

# ---- run ---------------------------------------------------------------------------------

image = MicrosandboxSpec::Rootfs.busybox_dir
tag = "netbench-#{Process.pid}"
passt = system("command -v passt >/dev/null 2>&1")
results = Hash.new { |h, k| h[k] = [] }
engine_argv = nil
info = nil

# Ours: a sandbox whose policy allows the host (the gateway is host loopback), DNS through
# the gateway's filter to the stub.
ours = lambda do
  Microsandbox::Sandbox.create("#{tag}-#{results[:ours].size}", image: image, network: "allow_all",
                                                                   dns: { nameservers: ["127.0.0.1:#{DNS}"] }) do |sb|
    engine_argv ||= File.binread("/proc/#{sb.info[:vmm_pid]}/cmdline").split("\0")
    info ||= sb.info
    sb.fs.write("/tmp/workload.sh", WORKLOAD)
    out = sb.shell("sh /tmp/workload.sh 172.16.0.1 172.16.0.1 #{opts[:mib]}", timeout: 3600)
    raise "workload failed in the sandbox: #{out.stderr}" unless out.exit_code.zero?

    parse(out.stdout, opts[:mib], "ours")
  end
end

results[:ours] << ours.call # also yields the engine's QEMU argv and a warm page cache
runtime = File.join(Microsandbox.home, "runtime", "initramfs.cpio")
Dir.mktmpdir("msb-net-bench") do |dir|
  slirp_net = { addr: "10.0.2.15/24", gw: "10.0.2.2", dns: "10.0.2.2:#{DNS}", mtu: 1500 }
  slirp_rd = baseline_initramfs(File.join(dir, "slirp").tap { |d| Dir.mkdir(d) }, runtime, slirp_net, opts[:mib])
  passt_net = { addr: "10.0.2.15/24", gw: "10.0.2.2", dns: "10.0.2.2:#{DNS}", mtu: 65_520 }
  passt_rd = baseline_initramfs(File.join(dir, "passt").tap { |d| Dir.mkdir(d) }, runtime, passt_net, opts[:mib])
  opts[:runs].times do |i|
    results[:ours] << ours.call if i.positive?
    argv = baseline_argv(engine_argv, slirp_rd, "user,id=n0", 1500)
    results[:slirp] << parse(run_vm(argv, opts[:timeout]), opts[:mib], "slirp") if opts[:only].include?("slirp")
    next unless passt && opts[:only].include?("passt")

    with_passt(dir) do |sock|
      argv = baseline_argv(engine_argv, passt_rd, "stream,id=n0,server=off,addr.type=unix,addr.path=#{sock}", 65_520)
      results[:passt] << parse(run_vm(argv, opts[:timeout]), opts[:mib], "passt")
    end
  end
end

# ---- report ------------------------------------------------------------------------------

def mibps(secs, mib) = secs&.positive? ? mib / secs : nil
def ms_each(secs, n) = secs ? secs * 1000.0 / n : nil

rows = {
  "TCP guest→host (MiB/s)" => ->(r) { mibps(r[:up], opts[:mib]) },
  "TCP host→guest (MiB/s)" => ->(r) { mibps(r[:down], opts[:mib]) },
  "connect+1-byte echo (ms each)" => ->(r) { ms_each(r[:conn], opts[:conns]) },
  "DNS query, nslookup (ms each)" => ->(r) { ms_each(r[:dns], opts[:queries]) }
}
puts "microsandbox guest network benchmark"
puts "  accel: #{info[:accel]}, host cores: #{Etc.nprocessors}, load average: #{File.read('/proc/loadavg').split.first(3).join(' ')}"
puts "  #{`#{engine_argv.first} --version`.lines.first.to_s.strip}; guest kernel: #{info[:kernel]}"
puts "  #{opts[:runs]} runs per back-end (medians), #{opts[:mib]} MiB each way, #{opts[:conns]} connections, #{opts[:queries]} DNS queries"
puts "  ours: smoltcp stack, MTU 65520; slirp: -netdev user, MTU 1500; passt: #{passt ? 'Debian passt, MTU 65520' : 'SKIPPED (passt is not installed: apt-get install passt)'}"
puts
puts format("%-32s %10s %10s %10s %12s %12s", "", "ours", "slirp", "passt", "ours/slirp", "ours/passt")
rows.each do |label, f|
  vals = %i[ours slirp passt].map { |k| median(results[k].map(&f)) }
  ratio = ->(b) { vals[0] && b ? format("%.2f×", vals[0] / b) : "-" }
  cells = vals.map { |v| v ? format("%.2f", v) : "-" }
  puts format("%-32s %10s %10s %10s %12s %12s", label, *cells, ratio.call(vals[1]), ratio.call(vals[2]))
end
puts
puts "Throughput: higher is better (ratio > 1 = ours faster). Times: lower is better (ratio < 1 = ours faster)."
