# frozen_string_literal: true

# Boot and exec benchmark: how close is a sandbox to bare QEMU, and how fast is exec?
# Usage: ruby -Ilib bench/boot_exec.rb [--runs N] [--execs M]   (or `bundle exec rake bench`)
# See bench/README.md for what is measured and how.

require "etc"
require "io/wait"
require "optparse"
require "shellwords"
require "tmpdir"
require_relative "../spec/support/rootfs"
require "microsandbox"
require_relative "scratch_home"

TARGET_RATIO = 1.15 # cold create→first exec, relative to the floor
TARGET_EXEC_P50_MS = 5.0
MARKER = "MSB-BENCH-FLOOR-READY"

opts = { runs: Integer(ENV.fetch("BENCH_RUNS", 5)), execs: Integer(ENV.fetch("BENCH_EXECS", 200)), idle_params: false }
OptionParser.new do |o|
  o.on("--runs N", Integer, "boots per measurement (default 5, env BENCH_RUNS)") { |v| opts[:runs] = v }
  o.on("--execs N", Integer, "exec round-trips (default 200, env BENCH_EXECS)") { |v| opts[:execs] = v }
  o.on("--idle-params", "also boot the floor without the idle-CPU kernel parameters (informational)") do
    opts[:idle_params] = true
  end
end.parse!

# After the options: `--help` prints and exits without installing a scratch runtime.
BenchScratchHome.setup!

def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
def median(xs) = percentile(xs, 50)

def percentile(xs, pct)
  s = xs.sort
  s[((s.size - 1) * pct / 100.0).round]
end

# A newc cpio archive: entries are [path, mode, data] (data nil for device nodes: rdev).
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

def floor_initramfs(dir)
  init = "#!/bin/busybox sh\n/bin/busybox echo #{MARKER}\n/bin/busybox poweroff -f\n"
  archive = cpio([
    ["bin", 0o40755], ["dev", 0o40755], ["dev/console", 0o20600, nil, [5, 1]],
    ["bin/busybox", 0o100755, File.binread("/bin/busybox")], ["init", 0o100755, init],
    ["TRAILER!!!", 0]
  ])
  File.join(dir, "floor.cpio").tap { |p| File.binwrite(p, archive) }
end

# The engine's QEMU command line, read from a running sandbox's VMM process.
def engine_qemu_argv(sandbox) = File.binread("/proc/#{sandbox.info[:vmm_pid]}/cmdline").split("\0")

# `-S`: the supervisor starts a directory image's QEMU paused while it formats the root
# disk; dropped (the floor has no disk to wait for and must run at once).
NO_VALUE = %w[-nodefaults -no-user-config -no-reboot -enable-kvm -no-hpet -no-acpi -S].freeze
KEPT = (NO_VALUE - %w[-S] + %w[-M -machine -accel -cpu -m -smp -kernel -append -display -bios -L]).freeze

# The engine's idle-CPU kernel parameters (DESIGN.md, "Idle CPU"). `--idle-params` boots a
# second floor without them, to see whether they cost boot time; the floor itself keeps them.
IDLE_PARAMS = %w[tsc=reliable nowatchdog sysctl.vm.compaction_proactiveness=0 sysctl.vm.stat_interval=10].freeze

def without_idle_params(argv)
  i = argv.index("-append")
  argv.dup.tap { |a| a[i + 1] = a[i + 1].split.reject { |w| IDLE_PARAMS.include?(w) }.join(" ") }
end

# Same binary, machine, accelerator, CPU, memory, kernel and kernel parameters as the
# engine; none of its devices; the tiny initramfs instead of the agent's.
def floor_argv(engine, initrd)
  binary, *rest = engine
  argv = [binary]
  until rest.empty?
    opt = rest.shift
    value = NO_VALUE.include?(opt) ? nil : rest.shift
    # The machine's own settings (`-global PIIX4_PM.…`) shape the floor's ACPI tables too.
    next unless KEPT.include?(opt) || (opt == "-global" && value.start_with?("PIIX4_PM."))

    value = value.split.reject { |w| w.start_with?("msb.") }.join(" ") if opt == "-append"
    argv.push(opt, *value)
  end
  argv + ["-initrd", initrd, "-serial", "stdio"]
end

# CPU seconds (user + system) a process has used so far, from /proc/<pid>/stat.
def cpu_s(pid)
  fields = File.read("/proc/#{pid}/stat").split(") ").last.split
  (fields[11].to_i + fields[12].to_i) / Etc.sysconf(Etc::SC_CLK_TCK).to_f
