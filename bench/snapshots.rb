# frozen_string_literal: true

# Snapshot cost: a sandbox writes N MiB (256 by default) of random data to its root disk and
# stops; then, median of --runs each:
#   - `cp --sparse=always` of its root disk (the floor: copying what it wrote),
#   - `Snapshot.create` (one pass: the allocated data copied into a sparse raw disk and
#     hashed on the way),
#   - the extra time of `Sandbox.create(from_snapshot:)` over a plain create of the same
#     root (hashing the disk's data before the boot + the overlay), each booted and stopped.
# Issue 12's target: create and the boot overhead each at most 1.5x the copy.
#
#   ruby -Ilib bench/snapshots.rb [--size-mib 256] [--runs 3]
#
# Never fails: this is a report.

require "optparse"
require "tmpdir"
require "fileutils"
require "microsandbox"
require_relative "scratch_home"

BenchScratchHome.setup!
require_relative "../spec/support/rootfs"

opts = { size_mib: 256, runs: 3 }
OptionParser.new do |o|
  o.on("--size-mib N", Integer) { |v| opts[:size_mib] = v }
  o.on("--runs N", Integer) { |v| opts[:runs] = v }
end.parse!

def timed
  t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  yield
  Process.clock_gettime(Process::CLOCK_MONOTONIC) - t
end

def median(xs) = xs.sort[xs.size / 2]

mib = opts[:size_mib]
root = MicrosandboxSpec::Rootfs.busybox_dir
Microsandbox::Sandbox.create("bench-snap-src", image: root) do |sb|
  r = sb.exec("sh", ["-c", "dd if=/dev/urandom of=/root/data bs=1M count=#{mib} 2>/dev/null && sync"], timeout: 900)
  raise "guest write failed: #{r.stderr}" unless r.success?
end
disk = File.join(Microsandbox.home, "sandboxes", "bench-snap-src", "root.ext4")
scratch = Dir.mktmpdir("msb-bench-snap")
copy = []
create = []
plain_boot = []
snap_boot = []
opts[:runs].times do |i|
  copy << timed { system("cp", "--sparse=always", disk, File.join(scratch, "copy#{i}"), exception: true) }
  FileUtils.rm_f(File.join(scratch, "copy#{i}"))
  create << timed { Microsandbox::Snapshot.create("bench-snap-src", name: "bench-snap", force: true) }
  plain_boot << timed { Microsandbox::Sandbox.create("bench-plain-#{i}", image: root) { nil } }
  snap_boot << timed { Microsandbox::Sandbox.create("bench-from-#{i}", from_snapshot: "bench-snap") { nil } }
  Microsandbox::Sandbox.remove("bench-plain-#{i}")
  Microsandbox::Sandbox.remove("bench-from-#{i}")
end
info = Microsandbox::Snapshot.get("bench-snap")
c = median(copy)
puts "snapshots: a sandbox that wrote #{mib} MiB; artifact #{info.size_bytes >> 20} MiB; median of #{opts[:runs]}"
puts format("  cp --sparse=always of its root disk   %6.2f s", c)
puts format("  Snapshot.create                        %6.2f s  (%.2fx the copy)", median(create), median(create) / c)
overhead = median(snap_boot) - median(plain_boot)
puts format("  create(from_snapshot:) boot            %6.2f s  vs plain create %.2f s: +%.2f s (%.2fx the copy)",
            median(snap_boot), median(plain_boot), overhead, overhead / c)
FileUtils.rm_rf(scratch)
