# frozen_string_literal: true

# Guest network benchmark: our user-space stack against QEMU's own `-netdev user` (slirp)
# and Debian's `passt`, in the same run, on the same kernel, VM size and guest program.
# Usage: ruby -Ilib bench/net.rb [--mib N] [--rr N] [--queries N] [--runs N] [--boots N]
#        (or `bundle exec rake bench:net`). See bench/README.md for what is measured and how.
#
# Network rule: every byte goes to servers this script runs on 127.0.0.1 (reached from
# the guest through each back-end's gateway address, which each maps to host loopback).

require "etc"
require "io/wait"
require "optparse"
require "resolv"
require "socket"
require "tmpdir"
require "zlib"
require_relative "../spec/support/rootfs"
require "microsandbox"
require_relative "scratch_home"

BenchScratchHome.setup!

opts = { mib: 64, rr: 300, queries: 300, runs: 3, boots: 5, hold: 256, sequential: 10_000, timeout: 1800,
         only: %w[slirp passt stack], parts: %w[compare policy rss boot] }
OptionParser.new do |o|
  o.on("--mib N", Integer, "MiB per bulk transfer, each way (default 64; the guest holds it in memory)") { |v| opts[:mib] = v }
  o.on("--rr N", Integer, "connect + 1-byte request/reply samples per run (default 300)") { |v| opts[:rr] = v }
  o.on("--queries N", Integer, "DNS query samples per run (default 300)") { |v| opts[:queries] = v }
  o.on("--runs N", Integer, "runs per back-end; medians are reported (default 3)") { |v| opts[:runs] = v }
  o.on("--boots N", Integer, "create → first exec pairs, network vs none (default 5)") { |v| opts[:boots] = v }
  o.on("--hold N", Integer, "guest connections held open for the RSS figure (default 256)") { |v| opts[:hold] = v }
  o.on("--sequential N", Integer, "sequential connections before the second RSS figure (default 10000)") { |v| opts[:sequential] = v }
  o.on("--timeout S", Integer, "seconds one baseline VM may take (default 1800)") { |v| opts[:timeout] = v }
  o.on("--baselines LIST", Array, "baselines to run (default slirp,passt,stack; empty: none)") { |v| opts[:only] = v }
  o.on("--parts LIST", Array, "what to measure (default compare,policy,rss,boot)") { |v| opts[:parts] = v }
end.parse!

def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

def median(xs)
  s = xs.compact.sort
  s.empty? ? nil : s[(s.size - 1) / 2]
end

def verdict(ok) = ok ? "PASS" : "MISS"

# ---- the guest program ----------------------------------------------------------------

# bench/net_guest.c, compiled static: the same binary runs in every guest.
def build_guest(dir)
  out = File.join(dir, "net_guest")
  cc = ENV.fetch("CC") { system("command -v cc >/dev/null 2>&1") ? "cc" : "clang" } # clang: bin/setup
  ok = system(cc, "-O2", "-static", "-o", out, File.join(__dir__, "net_guest.c"))
  abort "bench/net.rb: `#{cc} -static` failed (needs a C compiler and libc6-dev)" unless ok
  out
end

# Our stack without a sandbox (`crates/microsandbox-network/examples/stack_vm.rs`): the
# baseline VM with our stack as its NIC's back-end. nil (and why) when it cannot be built.
def build_stack_vm
  root = File.expand_path("..", __dir__)
  ok = system("cargo", "build", "--release", "-q", "-p", "microsandbox-network", "--example", "stack_vm", chdir: root)
  path = File.join(ENV.fetch("CARGO_TARGET_DIR", File.join(root, "target")), "release", "examples", "stack_vm")
  ok && File.executable?(path) ? [path, nil] : [nil, "cargo build --example stack_vm failed"]
rescue SystemCallError => e
  [nil, "cargo: #{e.message}"]
end

