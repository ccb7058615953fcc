# frozen_string_literal: true

# Warm-start benchmark: create → first exec result, three ways in one run, alternating:
# cold boot (`template: false`), restore from a template, checkout from a ready Pool; then
# Sandbox#fork of a sandbox with 256 MiB of touched memory.
#
#   ruby -Ilib bench/warm_start.rb [--runs N] [--memory MiB]     (or `bundle exec rake bench:warm`)
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

opts = { runs: Integer(ENV.fetch("BENCH_RUNS", 5)), memory: 256 }
OptionParser.new do |o|
  o.on("--runs N", Integer, "runs of each path, alternating (default 5, env BENCH_RUNS)") { |v| opts[:runs] = v }
  o.on("--memory MIB", Integer, "guest memory (default 256)") { |v| opts[:memory] = v }
end.parse!

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
Microsandbox::Pool.open(size: 1, **create_opts) do |pool|
  opts[:runs].times do
    dt, i = timed_create.call("cold", template: false)
    cold << dt
    boot_ms[:cold] << i[:boot_ms]
    dt, i = timed_create.call("warm")
    raise "not restored: #{i.inspect}" unless i[:start] == "restored"

    warm << dt
    boot_ms[:warm] << i[:boot_ms]
    sleep 0.05 until pool.ready_count == 1
    t0 = now
    pool.checkout do |sb|
      sb.exec("true")
      pooled << (now - t0)
    end
  end
end

# Fork: a parent with 256 MiB of touched memory (random bytes in a guest tmpfs, so the
# stream cannot skip them as zero pages), forked --runs times.
forks = []
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

c = median(cold)
w = median(warm)
pl = median(pooled)
puts
puts format("  cold create → first exec      %.3f s  %s  (boot_ms median %d)", c, list(cold), median(boot_ms[:cold]))
puts format("  template restore → first exec %.3f s  %s  (boot_ms median %d)  %.3f× cold  target ≤ %.2f×  %s",
            w, list(warm), median(boot_ms[:warm]), w / c, TARGET_RESTORE, verdict(w / c <= TARGET_RESTORE))
puts format("  pool checkout → first exec    %.3f s  %s  %.3f× cold  target ≤ %.2f×  %s",
            pl, list(pooled), pl / c, TARGET_POOL, verdict(pl / c <= TARGET_POOL))
fk = median(forks)
puts format("  fork (256 MiB touched) → first exec in the child %.3f s  %s  %.3f× cold  target ≤ %.2f×  %s",
            fk, list(forks), fk / c, TARGET_FORK, verdict(fk / c <= TARGET_FORK))
puts "  load average at end: #{File.read('/proc/loadavg').split.first(3).join(' ')}"
