# frozen_string_literal: true

# Guest filesystem throughput: Sandbox#fs streaming of a large file each way, beside
# floors measured in the same run (the guest's own disk, the host's own disk).
#
#   ruby -Ilib bench/fs_throughput.rb [--size-mib 256] [--runs 3] [--memory 1024]
#
# Prints MB/s (MiB per second), median of --runs. Never fails: this is a report.

require "optparse"
require "tmpdir"
require "etc"
require "microsandbox"
require_relative "../spec/support/rootfs"

def mbps(mib, seconds) = (mib / seconds).round(1)

def timed
  t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  yield
  Process.clock_gettime(Process::CLOCK_MONOTONIC) - t
end

def median(xs) = xs.sort[xs.size / 2]

def row(label, mib, secs, note = "")
  puts format("  %-44s %8.1f MB/s  (%.2f s)%s", label, mbps(mib, secs), secs, note.empty? ? "" : "  #{note}")
end

opts = { size: 256, runs: 3, memory: 1024 }
OptionParser.new do |o|
  o.on("--size-mib N", Integer) { |v| opts[:size] = v }
  o.on("--runs N", Integer) { |v| opts[:runs] = v }
  o.on("--memory MIB", Integer) { |v| opts[:memory] = v }
end.parse!

size = opts[:size]
bytes = size << 20
chunk = Random.bytes(1 << 20)
puts "fs throughput: #{size} MiB, median of #{opts[:runs]} runs, guest memory #{opts[:memory]} MiB"
puts "host: #{Etc.nprocessors} cores, load average #{File.read('/proc/loadavg').split.first(3).join(' ')}"

Microsandbox::Sandbox.create("bench-fs-#{Process.pid}", image: MicrosandboxSpec::Rootfs.busybox_dir,
                                                         memory: opts[:memory]) do |sb|
  puts "accel: #{sb.info[:accel]}"
  fs = sb.fs
  results = Hash.new { |h, k| h[k] = [] }
  Dir.mktmpdir do |tmp|
    host_src = File.join(tmp, "src.bin")
    File.open(host_src, "wb") { |f| size.times { f.write(chunk) } }
    host_dst = File.join(tmp, "dst.bin")

    opts[:runs].times do
      # Floors: what the guest's disk and the host's disk do alone.
      results[:guest_dd_write] << timed do
        sb.exec("dd", ["if=/dev/zero", "of=/tmp/floor.bin", "bs=1M", "count=#{size}"])
      end
      results[:guest_dd_read] << timed { sb.exec("dd", ["if=/tmp/floor.bin", "of=/dev/null", "bs=1M"]) }
      fs.remove("/tmp/floor.bin")
      results[:host_cp] << timed { IO.copy_stream(host_src, host_dst) }
      File.delete(host_dst)

      results[:write_stream] << timed do
        fs.write_stream("/tmp/bench.bin") { |sink| size.times { sink.write(chunk) } }
      end
      results[:read_stream] << timed do
        n = 0
        fs.read_stream("/tmp/bench.bin") { |c| n += c.bytesize }
        raise "short read: #{n}" unless n == bytes
      end
      fs.remove("/tmp/bench.bin")
      results[:copy_from_host] << timed { fs.copy_from_host(host_src, "/tmp/bench.bin") }
      results[:copy_to_host] << timed { fs.copy_to_host("/tmp/bench.bin", host_dst) }
      fs.remove("/tmp/bench.bin")
      File.delete(host_dst)
    end
  end

  puts "floors:"
  row("guest dd /dev/zero -> /tmp (guest disk write)", size, median(results[:guest_dd_write]))
  row("guest dd /tmp -> /dev/null (page-cache read)", size, median(results[:guest_dd_read]))
  row("host IO.copy_stream (host disk)", size, median(results[:host_cp]))
  puts "sb.fs (target >= 200 MB/s each way):"
  %i[write_stream read_stream copy_from_host copy_to_host].each do |k|
    secs = median(results[k])
    row(k.to_s, size, secs, mbps(size, secs) >= 200 ? "PASS" : "MISS")
  end
end
