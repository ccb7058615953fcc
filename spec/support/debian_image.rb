# frozen_string_literal: true

require "digest"
require "fileutils"
require "json"
require "zlib"

module MicrosandboxSpec
  # A Debian bookworm image with python3, built by the test suite itself from Debian
  # packages: `debootstrap --variant=minbase --include=python3-minimal`, trimmed like the
  # "slim" images (no docs, man pages, locales, apt caches), packed into two gzip layers:
  #
  #   1. the base system without Python's standard library;
  #   2. `/usr/lib/python3.*`, an app directory (`/srv/app/hello.py`, the image's WorkingDir)
  #      and a whiteout that deletes layer 1's `/etc/motd`.
  #
  # The layers are cached under tmp/images/ (keyed by VERSION and the layer-2 files), so
  # only the first run on a machine pays for debootstrap (~1–2 min, network bound).
  module DebianImage
    SUITE = "bookworm"
    VERSION = 1 # bump to force a rebuild of the cached layers
    HELLO_PY = "import sys\nprint(f\"hello from python {sys.version_info.major}.{sys.version_info.minor}\")\n"
    ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "MSB_IMAGE=debian-python3"].freeze
    WORKDIR = "/srv/app"

    # One packed layer: the gzip file, its digest and size, and the digest of the tar (diff_id).
    Layer = Struct.new(:path, :digest, :size, :diff_id, keyword_init: true)

    module_function

    def cache_dir
      key = Digest::SHA256.hexdigest("#{VERSION}\n#{SUITE}\n#{HELLO_PY}")[0, 12]
      File.expand_path("../../tmp/images/debian-python3-#{key}", __dir__)
    end

    # The two layers, built on first use.
    def layers
      dir = cache_dir
      index = File.join(dir, "layers.json")
      build(dir) unless File.exist?(index)
      # Paths are kept relative to the cache (older caches hold absolute ones): a moved
      # checkout keeps its built image.
      JSON.parse(File.read(index)).map do |h|
        Layer.new(**h.transform_keys(&:to_sym), path: File.join(dir, File.basename(h["path"])))
      end
    end

    # Pushes the image to `registry` (a Registry); returns its reference.
    def push(registry, name = "debian/python3", tag = SUITE)
      registry.push_layers(name, tag, layers, env: ENV, workdir: WORKDIR, cmd: ["python3"])
    end

    def build(dir)
      FileUtils.rm_rf(dir)
      FileUtils.mkdir_p(dir)
      root = File.join(dir, "rootfs")
      t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      debootstrap(root, File.join(dir, "debootstrap.log"))
      trim(root)
      add_app_files(root)
      py = Dir.glob("usr/lib/python3.*", base: root).sort
      raise "debootstrap produced no /usr/lib/python3.* in #{root}" if py.empty?

      layer2 = [*py.map { |p| "./#{p}" }, "./srv", "./etc/.wh.motd"]
      layers = [
        pack(root, File.join(dir, "layer1.tar.gz"), ["--anchored", *layer2.map { |p| "--exclude=#{p}" }, "."]),
        pack(root, File.join(dir, "layer2.tar.gz"), layer2)
      ]
      File.write(File.join(dir, "layers.json"),
                 JSON.pretty_generate(layers.map { |l| l.to_h.merge(path: File.basename(l.path)) }))
      warn format("debian/python3 test image built in %.1f s (layers: %s)",
                  Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0,
                  layers.map { |l| "#{l.size >> 20} MiB" }.join(", "))
    ensure
      root_cmd("rm", "-rf", root) if root && File.exist?(root)
    end

    def debootstrap(root, log)
      raise "debootstrap is missing: install Debian's debootstrap package (bin/setup does)" unless system("command -v debootstrap >/dev/null")

      source = AptSources.find(SUITE)
      args = ["debootstrap", "--variant=minbase", "--include=python3-minimal",
              "--cache-dir=#{File.expand_path('../../tmp/debootstrap-cache', __dir__).tap { |d| FileUtils.mkdir_p(d) }}"]
      args << "--keyring=#{source[:keyring]}" if source[:keyring]
      args += [SUITE, root, source[:uri]]
      ok = root_cmd(*args, out: log, err: [:child, :out])
      return if ok

      raise "debootstrap #{SUITE} from #{source[:uri]} failed (see #{log}):\n#{File.readlines(log).last(15).join}"
    end

    # What Debian's slim images leave out; none of it is needed to run programs.
    def trim(root)
      %w[var/cache/apt/archives var/lib/apt/lists usr/share/doc usr/share/man usr/share/locale usr/share/info].each do |d|
        root_cmd("find", File.join(root, d), "-mindepth", "1", "-not", "-name", "lock", "-not", "-name", "partial", "-delete")
      end
    end

    def add_app_files(root)
      app = File.join(root, "srv/app")
      root_cmd("mkdir", "-p", app)
      IO.popen(root_prefix + ["tee", File.join(app, "hello.py")], "w", out: File::NULL) { |io| io.write(HELLO_PY) }
      # A whiteout in layer 2 deletes layer 1's /etc/motd.
      root_cmd("touch", File.join(root, "etc/.wh.motd"))
    end

    # Streams `tar` of `members` (relative to root) through SHA-256 (diff_id) and gzip.
    def pack(root, out, members)
      diff = Digest::SHA256.new
      File.open(out, "wb") do |f|
        gz = Zlib::GzipWriter.new(f, Zlib::BEST_SPEED)
        IO.popen(root_prefix + ["tar", "-C", root, "--numeric-owner", "--xattrs", "-cf", "-", *members], "rb") do |tar|
          while (chunk = tar.read(1 << 20))
            diff.update(chunk)
            gz.write(chunk)
          end
        end
        raise "tar of #{members.join(' ')} in #{root} failed" unless $?.success?

        gz.finish
      end
      Layer.new(path: out, digest: "sha256:#{Digest::SHA256.file(out).hexdigest}", size: File.size(out),
                diff_id: "sha256:#{diff.hexdigest}")
    end

    # debootstrap and reading its result (e.g. /etc/shadow) need root: through sudo when not root.
    def root_prefix
      Process.uid.zero? ? [] : ["sudo", "-n"]
    end

    def root_cmd(*args, **opts)
      system(*root_prefix, *args, **opts)
    end
  end

  # Reads apt's configured sources, so the test image comes from the mirror this machine
  # already uses (never a hard-coded host).
  module AptSources
    module_function

    # { uri:, keyring: } of the first source serving `suite` with component main.
    def find(suite)
      entries.find { |e| e[:suites].include?(suite) && e[:components].include?("main") } ||
        raise("no apt source for Debian #{suite} (main) in /etc/apt/sources.list(.d); " \
              "the Debian test image is built from the mirror apt uses")
    end

    def entries
      files = ["/etc/apt/sources.list", *Dir.glob("/etc/apt/sources.list.d/*.{list,sources}").sort]
      files.select { |f| File.file?(f) }.flat_map { |f| f.end_with?(".sources") ? deb822(File.read(f)) : one_line(File.read(f)) }
    end

    # `deb [opts] uri suite components...` lines.
    def one_line(text)
      text.lines.filter_map do |line|
        line = line.sub(/#.*/, "").strip
        next unless line.start_with?("deb ")

        opts = line[/\[(.*?)\]/, 1].to_s
        uri, suite, *components = line.sub(/\[.*?\]/, "").split.drop(1)
        keyring = opts[/signed-by=(\S+)/, 1]
        { uri: uri, suites: [suite], components: components, keyring: keyring && File.file?(keyring) ? keyring : nil }
      end
    end

    # deb822 stanzas (Types/URIs/Suites/Components/Signed-By).
    def deb822(text)
      text.split(/\n\s*\n/).filter_map do |stanza|
        fields = stanza.lines.reject { |l| l.start_with?("#") }.filter_map { |l| l.split(":", 2).map(&:strip) if l.include?(":") && l !~ /\A\s/ }.to_h
        next unless fields["Types"].to_s.split.include?("deb") && fields["Enabled"] != "no"

        keyring = fields["Signed-By"]
        fields["URIs"].to_s.split.map do |uri|
          { uri: uri, suites: fields["Suites"].to_s.split, components: fields["Components"].to_s.split,
            keyring: keyring && File.file?(keyring) ? keyring : nil }
        end
      end.flatten
    end
  end
end