# ---- host-side servers (127.0.0.1 only) -------------------------------------------------
#
# The sink, source, echo and DNS stub run in a child process in a session of its own, and
# every baseline VM (with its back-end) is started in a session of its own too
# (`isolated`), as a sandbox's supervisor and QEMU are (the engine's `setsid`). With the
# kernel's autogroup scheduling (Debian's default) each session is one scheduling group,
# so no back-end shares a group with the servers or with another back-end: when the
# servers were threads of this script, the baselines (children of this script) shared
# their group and ours did not, which on a loaded host made the bare VM's request/reply
# 1.4× faster under `setsid` vs without in the same run (bench/README.md). The echo
# answers one connection after the other (the guest's request/reply is sequential)
# instead of creating a Ruby thread per connection, whose cost under load was larger than
# the back-ends' differences. The holder stays in this script (the RSS part counts its
# connections); it times nothing.

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
        c.close unless c.closed?
      end
    end
  rescue IOError
    nil
  end
  server.addr[1]
end

# `argv` in a new session (util-linux `setsid`, which execs in place: the pid is the
# program's), so it is its own scheduling group, as a sandbox is.
def isolated(argv) = ["setsid", *argv]

BYTES = opts[:mib] << 20
CHUNK = Random.new(9).bytes(1 << 20).freeze
SOURCE_CRC = (BYTES >> 20).times.reduce(0) { |crc, _| Zlib.crc32(CHUNK, crc) }

# The servers of the timed parts, in the child process. Returns their ports.
def start_servers
  ports_r, ports_w = IO.pipe
  life_r, life_w = IO.pipe
  fork do
    # exit! everywhere: the child must not run this script's at_exit handlers (the
    # scratch home's removal).
    Process.setsid
    ports_r.close
    life_w.close
    begin
      # The sink reads to end of stream, then answers "<bytes> <crc32>" (the guest
      # compares them with what it sent).
      sink = serve do |c|
        buf = +"".b
        total = 0
        crc = 0
        while c.read(1 << 20, buf)
          total += buf.bytesize
          crc = Zlib.crc32(buf, crc)
        end
        c.write("#{total} #{crc}\n")
      end
      # The source sends BYTES of a random 1 MiB block repeated, half-closes, and waits
      # for the guest's end (closing with unread input would send a RST that can overtake
      # the data).
      source = serve do |c|
        (BYTES >> 20).times { c.write(CHUNK) }
        c.close_write
        c.wait_readable(600) && c.read
      end
      # One byte back, then close; one connection at a time (each bounded by 30 s).
      echo_server = TCPServer.new("127.0.0.1", 0)
      Thread.new do
        loop do
          c = echo_server.accept
          begin
            c.write(c.read(1)) if c.wait_readable(30)
          rescue IOError, SystemCallError
            nil
          ensure
            c.close
          end
        end
      end
      # A DNS stub answering every A question with 203.0.113.10 (never forwarded anywhere).
      dns = UDPSocket.new.tap { |s| s.bind("127.0.0.1", 0) }
      Thread.new do
        loop do
          data, from = dns.recvfrom(512)
          q = Resolv::DNS::Message.decode(data)
          r = Resolv::DNS::Message.new(q.id)
          r.qr = 1
          r.rd = q.rd
          r.ra = 1
          q.each_question do |name, typeclass|
            r.add_question(name, typeclass)
            r.add_answer(name, 60, Resolv::DNS::Resource::IN::A.new("203.0.113.10")) if typeclass == Resolv::DNS::Resource::IN::A
          end
          dns.send(r.encode, 0, from[3], from[1])
        rescue StandardError
          nil
        end
      end
      ports_w.puts([sink, source, echo_server.addr[1], dns.addr[1]].join(" "))
      ports_w.close
      life_r.read # end of file: this script is gone
    ensure
      exit!(0)
    end
  end
  ports_w.close
  life_r.close
  ports = ports_r.gets.to_s.split.map(&:to_i)
  abort "bench/net.rb: the server process did not start" unless ports.size == 4

  [life_w, *ports] # life_w stays open as long as this script runs
end

SERVERS_LIFELINE, SINK, SOURCE, ECHO, DNS = start_servers

