# frozen_string_literal: true

# Volume throughput, in one sandbox: sequential write and read of a file (256 MiB by
# default) with `dd` in the guest on a bind mount (virtio-fs, virtiofsd), on a disk volume
# (virtio-blk, ext4) and on the guest's root disk (the qcow2 overlay's ext4 on virtio-blk),
# the baseline. Issue 12's target: each volume at least 0.5x the root disk.
#
#   ruby -Ilib bench/volumes.rb [--size-mib 256] [--runs 3] [--memory 1024]
#
# Writes end with `conv=fsync` (the data reached the host); reads follow
# `drop_caches`, so they come from the device, not the guest's page cache. Median of
# --runs, targets interleaved so host load drifts hit all. Never fails: this is a report.

require "optparse"
require "tmpdir"
require "fileutils"
require "etc"
require "microsandbox"
require_relative "scratch_home"

BenchScratchHome.setup!
require_relative "../spec/support/rootfs"

opts = { size_mib: 256, runs: 3, memory: 1024 }
OptionParser.new do |o|
  o.on("--size-mib N", Integer) { |v| opts[:size_mib] = v }
  o.on("--runs N", Integer) { |v| opts[:runs] = v }
  o.on("--memory MIB", Integer) { |v| opts[:memory] = v }
end.parse!

def timed
  t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  yield
  Process.clock_gettime(Process::CLOCK_MONOTONIC) - t
end

def median(xs) = xs.sort[xs.size / 2]

def guest!(sb, script)
  r = sb.exec("sh", ["-c", script], timeout: 600)
  raise "guest command failed (#{r.exit_code.inspect}): #{script}\n#{r.stderr}" unless r.success?

  r
end

mib = opts[:size_mib]
host_dir = Dir.mktmpdir("msb-bench-bind")
Microsandbox::Volume.create("bench-disk", kind: "disk", size_mib: mib * 2 + 64)
targets = { "root disk (baseline)" => "/root/bench", "bind mount (virtio-fs)" => "/bind",
            "disk volume (virtio-blk)" => "/disk" }
results = Hash.new { |h, k| h[k] = { write: [], read: [] } }
puts "volumes: #{mib} MiB sequential, median of #{opts[:runs]}, " \
     "host #{Etc.respond_to?(:nprocessors) ? Etc.nprocessors : '?'} cores"
Microsandbox::Sandbox.create("bench-volumes", image: MicrosandboxSpec::Rootfs.busybox_dir, memory: opts[:memory],
                                              volumes: { "/bind" => host_dir, "/disk" => { named: "bench-disk" } }) do |sb|
  guest!(sb, "mkdir -p /root/bench")
  opts[:runs].times do
    targets.each do |label, dir|
      f = "#{dir}/f"
      guest!(sb, "rm -f #{f}; sync")
      results[label][:write] << timed { guest!(sb, "dd if=/dev/zero of=#{f} bs=1M count=#{mib} conv=fsync 2>/dev/null") }
      guest!(sb, "sync; echo 3 > /proc/sys/vm/drop_caches")
      results[label][:read] << timed { guest!(sb, "dd if=#{f} of=/dev/null bs=1M 2>/dev/null") }
      guest!(sb, "rm -f #{f}; sync")
    end
  end
end
base = results["root disk (baseline)"]
results.each do |label, r|
  w = median(r[:write])
  rd = median(r[:read])
  puts format("  %-28s write %7.1f MB/s (%.2fx)   read %7.1f MB/s (%.2fx)", label, mib / w, median(base[:write]) / w,
              mib / rd, median(base[:read]) / rd)
end
Microsandbox::Volume.remove("bench-disk")
FileUtils.rm_rf(host_dir)