end

# Seconds from spawning QEMU until the trivial init prints its marker on the console, and
# QEMU's CPU seconds at that point.
def floor_boot(argv)
  rd, wr = IO.pipe
  t0 = now
  pid = Process.spawn(*argv, in: File::NULL, out: wr, err: File::NULL)
  wr.close
  seen = +""
  until seen.include?(MARKER)
    raise "floor VM printed no marker within 120 s: #{seen[-300..]}" unless rd.wait_readable(120)

    chunk = rd.read_nonblock(4096, exception: false)
    raise "floor VM exited before its marker: #{seen[-300..]}" if chunk.nil?

    seen << chunk if chunk.is_a?(String)
  end
  [now - t0, cpu_s(pid)]
ensure
  rd&.close
  if pid # init powers off; don't wait long for it
    Process.kill(:KILL, pid) unless 50.times.any? { Process.wait(pid, Process::WNOHANG) || (sleep(0.1) && nil) }
    Process.wait(pid) rescue nil
  end
end

# Seconds from Sandbox.create until the first exec("true") has returned; also the
# supervisor's boot_ms (supervisor start → agent Ready), the phase marks of the boot
# (`info[:boot_phases]`, ms) plus `create.returned` and `exec.returned` (ms since create),
# and QEMU's CPU seconds at that point.
def cold_create(name, image)
  t0 = now
  sb = Microsandbox::Sandbox.create(name, image: image)
  created = now
  sb.exec("true")
  done = now
  marks = sb.info[:boot_phases].to_h { |k, us| [k, us / 1000.0] }
               .merge("create.returned" => (created - t0) * 1000, "exec.returned" => (done - t0) * 1000)
  [done - t0, sb.info[:boot_ms], marks, cpu_s(sb.info[:vmm_pid])]
ensure
  if sb
    sb.kill
    Microsandbox::Sandbox.remove(name)
  end
end

def fmt_s(x) = format("%.2f s", x)
def verdict(ok) = ok ? "PASS" : "MISS"

image = MicrosandboxSpec::Rootfs.busybox_dir
tag = "bench-#{Process.pid}"

# Warm-up: installs the runtime if needed, fills the page cache, shows the engine's QEMU argv.
engine_argv = nil
info = nil
Microsandbox::Sandbox.create("#{tag}-warm", image: image) do |sb|
  sb.exec("true")
  engine_argv = engine_qemu_argv(sb)
  info = sb.info
end
Microsandbox::Sandbox.remove("#{tag}-warm")
qemu_version = `#{engine_argv.first} --version`.lines.first.to_s.strip

puts "microsandbox boot/exec benchmark"
puts "  accel: #{info[:accel]} (vmm #{info[:vmm]}), host cores: #{Etc.nprocessors}, runs: #{opts[:runs]}, " \
     "host load average at start: #{File.read('/proc/loadavg').split.first(3).join(' ')}"
puts "  #{qemu_version}"
puts "  guest kernel: #{info[:kernel]}"

# Floor and cold-create runs alternate, so a change in host load hits both alike.
floors = []
floor_cpus = []
bare_floors = []
creates = []
create_cpus = []
boot_ms = []
marks = []
Dir.mktmpdir("msb-bench") do |dir|
  argv = floor_argv(engine_argv, floor_initramfs(dir))
  puts "  floor argv: #{Shellwords.join(argv.drop(1))}"
  opts[:runs].times do |i|
    floor_s, floor_cpu = floor_boot(argv)
    floors << floor_s
    floor_cpus << floor_cpu
    bare_floors << floor_boot(without_idle_params(argv)).first if opts[:idle_params]
    create_s, ms, m, cpu = cold_create("#{tag}-#{i}", image)
    creates << create_s
    create_cpus << cpu
    boot_ms << ms
    marks << m
  end
end
floor = median(floors)
create = median(creates)