# One byte back, then held open until the script releases it (HOLD_RELEASE).
HOLDING = [0]
HOLD_LOCK = Mutex.new
HOLD_RELEASE = Queue.new
HOLD = serve do |c|
  c.write(c.read(1))
  HOLD_LOCK.synchronize { HOLDING[0] += 1 }
  HOLD_RELEASE.pop
end

# ---- what the guest program prints ------------------------------------------------------

# Per-line results of the guest program, each checked: a transfer that delivered other
# bytes than were sent is reported and not counted.
def parse(out, label)
  r = {}
  out.each_line do |l|
    w = l.split
    case w[0]
    when "up"
      us, sent, crc, got, got_crc = w[1..].map(&:to_i)
      if sent == BYTES && got == BYTES && crc == got_crc
        r[:up] = us / 1e6
      else
        warn "  #{label}: guest→host sent #{sent} bytes (crc #{crc}), the sink got #{w[4..].join(' ')}; not counted"
      end
    when "down"
      us, got, crc = w[1..].map(&:to_i)
      if got == BYTES && crc == SOURCE_CRC
        r[:down] = us / 1e6
      else
        warn "  #{label}: host→guest got #{got} of #{BYTES} bytes (crc #{crc}, expected #{SOURCE_CRC}); not counted"
      end
    when "rr", "dns"
      ok, failed, p50, p90, max = w[1..].map(&:to_i)
      warn "  #{label}: #{w[0]}: #{failed} of #{ok + failed} failed" if failed.positive?
      r[w[0].to_sym] = { n: ok, p50: p50 / 1000.0, p90: p90 / 1000.0, max: max / 1000.0 } if ok.positive?
    when "held"
      r[:held] = w[1].to_i
    end
  end
  r
end

# ---- baselines: our kernel, the engine's VM settings, another NIC back-end ---------------

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

# An initramfs with busybox, the guest program, the runtime's virtio (incl. net) modules
# and an init that configures eth0 as `net` says, runs `script` and powers off.
def baseline_initramfs(path, runtime_cpio, guest, net, script)
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
    #{script}
    echo #{MARKER}
    poweroff -f
  SH
  entries = [["bin", 0o40755], ["dev", 0o40755], ["dev/console", 0o20600, nil, [5, 1]], ["proc", 0o40755],
             ["sys", 0o40755], ["tmp", 0o41777], ["lib", 0o40755], ["lib/modules", 0o40755],
             ["bin/busybox", 0o100755, File.binread("/bin/busybox")], ["init", 0o100755, init],
             ["net_guest", 0o100755, File.binread(guest)]]
  order.each { |m| entries << ["lib/modules/#{m}", 0o100644, mods.fetch("lib/modules/#{m}")] }
  entries << ["TRAILER!!!", 0]
  File.binwrite(path, cpio(entries))
  path
end

NO_VALUE = %w[-nodefaults -no-user-config -no-reboot -enable-kvm -no-hpet -no-acpi].freeze
KEPT = (NO_VALUE + %w[-M -machine -accel -cpu -m -smp -kernel -append -display -bios -L]).freeze

# The engine's binary, machine, accelerator, CPU, memory, kernel and parameters; the NIC
# given by `netdev`; the baseline initramfs; the console on stdout.
def baseline_argv(engine, initrd, netdev = nil, mtu = nil)
  binary, *rest = engine
  argv = [binary]
  until rest.empty?
    opt = rest.shift
    value = NO_VALUE.include?(opt) ? nil : rest.shift
    # The machine's own settings (`-global PIIX4_PM.…`) apply to the baselines too.
    next unless KEPT.include?(opt) || (opt == "-global" && value.start_with?("PIIX4_PM."))

    value = value.split.reject { |w| w.start_with?("msb.", "quiet", "loglevel") }.join(" ") + " loglevel=1" if opt == "-append"
    argv.push(opt, *value)
  end
  argv += ["-initrd", initrd, "-serial", "stdio"]
  return argv unless netdev # stack_vm adds our NIC itself

  argv + ["-netdev", netdev, "-device", "virtio-net-pci,netdev=n0,host_mtu=#{mtu}"]
end

