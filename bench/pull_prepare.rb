# frozen_string_literal: true

# Image pull benchmark: pull + prepare of the Debian/python3 test image from a loopback
# registry, beside a floor measured in the same run (curl of the same blobs + tar -x), and
# what a cached image adds to Sandbox.create.
#
#   ruby -Ilib bench/pull_prepare.rb [--runs N] [--creates M]     (or `bundle exec rake bench`)
#
# See bench/README.md for what is measured and how. Never fails: this is a report.

require "etc"
require "fileutils"
require "optparse"
require "tmpdir"
require "microsandbox"
require_relative "scratch_home"

BenchScratchHome.setup!
require_relative "../spec/support/rootfs"
require_relative "../spec/support/registry"
require_relative "../spec/support/debian_image"

TARGET_RATIO = 1.2     # pull + prepare, relative to curl + tar -x
TARGET_CACHED_MS = 50  # what an already-pulled image adds to Sandbox.create

opts = { runs: Integer(ENV.fetch("BENCH_PULL_RUNS", 5)), creates: Integer(ENV.fetch("BENCH_CREATES", 5)) }
OptionParser.new do |o|
  o.on("--runs N", Integer, "pulls and floors, alternating (default 5, env BENCH_PULL_RUNS)") { |v| opts[:runs] = v }
  o.on("--creates N", Integer, "cached creates (default 5, env BENCH_CREATES)") { |v| opts[:creates] = v }
end.parse!

def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
def median(xs) = xs.sort[(xs.size - 1) / 2]
def verdict(ok) = ok ? "PASS" : "MISS"
def list(xs, unit = "") = "[#{xs.map { |x| format('%.2f', x) }.join(' ')}]#{unit}"

# Wall seconds and CPU seconds (this process, all threads, plus finished children) of the block.
def measure
  c0 = Process.times
  t0 = now
  yield
  c1 = Process.times
  [now - t0, (c1.utime + c1.stime + c1.cutime + c1.cstime) - (c0.utime + c0.stime + c0.cutime + c0.cstime)]
end

def sh!(*cmd)
  system(*cmd, exception: true)
end

registry = MicrosandboxSpec::Registry.instance
ref = MicrosandboxSpec::DebianImage.push(registry, "bench/debian-python3", "v1")
layers = MicrosandboxSpec::DebianImage.layers
manifest = JSON.parse(Net::HTTP.get(URI("http://#{registry.host}/v2/bench/debian-python3/manifests/v1"),
                                     "Accept" => "application/vnd.oci.image.manifest.v1+json"))
blobs = [manifest["config"]["digest"], *layers.map(&:digest)]
base = Dir.mktmpdir("msb-pull-bench")
fs = `df --output=fstype #{base} 2>/dev/null`.lines.last.to_s.strip

puts "microsandbox image pull benchmark"
puts "  image: #{ref} (#{layers.size} gzip layers, #{layers.sum(&:size) >> 20} MiB compressed)"
puts "  host cores: #{Etc.nprocessors}, runs: #{opts[:runs]}, work dir: #{base} (#{fs}), " \
     "load average at start: #{File.read('/proc/loadavg').split.first(3).join(' ')}"

# The floor: the same blobs over the same loopback HTTP with curl, then `tar -xzf` of each
# layer in order into one directory (as root, tar also restores owners).
def floor_run(registry, blobs, layers, dir)
  measure do
    blobs.each do |d|
      sh!("curl", "-sSf", "-o", File.join(dir, d.sub(":", "-")), "http://#{registry.host}/v2/bench/debian-python3/blobs/#{d}")
    end
    FileUtils.mkdir_p(File.join(dir, "root"))
    layers.each { |l| sh!("tar", "-xzf", File.join(dir, l.digest.sub(":", "-")), "-C", File.join(dir, "root")) }
  end
end

