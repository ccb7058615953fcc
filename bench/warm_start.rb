# frozen_string_literal: true

# Warm-start benchmark: create → first exec result, three ways in one run, alternating:
# cold boot (`template: false`), restore from a template, checkout from a ready Pool; then
# Sandbox#fork of a sandbox with 256 MiB of touched memory; then density: N idle sandboxes
# restored from one template (host memory and CPU each), then all of them running execs.
#
#   ruby -Ilib bench/warm_start.rb [--runs N] [--memory MiB] [--density N] [--only a,b]
#   (or `bundle exec rake bench:warm`)
#
# See bench/README.md for what is measured and how. Never fails: this is a report.

require "etc"
require "optparse"
require "microsandbox"
require_relative "../spec/support/rootfs"
require_relative "../spec/support/registry"
require_relative "scratch_home"

TARGET_RESTORE = 0.2 # template restore, relative to cold
TARGET_POOL = 0.05   # pool checkout, relative to cold
TARGET_FORK = 0.3    # fork of a sandbox with 256 MiB touched → first exec in the child
TARGET_ANON = 0.25   # anonymous host memory of an idle sandbox, relative to its guest memory
TARGET_IDLE_CPU = 0.5 # % of a core per idle sandbox
PARTS = %w[cold warm pool fork density].freeze

opts = { runs: Integer(ENV.fetch("BENCH_RUNS", 5)), memory: 256, density: 20, idle: 10, execs: 20, only: PARTS }
OptionParser.new do |o|
  o.on("--runs N", Integer, "runs of each path, alternating (default 5, env BENCH_RUNS)") { |v| opts[:runs] = v }
  o.on("--memory MIB", Integer, "guest memory (default 256)") { |v| opts[:memory] = v }
  o.on("--density N", Integer, "idle sandboxes in the density part (default 20)") { |v| opts[:density] = v }
  o.on("--idle SECONDS", Integer, "idle time before and while measuring density (default 10)") { |v| opts[:idle] = v }
  o.on("--execs N", Integer, "execs per sandbox in the concurrent exec loop (default 20)") { |v| opts[:execs] = v }
  o.on("--only LIST", Array, "parts to run: #{PARTS.join(',')} (cold always runs: it is the reference)") do |v|
    opts[:only] = (v & PARTS) | ["cold"]
  end
end.parse!
part = ->(p) { opts[:only].include?(p) }

def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
def median(xs) = xs.sort[(xs.size - 1) / 2]
def verdict(ok) = ok ? "PASS" : "MISS"
def list(xs) = "[#{xs.map { |x| format('%.3f', x) }.join(' ')}]"