def run_vm(argv, timeout)
  rd, wr = IO.pipe
  pid = Process.spawn(*isolated(argv), in: File::NULL, out: wr, err: File::NULL)
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
  pid = Process.spawn(*isolated(["passt"]), "-f", "-q", "-t", "none", "-u", "none", "-a", "10.0.2.15", "-n", "24", "-g", "10.0.2.2",
                      "--socket", sock, *ENV.fetch("MSB_BENCH_PASST_ARGS", "").split, out: File::NULL, err: File::NULL)
  50.times { File.socket?(sock) ? break : sleep(0.1) }
  raise "passt did not create its socket" unless File.socket?(sock)

  yield sock
ensure
  if pid
    Process.kill(:TERM, pid) rescue nil
    Process.wait(pid) rescue nil
  end
end

# ---- ours ---------------------------------------------------------------------------------

IMAGE = MicrosandboxSpec::Rootfs.busybox_dir
TAG = "netbench-#{Process.pid}"
GW = "172.16.0.1"
$seq = 0

# The engine's QEMU command line and sandbox info, from the first sandbox.
ENGINE = {}

def sandbox(network:, **more)
  Microsandbox::Sandbox.create("#{TAG}-#{$seq += 1}", image: IMAGE, network: network,
                                                       dns: { nameservers: ["127.0.0.1:#{DNS}"] }, **more) do |sb|
    ENGINE[:argv] ||= File.binread("/proc/#{sb.info[:vmm_pid]}/cmdline").split("\0")
    ENGINE[:info] ||= sb.info
    yield sb
  end
end

def install_guest(sb, guest)
  sb.fs.write("/tmp/net_guest", File.binread(guest))
  sb.shell("chmod 755 /tmp/net_guest")
end

def run_guest(sb, *args)
  out = sb.exec("/tmp/net_guest", args.map(&:to_s), timeout: 3600)
  raise "net_guest #{args.join(' ')} failed in the sandbox (#{out.exit_code}): #{out.stderr}" unless out.exit_code.zero?

  out.stdout
end

def rss_kib(pid) = File.read("/proc/#{pid}/status")[/^VmRSS:\s+(\d+)/, 1].to_i

def set_mtu(sb, mtu)
  out = sb.shell("ip link set eth0 mtu #{mtu}")
  raise "ip link set eth0 mtu #{mtu}: #{out.stderr}" unless out.exit_code.zero?
end

# One run in a sandbox with `allow_all` (the gateway is host loopback): bulk both ways at
# the default MTU and at 1500 (the guest's eth0 lowered with `ip link`: the guest then
# sends and announces 1460-byte segments, so both directions use MTU-sized frames),
# request/reply and DNS.
def ours_run(guest, opts)
  sandbox(network: "allow_all") do |sb|
    install_guest(sb, guest)
    big = parse(run_guest(sb, "up", GW, SINK, BYTES) + run_guest(sb, "down", GW, SOURCE, BYTES), "ours")
    set_mtu(sb, 1500)
    small = parse(run_guest(sb, "up", GW, SINK, BYTES) + run_guest(sb, "down", GW, SOURCE, BYTES), "ours/1500")
    set_mtu(sb, 65_520)
    r = parse(run_guest(sb, "rr", GW, ECHO, opts[:rr]) + run_guest(sb, "dns", GW, 53, opts[:queries]), "ours")
    r.merge(up: big[:up], down: big[:down], up1500: small[:up], down1500: small[:down])
  end
end

# ---- run ---------------------------------------------------------------------------------

started_load = File.read("/proc/loadavg").split.first(3).join(" ")
passt = system("command -v passt >/dev/null 2>&1")
results = Hash.new { |h, k| h[k] = [] }
extra = {}
stack_vm = stack_skip = nil
t_start = now

