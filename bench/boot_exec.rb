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

BenchScratchHome.setup!

TARGET_RATIO = 1.15 # cold create→first exec, relative to the floor
TARGET_EXEC_P50_MS = 5.0
MARKER = "MSB-BENCH-FLOOR-READY"

opts = { runs: Integer(ENV.fetch("BENCH_RUNS", 5)), execs: Integer(ENV.fetch("BENCH_EXECS", 200)) }
OptionParser.new do |o|
  o.on("--runs N", Integer, "boots per measurement (default 5, env BENCH_RUNS)") { |v| opts[:runs] = v }
  o.on("--execs N", Integer, "exec round-trips (default 200, env BENCH_EXECS)") { |v| opts[:execs] = v }
end.parse!

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

NO_VALUE = %w[-nodefaults -no-user-config -no-reboot -enable-kvm -no-hpet -no-acpi].freeze
KEPT = (NO_VALUE + %w[-M -machine -accel -cpu -m -smp -kernel -append -display -bios -L]).freeze

# Same binary, machine, accelerator, CPU, memory, kernel and kernel parameters as the
# engine; none of its devices; the tiny initramfs instead of the agent's.
def floor_argv(engine, initrd)
  binary, *rest = engine
  argv = [binary]
  until rest.empty?
    opt = rest.shift
    value = NO_VALUE.include?(opt) ? nil : rest.shift
    next unless KEPT.include?(opt)

    value = value.split.reject { |w| w.start_with?("msb.") }.join(" ") if opt == "-append"
    argv.push(opt, *value)
  end
  argv + ["-initrd", initrd, "-serial", "stdio"]
end

# Seconds from spawning QEMU until the trivial init prints its marker on the console.
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
  now - t0
ensure
  rd&.close
  if pid # init powers off; don't wait long for it
    Process.kill(:KILL, pid) unless 50.times.any? { Process.wait(pid, Process::WNOHANG) || (sleep(0.1) && nil) }
    Process.wait(pid) rescue nil
  end
end

# Seconds from Sandbox.create until the first exec("true") has returned; also the
# supervisor's boot_ms (QEMU spawn → agent Ready).
def cold_create(name, image)
  t0 = now
  sb = Microsandbox::Sandbox.create(name, image: image)
  sb.exec("true")
  [now - t0, sb.info[:boot_ms]]
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
creates = []
boot_ms = []
Dir.mktmpdir("msb-bench") do |dir|
  argv = floor_argv(engine_argv, floor_initramfs(dir))
  puts "  floor argv: #{Shellwords.join(argv.drop(1))}"
  opts[:runs].times do |i|
    floors << floor_boot(argv)
    create_s, ms = cold_create("#{tag}-#{i}", image)
    creates << create_s
    boot_ms << ms
  end
end
floor = median(floors)
create = median(creates)

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
puts
puts "floor (bare QEMU → trivial init): median #{fmt_s(floor)}  [#{floors.map { |f| format('%.2f', f) }.join(' ')}]"
puts "cold create → first exec:         median #{fmt_s(create)}  [#{creates.map { |c| format('%.2f', c) }.join(' ')}]"
puts "  of which QEMU start → agent Ready (boot_ms): median #{fmt_s(median(boot_ms) / 1000.0)}"
puts "  ratio to floor: #{format('%.2f', ratio)}x (target ≤ #{TARGET_RATIO}x)  #{verdict(ratio <= TARGET_RATIO)}"
puts "exec round-trip (true, #{opts[:execs]} calls): p50 #{format('%.2f', p50)} ms, p95 #{format('%.2f', p95)} ms " \
     "(target p50 ≤ #{TARGET_EXEC_P50_MS} ms)  #{verdict(p50 <= TARGET_EXEC_P50_MS)}"
