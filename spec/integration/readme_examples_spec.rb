# frozen_string_literal: true

require "fileutils"
require "stringio"
require "tmpdir"
require_relative "../support/registry"
require_relative "../support/debian_image"
require_relative "../support/tar_writer"

# The reference gem's README (/work/shared/seeds/ruby-gem-readme.txt, the 0.5.7 README) run
# as written: each example below is its text copied verbatim, then evaluated with one
# mechanical change: the public mirror `public.ecr.aws/docker/library/<image>` becomes the
# suite's own registry on 127.0.0.1 (plain HTTP, so create calls get `registry_insecure:
# true`). "alpine:latest" there is the suite's busybox root, "python:3-slim" its Debian
# python3 image. What the README shows in comments (`# => …`) or prints is checked.
#
# Not run here, because they belong to other issues: Named volumes, and Private registries
# (registry.example.com, needs credentials). Configuration publishes the host's port 8080
# (on 127.0.0.1), so it needs that port free.
RSpec.describe "the reference gem's README examples" do
  def mirror = "public.ecr.aws/docker/library/"

  before(:all) do
    @registry = MicrosandboxSpec::Registry.instance
    @registry.push_dir("docker/library/alpine", "latest", MicrosandboxSpec::Rootfs.busybox_dir)
    # python:3-slim has a `python` command; the suite's Debian image has python3, so a third
    # layer adds /usr/local/bin/python (on the image's PATH) running python3.
    @shim_dir = Dir.mktmpdir("msb-readme-layer")
    shim = MicrosandboxSpec::TarWriter.new.file("usr/local/bin/python", "#!/bin/sh\nexec python3 \"$@\"\n", mode: 0o755)
                                      .write_layer(File.join(@shim_dir, "python.tar.gz"))
    @registry.push_layers("docker/library/python", "3-slim", MicrosandboxSpec::DebianImage.layers + [shim],
                          env: MicrosandboxSpec::DebianImage::ENV, workdir: MicrosandboxSpec::DebianImage::WORKDIR,
                          cmd: ["python3"])
    @names = %w[hello box exec-demo fs-demo obs stream dup configured]
  end

  after(:all) { FileUtils.rm_rf(@shim_dir) if @shim_dir }

  after do
    @names.each do |n|
      Microsandbox::Sandbox.get(n).kill if Microsandbox::Sandbox.list.any? { |s| s.name == n && s.running? }
      Microsandbox::Sandbox.remove(n) if Microsandbox::Sandbox.list.any? { |s| s.name == n }
    end
  end

  # Evaluates README code with the mirror replaced by the local registry; returns what it
  # printed to stdout and its value.
  def run_readme(code)
    local = code.gsub(/image:\s*"#{Regexp.escape(mirror)}([^"]+)"/) { %(image: "#{@registry.host}/docker/library/#{Regexp.last_match(1)}", registry_insecure: true) }
                .gsub(mirror, "#{@registry.host}/docker/library/")
    out = StringIO.new
    old = $stdout
    $stdout = out
    value = begin
      TOPLEVEL_BINDING.dup.eval(local, "README")
    ensure
      $stdout = old
    end
    [out.string, value]
  end

  it "Quick start" do
    printed, = run_readme(<<~'RUBY')
      require "microsandbox"

      Microsandbox::Sandbox.create("hello", image: "public.ecr.aws/docker/library/python:3-slim") do |sb|
        output = sb.exec("python", ["-c", "print('Hello, World!')"])
        puts output.stdout      # => "Hello, World!\n"
        puts output.success?    # => true
      end
      # the sandbox is stopped automatically when the block returns
    RUBY
    expect(printed).to eq("Hello, World!\ntrue\n")
    expect(Microsandbox::Sandbox.get("hello").status).to eq(:stopped)
  end

  it "Configuration" do
    run_readme(<<~'RUBY')
      Microsandbox::Sandbox.create(
        "configured",
        image:    "public.ecr.aws/docker/library/python:3-slim",
        cpus:     2,
        memory:   1024,                      # MiB
        env:      { "API_BASE" => "https://example.com" },
        workdir:  "/app",
        labels:   { "team" => "research" },
        ports:    { 8080 => 80 },            # host => guest (TCP)
        network:  "public_only",             # or "none" for airgapped
        replace:  true                       # replace an existing sandbox of the same name
      ) do |sb|
        # ...
      end
    RUBY
    handle = Microsandbox::Sandbox.get("configured")
    expect(handle.status).to eq(:stopped)
    expect(handle.labels).to eq("team" => "research")
    expect(handle.config).to include("cpus" => 2, "memory_mib" => 1024, "workdir" => "/app",
                                     "ports" => [{ "host_port" => 8080, "guest_port" => 80 }])
    # The published port closed with the sandbox.
    expect { TCPSocket.new("127.0.0.1", 8080) }.to raise_error(Errno::ECONNREFUSED)
  end

  it "Lifecycle" do
    run_readme(<<~'RUBY')
      # Block form — recommended; stops the sandbox automatically (even on error)
      Microsandbox::Sandbox.create("box", image: "public.ecr.aws/docker/library/alpine:latest") do |sb|
        # ...
      end
    RUBY
    expect(Microsandbox::Sandbox.get("box").stopped?).to be(true)
    Microsandbox::Sandbox.remove("box")

    _, sb = run_readme(<<~'RUBY')
      # Manual form — you are responsible for stopping it
      sb = Microsandbox::Sandbox.create("box", image: "public.ecr.aws/docker/library/alpine:latest")
      begin
        # ...
      ensure
        sb.stop          # graceful (sb.stop(timeout: 5) to bound the wait)
        # sb.kill        # force (SIGKILL)
      end
      sb
    RUBY
    expect(sb.running?).to be(false)

    # Inspect / manage existing sandboxes (one line at a time: `start` leaves it running).
    _, list = run_readme("Microsandbox::Sandbox.list            # => [Microsandbox::SandboxInfo, ...]")
    expect(list).to all(be_a(Microsandbox::SandboxInfo))
    _, info = run_readme('Microsandbox::Sandbox.get("box")      # => Microsandbox::SandboxInfo')
    expect(info).to be_a(Microsandbox::SandboxInfo)
    _, started = run_readme('Microsandbox::Sandbox.start("box")    # restart a stopped sandbox')
    expect(started.running?).to be(true)
    started.stop
    _, removed = run_readme('Microsandbox::Sandbox.remove("box")   # remove a stopped sandbox')
    expect(removed).to be_nil
    expect(Microsandbox::Sandbox.list.map(&:name)).not_to include("box")
  end

  it "Executing commands" do
    _, value = run_readme(<<~'RUBY')
      Microsandbox::Sandbox.create("exec-demo", image: "public.ecr.aws/docker/library/alpine:latest") do |sb|
        # Direct command (no shell)
        out = sb.exec("ls", ["-la", "/etc"], cwd: "/", timeout: 30)
        out.exit_code   # => 0
        out.success?    # => true
        out.stdout      # => "..." (UTF-8)
        out.stderr_bytes # => raw ASCII-8BIT bytes

        # Shell script (pipes, redirects, &&)
        sb.shell("cat /etc/os-release | grep VERSION").stdout

        # Environment, stdin, working directory
        sb.exec("cat", [], stdin: "piped data")
        sb.exec("sh", ["-c", "echo $GREETING"], env: { "GREETING" => "hi" })
      end
    RUBY
    expect(value).to be_a(Microsandbox::ExecOutput)
    expect(value.stdout).to eq("hi\n")
  end

  it "Guest filesystem" do
    Dir.mktmpdir("msb-readme") do |dir|
      Dir.chdir(dir) do
        File.write("local.txt", "from the host\n")
        run_readme(<<~'RUBY')
          Microsandbox::Sandbox.create("fs-demo", image: "public.ecr.aws/docker/library/alpine:latest") do |sb|
            sb.fs.write("/tmp/data.txt", "hello")
            sb.fs.read_text("/tmp/data.txt")     # => "hello"  (UTF-8)
            sb.fs.read("/tmp/data.txt")          # => raw bytes (ASCII-8BIT)
            sb.fs.exists?("/tmp/data.txt")       # => true

            sb.fs.mkdir("/tmp/sub")
            sb.fs.copy("/tmp/data.txt", "/tmp/sub/copy.txt")
            sb.fs.rename("/tmp/sub/copy.txt", "/tmp/sub/renamed.txt")
            sb.fs.list("/tmp/sub")               # => [Microsandbox::FsEntry, ...]
            sb.fs.stat("/tmp/data.txt")          # => Microsandbox::FsMetadata

            # Host <-> guest copies
            sb.fs.copy_from_host("./local.txt", "/tmp/local.txt")
            sb.shell("cp /tmp/local.txt /tmp/out.txt")   # (not in the README: gives out.txt content)
            sb.fs.copy_to_host("/tmp/out.txt", "./out.txt")
          end
        RUBY
        expect(File.read(File.join(dir, "out.txt"))).to eq("from the host\n")
      end
    end
  end

  it "Metrics & logs" do
    printed, = run_readme(<<~'RUBY')
      Microsandbox::Sandbox.create("obs", image: "public.ecr.aws/docker/library/alpine:latest") do |sb|
        m = sb.metrics                       # => Microsandbox::Metrics
        m.cpu_percent
        m.memory_bytes
        m.uptime_secs

        sb.exec("echo", ["logged"])          # (not in the README: something to log)
        sleep 1
        sb.logs(tail: 100, sources: ["stdout", "stderr"]).each do |entry|
          puts "[#{entry.source}] #{entry.text}"
        end
      end
    RUBY
    expect(printed).to eq("[stdout] logged\n")
  end

  it "Streaming output, and its interactive stdin note" do
    printed, = run_readme(<<~'RUBY')
      Microsandbox::Sandbox.create("stream", image: "public.ecr.aws/docker/library/python:3-slim") do |sb|
        handle = sb.exec_stream("python", ["-u", "-c", "import time\nfor i in range(3): print(i); time.sleep(1)"])
        handle.each do |event|       # ExecHandle is Enumerable
          print event.text if event.stdout?
        end
        # or: out = handle.collect  → ExecOutput  (drain to the end)
        # control: handle.signal(15), handle.kill, handle.resize(rows, cols)
      end
    RUBY
    expect(printed).to eq("0\n1\n2\n")
  end

  it "Images" do
    run_readme('Microsandbox::Sandbox.create("box", image: "public.ecr.aws/docker/library/alpine:latest") { }')
    Microsandbox::Sandbox.remove("box")
    _, values = run_readme(<<~'RUBY')
      [
      Microsandbox::Image.list,           # => [Microsandbox::ImageInfo, ...]
      Microsandbox::Image.get("public.ecr.aws/docker/library/alpine:latest"),  # => Microsandbox::ImageInfo
      Microsandbox::Image.inspect("public.ecr.aws/docker/library/alpine:latest").layers,  # => [{...}, ...]
      Microsandbox::Image.remove("public.ecr.aws/docker/library/alpine:latest", force: true),
      (report = Microsandbox::Image.prune
      report.bytes_reclaimed)
      ]
    RUBY
    list, info, layers, removed, reclaimed = values
    expect(list).to all(be_a(Microsandbox::ImageInfo))
    expect(info).to be_a(Microsandbox::ImageInfo)
    expect(layers).to all(be_a(Hash))
    expect(removed).to be_nil
    expect(reclaimed).to be_a(Integer)
  end

  it "Error handling" do
    err = StringIO.new
    old = $stderr
    $stderr = err
    begin
      run_readme(<<~'RUBY')
        begin
          Microsandbox::Sandbox.create("dup", image: "public.ecr.aws/docker/library/alpine:latest")
          Microsandbox::Sandbox.create("dup", image: "public.ecr.aws/docker/library/alpine:latest")  # name clash
        rescue Microsandbox::SandboxAlreadyExistsError => e
          warn "#{e.code}: #{e.message}"       # => "sandbox-already-exists: ..."
        rescue Microsandbox::Error => e
          warn "microsandbox failed: #{e.message}"
        end
      RUBY
    ensure
      $stderr = old
    end
    expect(err.string).to start_with("sandbox-already-exists: ")
    { Microsandbox::InvalidConfigError => "invalid-config", Microsandbox::SandboxNotFoundError => "sandbox-not-found",
      Microsandbox::SandboxAlreadyExistsError => "sandbox-already-exists",
      Microsandbox::SandboxStillRunningError => "sandbox-still-running", Microsandbox::ExecTimeoutError => "exec-timeout",
      Microsandbox::ExecFailedError => "exec-failed", Microsandbox::FilesystemError => "filesystem-error",
      Microsandbox::ImageNotFoundError => "image-not-found", Microsandbox::MetricsDisabledError => "metrics-disabled",
      Microsandbox::MetricsUnavailableError => "metrics-unavailable" }.each do |klass, code|
      expect(klass.new("x").code).to eq(code)
    end
  end

  it "Installation and runtime configuration" do
    _, values = run_readme(<<~'RUBY')
      Microsandbox.install unless Microsandbox.installed?
      [
      Microsandbox.installed?,            # => true/false
      Microsandbox.install,               # download + install the runtime (idempotent)
      Microsandbox.runtime_path           # => "/Users/you/.microsandbox/bin/msb"
      ]
    RUBY
    expect(values[0]).to be(true)
    expect(values[2]).to end_with("/bin/msb")
    begin
      run_readme('Microsandbox.runtime_path = "/opt/microsandbox/bin/msb"  # override')
      expect(Microsandbox.runtime_path).to eq("/opt/microsandbox/bin/msb") if ENV.fetch("MSB_PATH", "").empty?
    ensure
      Microsandbox.runtime_path = nil
    end
  end
end