Dir.mktmpdir("msb-net-bench") do |dir|
  guest = build_guest(dir)
  if opts[:parts].include?("compare")
    results[:ours] << ours_run(guest, opts) # also yields the engine's QEMU argv, warms the caches
    runtime = File.join(Microsandbox.home, "runtime", "initramfs.cpio")
    script = lambda do |gw, dns = DNS|
      ["/net_guest up #{gw} #{SINK} #{BYTES}", "/net_guest down #{gw} #{SOURCE} #{BYTES}",
       "/net_guest rr #{gw} #{ECHO} #{opts[:rr]}", "/net_guest dns #{gw} #{dns} #{opts[:queries]}"].join("\n")
    end
    if opts[:only].include?("stack")
      stack_vm, stack_skip = build_stack_vm
      stack_rd = baseline_initramfs(File.join(dir, "stack.cpio"), runtime, guest,
                                    { addr: "172.16.0.2/30", gw: GW, mtu: 65_520 }, script.call(GW, 53))
    end
    slirp_net = { addr: "10.0.2.15/24", gw: "10.0.2.2", mtu: 1500 }
    slirp_rd = baseline_initramfs(File.join(dir, "slirp.cpio"), runtime, guest, slirp_net, script.call("10.0.2.2"))
    passt_net = { addr: "10.0.2.15/24", gw: "10.0.2.2", mtu: Integer(ENV.fetch("MSB_BENCH_PASST_MTU", 65_520)) }
    passt_rd = baseline_initramfs(File.join(dir, "passt.cpio"), runtime, guest, passt_net, script.call("10.0.2.2"))
    opts[:runs].times do |i|
      results[:ours] << ours_run(guest, opts) if i.positive?
      if opts[:only].include?("slirp")
        argv = baseline_argv(ENGINE[:argv], slirp_rd, "user,id=n0", 1500)
        results[:slirp] << parse(run_vm(argv, opts[:timeout]), "slirp")
      end
      if stack_vm
      argv = [stack_vm, DNS.to_s, *baseline_argv(ENGINE[:argv], stack_rd)]
      results[:stack] << parse(run_vm(argv, opts[:timeout]), "stack")
    end
    next unless passt && opts[:only].include?("passt")

      with_passt(dir) do |sock|
        argv = baseline_argv(ENGINE[:argv], passt_rd, "stream,id=n0,server=off,addr.type=unix,addr.path=#{sock}", passt_net[:mtu])
        results[:passt] << parse(run_vm(argv, opts[:timeout]), "passt")
      end
    end
  end

  # Policy size: the same request/reply with an empty custom policy and with 1,000 CIDR +
  # 100 domain rules in front of the one that matches (first match wins: the worst case),
  # alternating between two running sandboxes.
  big_rules = (0...1000).map { |i| Microsandbox::Rule.deny(destination: "11.#{i >> 8}.#{i & 255}.0/24") } +
              (0...100).map { |i| Microsandbox::Rule.allow(destination: "host#{i}.example.test") } +
              [Microsandbox::Rule.allow(destination: Microsandbox::Destination.group(:host))]
  empty = Microsandbox::NetworkPolicy.custom(default_egress: :allow, rules: [])
  big = Microsandbox::NetworkPolicy.custom(default_egress: :deny, rules: big_rules)
  opts[:parts].include?("policy") and sandbox(network: empty) do |se|
    sandbox(network: big) do |sb|
      [se, sb].each { |s| install_guest(s, guest) }
      # A B B A A B ...: a drift in host load during a round hits both sides alike.
      (opts[:runs] * 2).times do |i|
        if (i + (i / 2)).even?
          results[:policy_empty] << parse(run_guest(se, "rr", GW, ECHO, opts[:rr]), "empty policy")[:rr]
        else
          results[:policy_big] << parse(run_guest(sb, "rr", GW, ECHO, opts[:rr]), "1,100 rules")[:rr]
        end
      end
    end
  end

  # Supervisor memory: idle after a warm-up, with `--hold` guest connections open, after
  # they closed, and after `--sequential` more connections one after the other.
  opts[:parts].include?("rss") and sandbox(network: "allow_all") do |sb|
    install_guest(sb, guest)
    pid = sb.info[:supervisor_pid]
    extra[:rss_boot] = rss_kib(pid)
    run_guest(sb, "rr", GW, ECHO, 100)
    sleep 1
    extra[:rss_base] = rss_kib(pid)
    holder = Thread.new { run_guest(sb, "hold", GW, HOLD, opts[:hold]) }
    deadline = now + 600
    sleep 0.1 while HOLD_LOCK.synchronize { HOLDING[0] } < opts[:hold] && now < deadline && holder.alive?
    held = HOLD_LOCK.synchronize { HOLDING[0] }
    extra[:held] = held
    extra[:rss_hold] = rss_kib(pid)
    held.times { HOLD_RELEASE << :go }
    extra[:held_guest] = parse(holder.value, "hold")[:held]
    sleep 1
    extra[:rss_after_hold] = rss_kib(pid)
    t = now
    extra[:seq] = parse(run_guest(sb, "rr", GW, ECHO, opts[:sequential]), "sequential")[:rr]
    extra[:seq_secs] = now - t
    sleep 1
    extra[:rss_after_seq] = rss_kib(pid)
  end

  # Create → first exec, with the default network vs `network: "none"`, alternating; which
  # of the pair goes first alternates too, so neither always follows the other's teardown.
  (opts[:parts].include?("boot") ? opts[:boots] : 0).times do |i|
    (i.even? ? %w[public_only none] : %w[none public_only]).each do |net|
      t = now
      sandbox(network: net) do |sb|
        sb.exec("true")
        results[:"boot_#{net}"] << now - t
      end
    end
  end