# Where a cold create's time goes: each step is the difference of two marks of the same
# run (engine and create/exec marks: ms since `create` began; supervisor marks: since the
# supervisor started; guest marks: guest uptime). Medians over the runs, in ms.
STEPS = [
  ["engine: create → root disk allocated (a directory image's; formatted by the supervisor below)", "engine.disk_built", nil],
  ["engine: → supervisor spawned", "engine.supervisor_spawn", "engine.disk_built"],
  ["supervisor: start → QEMU spawned (paused)", "supervisor.qemu_spawned", nil],
  ["supervisor: QEMU spawned → root disk formatted and VM let run (overlaps QEMU's start)", "supervisor.disk_built", "supervisor.qemu_spawned"],
  ["QEMU spawned → kernel starts /init, plus Ready's trip to the host (the floor's part)", :qemu_to_init, nil],
  ["guest: /init → pseudo filesystems", "guest.pseudo_fs", "guest.init"],
  ["guest: kernel modules", "guest.modules", "guest.pseudo_fs"],
  ["guest: wait for /dev/vda and the agent port", "guest.devices", "guest.modules"],
  ["guest: mount root, switch root", "guest.root", "guest.devices"],
  ["guest: grow root filesystem", "guest.grow", "guest.root"],
  ["guest: volumes", "guest.volumes", "guest.grow"],
  ["guest: hostname, lo", "guest.lo", "guest.volumes"],
  ["guest: network", "guest.net", "guest.lo"],
  ["guest: machine id, init handoff", "guest.machine_id", "guest.net"],
  ["guest: reaper, Ready", "guest.ready", "guest.machine_id"],
  ["supervisor start + report to the engine", :supervisor_overhead, nil],
  ["engine: report → create returns", "create.returned", "engine.reported"],
  ["first exec(\"true\") round trip", "exec.returned", "create.returned"]
].freeze

def step_ms(m, step)
  _, a, b = step
  case a
  when :qemu_to_init then m["supervisor.ready"] - m["supervisor.qemu_spawned"] - (m["guest.ready"] - m["guest.init"])
  when :supervisor_overhead then m["engine.reported"] - m["engine.supervisor_spawn"] - m["supervisor.ready"]
  else m[a] && (b.nil? ? m[a] : m[b] && m[a] - m[b])
  end
end

rtts = Microsandbox::Sandbox.create("#{tag}-exec", image: image) do |sb|
  10.times { sb.exec("true") }
  Array.new(opts[:execs]) do
    t0 = now
    sb.exec("true")
    (now - t0) * 1000
  end
end
Microsandbox::Sandbox.remove("#{tag}-exec")
puts "  host load average at end: #{File.read('/proc/loadavg').split.first(3).join(' ')} (TCG timings scale with it)"
p50 = median(rtts)
p95 = percentile(rtts, 95)

ratio = create / floor
unless marks.any? { |m| m["guest.ready"].nil? }
  puts
  puts "where a cold create's time goes (median ms over #{marks.size} runs):"
  STEPS.each do |step|
    vals = marks.map { |m| step_ms(m, step) }.compact
    next if vals.empty?

    puts format("  %-92s %8.1f", step[0], median(vals))
  end
  puts format("  %-92s %8.1f", "total (create → first exec result)", median(marks.map { |m| m["exec.returned"] }))
end
puts
puts "floor (bare QEMU → trivial init): median #{fmt_s(floor)}  [#{floors.map { |f| format('%.2f', f) }.join(' ')}]"
puts "cold create → first exec:         median #{fmt_s(create)}  [#{creates.map { |c| format('%.2f', c) }.join(' ')}]"
puts "  of which supervisor start → agent Ready (boot_ms): median #{fmt_s(median(boot_ms) / 1000.0)}"
unless bare_floors.empty?
  puts "floor without the idle-CPU kernel parameters: median #{fmt_s(median(bare_floors))}  " \
       "[#{bare_floors.map { |f| format('%.2f', f) }.join(' ')}] (#{format('%.2f', median(bare_floors) / floor)}x the floor)"
end
puts "  ratio to floor: #{format('%.2f', ratio)}x (target ≤ #{TARGET_RATIO}x)  #{verdict(ratio <= TARGET_RATIO)}"
# Steadier than wall time on a loaded host (not the target): the CPU QEMU used, floor to
# its marker vs the sandbox's QEMU to the first exec's result (host-side work not included).
puts "  QEMU CPU: floor median #{fmt_s(median(floor_cpus))}, sandbox median #{fmt_s(median(create_cpus))} " \
     "(#{format('%.2f', median(create_cpus) / median(floor_cpus))}x)"
puts "exec round-trip (true, #{opts[:execs]} calls): p50 #{format('%.2f', p50)} ms, p95 #{format('%.2f', p95)} ms " \
     "(target p50 ≤ #{TARGET_EXEC_P50_MS} ms)  #{verdict(p50 <= TARGET_EXEC_P50_MS)}"
