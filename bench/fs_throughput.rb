# frozen_string_literal: true

# Guest filesystem throughput: Sandbox#fs moving a large file each way, through the
# transfer disk (the default for large transfers) and through frames only
# (MICROSANDBOX_FS_BULK=off, the previous design), beside ceilings measured in the same
# sandbox: what the guest itself does with the disks and its memory.
#
#   ruby -Ilib bench/fs_throughput.rb [--size-mib 256] [--runs 3] [--memory 1024] [--no-frames]
#
# Prints MB/s (MiB per second), median of --runs; bulk and framed runs alternate so host
# load drifts hit both. Never fails: this is a report.

require "optparse"
require "tmpdir"
require "etc"
require "microsandbox"
require_relative "scratch_home"

BenchScratchHome.setup!
require_relative "../spec/support/rootfs"

def mbps(mib, seconds) = (mib / seconds).round(1)

def timed
  t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  yield
  Process.clock_gettime(Process::CLOCK_MONOTONIC) - t
end

def median(xs) = xs.sort[xs.size / 2]

def row(label, mib, secs, note = "")
  puts format("  %-52s %8.1f MB/s  (%.2f s)%s", label, mbps(mib, secs), secs, note.empty? ? "" : "  #{note}")
end

# Runs a command in the guest (its output is shown only when it fails); timed.
def guest_timed(sb, command)
  script = %(out=$(#{command} 2>&1) || { echo "$out" >&2; exit 1; })
  timed do
    r = sb.exec("sh", ["-c", script])
    raise "guest command failed (#{r.exit_code.inspect}): #{script}\n#{r.stderr}" unless r.success?
  end
end

# Removes a guest file and gives its blocks back to the host (`fstrim`; the root disk has
# discard=unmap), so every timed write allocates fresh space, as a new file in a new
# sandbox does, instead of reusing blocks the previous run left allocated (much faster).
def fresh(sb, path)
  sb.exec("sh", ["-c", "rm -f #{path}; sync; fstrim / 2>/dev/null; true"])
end

# The one transfer path is chosen per call from the environment (see sandbox/fs.rs).
def with_frames(on)
  old = ENV.fetch("MICROSANDBOX_FS_BULK", nil)
  ENV["MICROSANDBOX_FS_BULK"] = "off" if on
  yield
ensure
  ENV["MICROSANDBOX_FS_BULK"] = old
end

opts = { size: 256, runs: 3, memory: 1024, frames: true }
OptionParser.new do |o|
  o.on("--size-mib N", Integer) { |v| opts[:size] = v }
  o.on("--runs N", Integer) { |v| opts[:runs] = v }
  o.on("--memory MIB", Integer) { |v| opts[:memory] = v }
  o.on("--no-frames", "skip the frames-only comparison") { opts[:frames] = false }
end.parse!

size = opts[:size]
bytes = size << 20
chunk = Random.bytes(1 << 20)
puts "fs throughput: #{size} MiB, median of #{opts[:runs]} runs, guest memory #{opts[:memory]} MiB"
puts "host: #{Etc.nprocessors} cores, load average #{File.read('/proc/loadavg').split.first(3).join(' ')}"

bench_name = "bench-fs-#{Process.pid}"
Microsandbox::Sandbox.create(bench_name, image: MicrosandboxSpec::Rootfs.busybox_dir,
                                                         memory: opts[:memory]) do |sb|
  puts "accel: #{sb.info[:accel]}"
  fs = sb.fs
  disk = sb.exec("sh", ["-c", 'for b in /sys/block/*; do [ "$(cat $b/serial 2>/dev/null)" = msb.transfer ] && echo /dev/${b##*/}; done']).stdout.strip
  raise "the guest has no transfer disk" if disk.empty?

  results = Hash.new { |h, k| h[k] = [] }
  paths = opts[:frames] ? [:bulk, :frames] : [:bulk]
  Dir.mktmpdir do |tmp|
    host_src = File.join(tmp, "src.bin")
    File.open(host_src, "wb") { |f| size.times { f.write(chunk) } }
    host_dst = File.join(tmp, "dst.bin")
    blocks = size / 4

    opts[:runs].times do
      # Ceilings: the guest alone, no host involved. 4 MiB direct I/O is what the agent does.
      floor = "/tmp/floor.bin"
      results[:memcpy] << guest_timed(sb, "dd if=/dev/zero of=/dev/null bs=1M count=#{size * 4}") / 4
      fresh(sb, floor)
      results[:disk_write] << guest_timed(sb, "dd if=/dev/zero of=#{floor} bs=1M count=#{size}")
      results[:xfer_read] << guest_timed(sb, "dd if=#{disk} of=/dev/null bs=4M count=#{blocks} iflag=direct")
      fresh(sb, floor)
      results[:xfer_to_file] << guest_timed(sb, "dd if=#{disk} of=#{floor} bs=4M count=#{blocks} iflag=direct oflag=direct")
      results[:file_to_xfer] << guest_timed(sb, "dd if=#{floor} of=#{disk} bs=4M count=#{blocks} iflag=direct oflag=direct")
      fresh(sb, floor)
      results[:host_cp] << timed { IO.copy_stream(host_src, host_dst) }
      File.delete(host_dst)

      paths.each do |path|
        with_frames(path == :frames) do
          fresh(sb, "/tmp/bench.bin")
          results[[path, :write_stream]] << timed do
            fs.write_stream("/tmp/bench.bin") { |sink| size.times { sink.write(chunk) } }
          end
          results[[path, :read_stream]] << timed do
            n = 0
            fs.read_stream("/tmp/bench.bin") { |c| n += c.bytesize }
            raise "short read: #{n}" unless n == bytes
          end
          fresh(sb, "/tmp/bench.bin")
          results[[path, :copy_from_host]] << timed { fs.copy_from_host(host_src, "/tmp/bench.bin") }
          results[[path, :copy_to_host]] << timed { fs.copy_to_host("/tmp/bench.bin", host_dst) }
          File.delete(host_dst)
          fresh(sb, "/tmp/bench.bin")
        end
      end
    end
  end

  puts "ceilings (the guest alone, same sandbox; every write into freshly trimmed space):"
  row("guest memory: dd /dev/zero -> /dev/null", size, median(results[:memcpy]))
  row("guest disk write, buffered: dd -> /tmp", size, median(results[:disk_write]))
  row("transfer disk read, O_DIRECT 4M: dd -> /dev/null", size, median(results[:xfer_read]))
  row("upload ceiling: transfer disk -> /tmp, O_DIRECT 4M", size, median(results[:xfer_to_file]))
  row("download ceiling: /tmp -> transfer disk, O_DIRECT 4M", size, median(results[:file_to_xfer]))
  row("host disk: IO.copy_stream", size, median(results[:host_cp]))
  %i[write_stream read_stream copy_from_host copy_to_host].each_with_index do |k, i|
    puts "sb.fs (target >= 200 MB/s each way):" if i.zero?
    bulk = median(results[[:bulk, k]])
    note = mbps(size, bulk) >= 200 ? "PASS" : "MISS"
    if opts[:frames]
      framed = median(results[[:frames, k]])
      note += format("  frames only: %.1f MB/s (bulk %.1fx)", mbps(size, framed), framed / bulk)
    end
    row(k.to_s, size, bulk, note)
  end
end
Microsandbox::Sandbox.remove(bench_name)