end

# ---- report ------------------------------------------------------------------------------

def mibps(secs, mib) = secs&.positive? ? mib / secs : nil

info = ENGINE[:info]
mib = opts[:mib]
cpu = File.read("/proc/cpuinfo")[/^model name\s*:\s*(.*)$/, 1]
puts "microsandbox guest network benchmark (#{format('%.0f', now - t_start)} s)"
puts "  host: #{cpu}, #{Etc.nprocessors} cores, accel #{info[:accel]}; load average at start #{started_load}, " \
     "at end #{File.read('/proc/loadavg').split.first(3).join(' ')}"
puts "  #{`#{ENGINE[:argv].first} --version`.lines.first.to_s.strip}; guest kernel #{info[:kernel]}; VM: 1 vCPU, 512 MiB"
puts "  #{opts[:runs]} runs per back-end (medians), #{mib} MiB each way, #{opts[:rr]} request/replies and " \
     "#{opts[:queries]} DNS queries per run (p50 of each run, median over runs)"
puts "  ours: smoltcp stack in the supervisor, MTU 65520 (default) and 1500 (guest eth0 lowered); " \
     "slirp: -netdev user, MTU 1500 (QEMU 7.2 has no MTU option for it); passt: " \
     "#{passt ? 'Debian passt, MTU 65520' : 'SKIPPED (not installed: apt-get install passt)'}; bare VM: our stack " \
     "(examples/stack_vm.rs) as the NIC back-end of the baselines' VM, MTU 65520#{stack_skip ? " — SKIPPED: #{stack_skip}" : ''}"
puts