# The engine: Image.pull into an empty store (manifest, config, layers, verify, unpack,
# build the ext4 root). The staging tree is deleted in the background after the pull
# returns; the next measurement waits for that, outside the timing.
def engine_run(ref, home)
  ENV["MICROSANDBOX_HOME"] = home
  m = measure { Microsandbox::Image.pull(ref, registry_insecure: true) }
  trash = File.join(home, "images/trash")
  sleep 0.05 until !File.directory?(trash) || Dir.empty?(trash)
  m
ensure
  ENV.delete("MICROSANDBOX_HOME")
end

home_env = ENV.fetch("MICROSANDBOX_HOME", nil)
floors = []
pulls = []
begin
  opts[:runs].times do |i|
    dir = File.join(base, "floor-#{i}")
    FileUtils.mkdir_p(dir)
    floors << floor_run(registry, blobs, layers, dir)
    FileUtils.rm_rf(dir)
    home = File.join(base, "home-#{i}")
    pulls << engine_run(ref, home)
    FileUtils.rm_rf(home)
  end
ensure
  ENV["MICROSANDBOX_HOME"] = home_env if home_env
  FileUtils.rm_rf(base)
end

floor = median(floors.map(&:first))
pull = median(pulls.map(&:first))
ratio = pull / floor
puts
puts format("floor (curl blobs + tar -xzf):  median %.2f s  %s  cpu %s", floor, list(floors.map(&:first)), list(floors.map(&:last), " s"))
puts format("pull + prepare (Image.pull):    median %.2f s  %s  cpu %s", pull, list(pulls.map(&:first)), list(pulls.map(&:last), " s"))
puts format("  ratio to floor: %.2fx wall, %.2fx cpu (target ≤ %.1fx)  %s", ratio,
            median(pulls.map(&:last)) / median(floors.map(&:last)), TARGET_RATIO, verdict(ratio <= TARGET_RATIO))

# Cached re-create: what Sandbox.create does for an image that is already in the store —
# resolve the reference (ref record, manifest and config read back and verified, root
# present) and make the sandbox's qcow2 overlay — timed alone, then whole creates for context.
Microsandbox::Image.pull(ref, registry_insecure: true)
# The store names roots `<hex>.<format version>.ext4` (see image/store.rs).
hex = Microsandbox::Image.get(ref).manifest_digest.delete_prefix("sha256:")
root = Dir.glob(File.join(Microsandbox.home, "images/roots", "#{hex}.*ext4")).max_by { |f| File.mtime(f) }
raise "no root disk for #{hex} under #{Microsandbox.home}/images/roots" unless root && File.file?(root)

resolves = []
overlays = []
Dir.mktmpdir("msb-overlay") do |dir|
  (opts[:creates] * 4).times do |i|
    resolves << measure { Microsandbox::Image.pull(ref, registry_insecure: true) }.first * 1000
    overlays << measure do
      sh!("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", root, File.join(dir, "o#{i}.qcow2"))
    end.first * 1000
  end
end
boots = []
opts[:creates].times do |i|
  name = "bench-cached-#{Process.pid}-#{i}"
  sb = nil
  wall, = measure { sb = Microsandbox::Sandbox.create(name, image: ref, registry_insecure: true) }
  boots << [wall, sb.info[:boot_ms] / 1000.0]
  sb.kill
  Microsandbox::Sandbox.remove(name)
end
added = median(resolves) + median(overlays)
puts
puts format("cached image, added to create: %.1f ms = resolve %.1f ms (p50; max %.1f) + qcow2 overlay %.1f ms (p50; max %.1f) " \
            "(target ≤ %d ms)  %s", added, median(resolves), resolves.max, median(overlays), overlays.max,
            TARGET_CACHED_MS, verdict(added <= TARGET_CACHED_MS))
puts format("  whole Sandbox.create (cached image → agent ready): median %.2f s, of which VM boot (boot_ms) %.2f s; " \
            "host side %.0f ms", median(boots.map(&:first)), median(boots.map(&:last)),
            median(boots.map { |w, b| (w - b) * 1000 }))
puts "  host load average at end: #{File.read('/proc/loadavg').split.first(3).join(' ')}"