home = BenchScratchHome.setup!
registry = MicrosandboxSpec::Registry.instance
ref = registry.push_dir("bench/warm", "v1", MicrosandboxSpec::Rootfs.busybox_dir, env: ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
create_opts = { image: ref, registry_insecure: true, memory: opts[:memory] }

puts "microsandbox warm-start benchmark"
puts "  image: busybox (#{ref}), guest memory #{opts[:memory]} MiB, 1 vCPU, runs: #{opts[:runs]}"
puts "  host cores: #{Etc.nprocessors}, QEMU: #{`qemu-system-x86_64 --version`.lines.first.to_s.strip}, " \
     "load average at start: #{File.read('/proc/loadavg').split.first(3).join(' ')}"

seq = 0
name = ->(kind) { "bench-#{kind}-#{Process.pid}-#{seq += 1}" }

# Creates, runs `true`, returns [seconds to the exec result, info]; stops and removes outside the timing.
timed_create = lambda do |kind, **extra|
  n = name.call(kind)
  t0 = now
  sb = Microsandbox::Sandbox.create(n, **create_opts, **extra)
  sb.exec("true")
  dt = now - t0
  info = sb.info
  sb.kill
  Microsandbox::Sandbox.remove(n)
  [dt, info]
end

# Warm-up: installs, pulls, and builds the template (timed: what the first create of a
# configuration costs).
first, info = timed_create.call("first")
raise "the first create did not restore from a template: #{info.inspect}" unless info[:start] == "restored"

tdir = File.join(home, "templates", info[:template])
state_mb = File.size(File.join(tdir, "vm.state")) / 1e6
puts format("  first create of the configuration (template build + restore): %.2f s; state file %.1f MB", first, state_mb)

cold = []
warm = []
pooled = []
boot_ms = { cold: [], warm: [] }
pool = Microsandbox::Pool.new(size: 1, **create_opts) if part.call("pool")
begin
  opts[:runs].times do
    dt, i = timed_create.call("cold", template: false)
    cold << dt
    boot_ms[:cold] << i[:boot_ms]
    if part.call("warm")
      dt, i = timed_create.call("warm")
      raise "not restored: #{i.inspect}" unless i[:start] == "restored"

      warm << dt
      boot_ms[:warm] << i[:boot_ms]
    end
    next unless pool

    sleep 0.05 until pool.ready_count == 1
    t0 = now
    pool.checkout do |sb|
      sb.exec("true")
      pooled << (now - t0)
    end
    # The refill (a restore) must not overlap the next run's cold create: that would
    # slow the reference of the ratios.
    sleep 0.05 until pool.ready_count == 1
  end
ensure
  pool&.shutdown
end

# Fork: a parent with 256 MiB of touched memory (random bytes in a guest tmpfs, so the
# stream cannot skip them as zero pages), forked --runs times.
forks = []
if part.call("fork")
  parent_name = name.call("parent")
  Microsandbox::Sandbox.create(parent_name, **create_opts, memory: [opts[:memory], 512].max) do |parent|
    parent.shell("mkdir -p /mnt/t && mount -t tmpfs -o size=300m tmpfs /mnt/t && " \
                 "dd if=/dev/urandom of=/mnt/t/fill bs=1M count=256 2>/dev/null && echo ok").stdout == "ok\n" or
      raise "could not touch 256 MiB in the parent"
    opts[:runs].times do
      child = name.call("fork")
      t0 = now
      parent.fork(child) do |c|
        c.exec("true")
        forks << (now - t0)
      end
      Microsandbox::Sandbox.remove(child)
    end
  end
  Microsandbox::Sandbox.remove(parent_name)
end

# /proc/<pid>/smaps_rollup fields, in KiB.
def smaps(pid)
  File.read("/proc/#{pid}/smaps_rollup").scan(/^(\w+):\s+(\d+) kB/).to_h { |k, v| [k, Integer(v)] }
end

# utime + stime of a process, in clock ticks.
def cpu_ticks(pid) = File.read("/proc/#{pid}/stat").split(") ").last.split[11, 2].sum(&:to_i)

def percentile(xs, q) = xs.sort[((xs.size - 1) * q).round]

# Density: N idle sandboxes restored from one template; each one's host memory (QEMU's
# and its supervisor's smaps_rollup) and CPU over --idle seconds; then all of them run
# --execs execs each, concurrently.
density = nil
if part.call("density")
  sbs = []
  begin
    t0 = now
    opts[:density].times { sbs << Microsandbox::Sandbox.create(name.call("idle"), **create_opts) }
    created = now - t0
    raise "not all restored" unless sbs.all? { |sb| sb.info[:start] == "restored" }

    sleep opts[:idle]
    pids = sbs.map { |sb| [sb.info[:vmm_pid], sb.info[:supervisor_pid]] }
    ticks0 = pids.map { |q, v| cpu_ticks(q) + cpu_ticks(v) }
    sleep opts[:idle]
    ticks1 = pids.map { |q, v| cpu_ticks(q) + cpu_ticks(v) }
    hz = Etc.sysconf(Etc::SC_CLK_TCK)
    cpu = ticks0.zip(ticks1).map { |a, b| 100.0 * (b - a) / hz / opts[:idle] }
    mem = pids.map { |q, v| [smaps(q), smaps(v)] }
    anon = mem.map { |q, v| (q["Anonymous"] + v["Anonymous"]) / 1024.0 }
    file_rss = mem.map { |q, _| (q["Rss"] - q["Anonymous"]) / 1024.0 }
    pss = mem.map { |q, v| (q["Pss"] + v["Pss"]) / 1024.0 }
    sup_anon = mem.map { |_, v| v["Anonymous"] / 1024.0 }

    # All of them at once: --execs sequential `true` in each, one thread per sandbox.
    lat = Queue.new
    failures = Queue.new
    t1 = now
    sbs.map do |sb|
      Thread.new do
        opts[:execs].times do
          e0 = now
          r = sb.exec("true")
          r.success? ? lat << (now - e0) : failures << "exit #{r.exit_code}"
        rescue Microsandbox::Error => e
          failures << e.class.name
        end
      end
    end.each(&:join)
    loop_s = now - t1
    lats = Array.new(lat.size) { lat.pop }
    density = { created: created, cpu: cpu, anon: anon, file_rss: file_rss, pss: pss, sup_anon: sup_anon,
                lats: lats, failures: Array.new(failures.size) { failures.pop }, loop_s: loop_s,
                avail_mib: File.read("/proc/meminfo")[/MemAvailable:\s+(\d+)/, 1].to_i / 1024 }
  ensure
    sbs.each do |sb|
      sb.kill
      Microsandbox::Sandbox.remove(sb.name)
    end
  end
end

c = median(cold)
puts
puts format("  cold create → first exec      %.3f s  %s  (boot_ms median %d)", c, list(cold), median(boot_ms[:cold]))
unless warm.empty?
  w = median(warm)
  puts format("  template restore → first exec %.3f s  %s  (boot_ms median %d)  %.3f× cold  target ≤ %.2f×  %s",
              w, list(warm), median(boot_ms[:warm]), w / c, TARGET_RESTORE, verdict(w / c <= TARGET_RESTORE))
end
unless pooled.empty?
  pl = median(pooled)
  puts format("  pool checkout → first exec    %.3f s  %s  %.3f× cold  target ≤ %.2f×  %s",
              pl, list(pooled), pl / c, TARGET_POOL, verdict(pl / c <= TARGET_POOL))
end
unless forks.empty?
  fk = median(forks)
  puts format("  fork (256 MiB touched) → first exec in the child %.3f s  %s  %.3f× cold  target ≤ %.2f×  %s",
              fk, list(forks), fk / c, TARGET_FORK, verdict(fk / c <= TARGET_FORK))
end
if density
  d = density
  n = opts[:density]
  a = median(d[:anon])
  cp = median(d[:cpu])
  puts format("  density: %d idle sandboxes restored from one template (%.1f s to create them all), %d MiB guest memory each",
              n, d[:created], opts[:memory])
  puts format("    anonymous host memory per sandbox (QEMU + supervisor, median) %.1f MiB = %.3f× guest  target ≤ %.2f×  %s" \
              "  (supervisor %.1f MiB; QEMU file-backed RSS %.1f MiB; PSS %.1f MiB)",
              a, a / opts[:memory], TARGET_ANON, verdict(a / opts[:memory] <= TARGET_ANON),
              median(d[:sup_anon]), median(d[:file_rss]), median(d[:pss]))
  puts format("    idle CPU per sandbox (QEMU + supervisor, over %d s) median %.2f%% of a core, max %.2f%%  target ≤ %.1f%%  %s",
              opts[:idle], cp, d[:cpu].max, TARGET_IDLE_CPU, verdict(cp <= TARGET_IDLE_CPU))
  puts format("    100 such sandboxes: ~%.1f GiB anonymous memory, ~%.0f%% of a core idle (host MemAvailable now %d MiB)",
              a * 100 / 1024, cp * 100, d[:avail_mib])
  l = d[:lats]
  if l.empty?
    puts format("    concurrent exec loop: every exec failed (%s)", d[:failures].tally.inspect)
  else
    puts format("    concurrent exec loop: %d × %d execs of `true` in %.1f s, %d failures%s; p50 %.1f ms, p95 %.1f ms, max %.1f ms",
                n, opts[:execs], d[:loop_s], d[:failures].size, d[:failures].empty? ? "" : " #{d[:failures].tally.inspect}",
                percentile(l, 0.5) * 1000, percentile(l, 0.95) * 1000, l.max * 1000)
  end
end
puts "  load average at end: #{File.read('/proc/loadavg').split.first(3).join(' ')}"