cols = ->(*c) { format("%-34s %9s %9s %9s %9s %9s  %s", *c) }
cell = ->(v) { v ? format("%.2f", v) : "-" }
med = ->(k, &f) { median(results[k].map { |r| r && f.call(r) }) }
if results[:ours].any?
  puts cols.call("", "ours", "bare VM", "slirp", "passt", "ratio", "target")
  tput = lambda do |label, key, slirp_key, target|
    ours = med.call(:ours) { |r| mibps(r[key], mib) }
    bare = med.call(:stack) { |r| mibps(r[slirp_key], mib) }
    slirp = med.call(:slirp) { |r| mibps(r[slirp_key], mib) }
    ps = med.call(:passt) { |r| mibps(r[slirp_key], mib) }
    ratio = ours && slirp ? ours / slirp : nil
    puts cols.call(label, cell.call(ours), cell.call(bare), cell.call(slirp), cell.call(ps), ratio ? format("%.2f×", ratio) : "-",
                   ratio ? "≥ #{target}× slirp #{verdict(ratio >= target)}" : "≥ #{target}× slirp (no figure)")
  end
  tput.call("TCP guest→host MTU 1500 (MiB/s)", :up1500, :up, 1.0)
  tput.call("TCP host→guest MTU 1500 (MiB/s)", :down1500, :down, 1.0)
  tput.call("TCP guest→host MTU 65520 (MiB/s)", :up, :up, 2.0)
  tput.call("TCP host→guest MTU 65520 (MiB/s)", :down, :down, 2.0)
  latency = lambda do |label, key, target|
    ours = med.call(:ours) { |r| r[key]&.fetch(:p50) }
    bare = med.call(:stack) { |r| r[key]&.fetch(:p50) }
    slirp = med.call(:slirp) { |r| r[key]&.fetch(:p50) }
    ps = med.call(:passt) { |r| r[key]&.fetch(:p50) }
    ratio = ours && slirp ? ours / slirp : nil
    t = target ? "≤ #{target}× slirp #{ratio ? verdict(ratio <= target) : '(no figure)'}" : "—"
    puts cols.call(label, cell.call(ours), cell.call(bare), cell.call(slirp), cell.call(ps), ratio ? format("%.2f×", ratio) : "-", t)
  end
  latency.call("connect + 1-byte RR p50 (ms)", :rr, 1.2)
  latency.call("DNS query p50 (ms)", :dns, nil)
  puts "  (bare VM and passt are shown in the MTU 65520 and 1500 rows alike: they run at 65520 only.)"
  puts
end

empty_p50 = median(results[:policy_empty].map { |r| r&.fetch(:p50) })
big_p50 = median(results[:policy_big].map { |r| r&.fetch(:p50) })
if empty_p50 && big_p50
  puts format("connect + 1-byte RR p50, empty policy %.2f ms, 1,000 CIDR + 100 domain rules %.2f ms: %.3f× " \
              "(target ≤ 1.05×) %s", empty_p50, big_p50, big_p50 / empty_p50, verdict(big_p50 / empty_p50 <= 1.05))
  puts "  per run (ms): empty #{results[:policy_empty].map { |r| r && format('%.2f', r[:p50]) }.join(', ')}; " \
       "rules #{results[:policy_big].map { |r| r && format('%.2f', r[:p50]) }.join(', ')}"
end

if extra[:rss_boot]
  mb = ->(kib) { format("%.1f MiB", kib / 1024.0) }
  puts format("supervisor RSS: after boot %s, after a 100-connection warm-up %s; %d of %d guest connections open %s " \
              "(target ≤ 64 MiB) %s", mb.call(extra[:rss_boot]), mb.call(extra[:rss_base]), extra[:held], opts[:hold],
              mb.call(extra[:rss_hold]), verdict(extra[:held] == opts[:hold] && extra[:rss_hold] <= 64 << 10))
  seq = extra[:seq]
  grew = extra[:rss_after_seq] - extra[:rss_base]
  puts format("  after they closed %s; after %d sequential connections (%s ok, p50 %.2f ms, %.0f s) %s: %+.1f MiB " \
              "over the warm-up figure (target: back to it, ≤ +1 MiB) %s",
              mb.call(extra[:rss_after_hold]), opts[:sequential], seq ? seq[:n] : 0, seq ? seq[:p50] : 0, extra[:seq_secs],
              mb.call(extra[:rss_after_seq]), grew / 1024.0, verdict(seq && seq[:n] == opts[:sequential] && grew <= 1024))
end

net, none = median(results[:boot_public_only]), median(results[:boot_none])
if net && none
  puts format("create → first exec: network (public_only) %.2f s, network: \"none\" %.2f s: %.3f× (target ≤ 1.05×) %s",
              net, none, net / none, verdict(net / none <= 1.05))
  puts "  per run (s): network #{results[:boot_public_only].map { |x| format('%.2f', x) }.join(', ')}; " \
       "none #{results[:boot_none].map { |x| format('%.2f', x) }.join(', ')}"
end
puts
puts "Throughput: higher is better (ratio > 1 = ours faster). Times: lower is better (ratio < 1 = ours faster)."
