# frozen_string_literal: true

require "open3"
require "pty"
require "io/console"
require "base64"
require "json"
require "net/http"
require "socket"
require_relative "../support/registry"

# The `microsandbox` executable, run as a subprocess exactly as a user runs it: exit
# statuses, stdout/stderr bytes, --json documents. Sandboxes are real VMs.
RSpec.describe "microsandbox CLI" do
  def exe = File.expand_path("../../exe/microsandbox", __dir__)
  def lib = File.expand_path("../../lib", __dir__)

  def cli(*args, stdin: "", env: {})
    out, err, status = Open3.capture3(env, RbConfig.ruby, "-I", lib, exe, *args, stdin_data: stdin, binmode: true)
    [out, err, status.exitstatus]
  end

  # Runs the CLI on a pseudo-terminal; yields [reader, writer], returns [output, status].
  def cli_on_pty(*args, rows: 30, cols: 100)
    reader, writer, pid = PTY.spawn(RbConfig.ruby, "-I", lib, exe, *args)
    reader.winsize = [rows, cols]
    output = +""
    pump = Thread.new do
      loop { output << reader.readpartial(4096) }
    rescue EOFError, Errno::EIO
      nil
    end
    yield reader, writer, output
    _, status = Timeout.timeout(60) { Process.wait2(pid) }
    pump.join(5)
    [output, status.exitstatus]
  end

  def wait_for_output(output, pattern, timeout: 60)
    expect(wait_until(timeout: timeout) { output.match?(pattern) }).to be(true), "no #{pattern.inspect} in #{output.inspect}"
  end

  def sandbox_entries
    Dir.children(File.join(Microsandbox.home, "sandboxes")).sort
  rescue Errno::ENOENT
    []
  end

  describe "run" do
    it "passes the command's exit status and exact stdout/stderr bytes through; --rm leaves nothing behind" do
      before = sandbox_entries
      name = unique_name("cli-rm")
      out, err, status = cli("run", "--rm", "--name", name, "-e", "FOO=bar", "-w", "/srv", rootfs, "--",
                             "sh", "-c", "printf 'out %s\\377\\n' \"$FOO\"; pwd; printf 'err\\000x' >&2; exit 3")
      expect(status).to eq(3)
      expect(out).to eq("out bar\xFF\n/srv\n".b)
      expect(err).to eq("err\0x".b)
      expect(sandbox_entries).to eq(before)
      expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(name)
      expect(processes_mentioning(sandbox_dir(name))).to be_empty
    end

    it "--rm cleans up when the run is interrupted (SIGINT: 130) or terminated (SIGTERM)" do
      before = sandbox_entries
      { INT: 130, TERM: nil }.each do |signal, status|
        name = unique_name("cli-#{signal.downcase}")
        pid = Process.spawn(RbConfig.ruby, "-I", lib, exe, "run", "--rm", "--name", name, rootfs, "--", "sleep", "300",
                            out: File::NULL, err: File::NULL)
        expect(wait_until(timeout: 120) { Microsandbox::Sandbox.list.any? { |h| h.name == name && h.running? } }).to be(true)
        Process.kill(signal, pid)
        _, st = Timeout.timeout(60) { Process.wait2(pid) }
        status ? expect(st.exitstatus).to(eq(status)) : expect(st.termsig).to(eq(Signal.list["TERM"]))
        # The signal can land after the VM booted but before `create` returned, when the
        # command has no handle to clean up with: then the VM dies with the command and,
        # --rm sandboxes being ephemeral, its record goes once the supervisor has exited.
        gone = wait_until(timeout: 20) do
          !Microsandbox::Sandbox.list.map(&:name).include?(name) && processes_mentioning(sandbox_dir(name)).empty?
        end
        expect(gone).to be(true), "#{name} left: #{Microsandbox::Sandbox.list.map(&:name)} #{processes_mentioning(sandbox_dir(name))}"
      end
      expect(sandbox_entries).to eq(before)
    end

    it "-it runs on a terminal in raw mode: Ctrl-C reaches the guest, the status comes back, --rm cleans up" do
      name = unique_name("cli-tty")
      output, status = cli_on_pty("run", "--rm", "-it", "--name", name, rootfs, "--", "sh", rows: 33, cols: 97) do |_r, w, buf|
        wait_for_output(buf, /# /)
        w.write("stty size; sleep 300\n")
        wait_for_output(buf, /33 97\r\n/)
        # Raw mode: Ctrl-C is a byte for the guest's terminal, which interrupts sleep. Under
        # load it can arrive before sleep runs (and be spent on the shell): send it again
        # until the shell prompts once more.
        mark = buf.size
        back = 20.times.any? do
          w.write("\x03")
          wait_until(timeout: 3) { buf[mark..].match?(/\^C.*# /m) }
        end
        expect(back).to be(true), "no prompt after Ctrl-C: #{buf[mark..].inspect}"
        w.write("echo after-interrupt; exit 4\n")
      end
      expect(status).to eq(4)
      expect(output).to include("after-interrupt\r\n")
      expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(name)
    end

    it "--json prints one document with the exit code and bytes (base64 when not UTF-8)" do
      name = unique_name("cli-json")
      out, err, status = cli("--json", "run", "--rm", "--name", name, rootfs, "--",
                             "sh", "-c", "printf 'a\\377'; echo é >&2; exit 4")
      expect(status).to eq(4)
      expect(err).to eq("")
      doc = JSON.parse(out)
      expect(doc).to include("name" => name, "exit_code" => 4, "signal" => nil, "stderr" => "é\n")
      expect(doc).not_to have_key("stderr_base64")
      expect(Base64.strict_decode64(doc.fetch("stdout_base64"))).to eq("a\xFF".b)
      expect(doc["stdout"]).to eq("a\uFFFD")
    end
  end

  describe "a detached sandbox" do
    it "is driven by exec, shell, ls, inspect, metrics, logs, stop, start, kill and rm" do
      name = unique_name("cli-box")
      out, err, status = cli("run", "-d", "--name", name, "-l", "team=qa", "-e", "TOKEN=tok-#{name}", rootfs,
                             "sh", "-c", "echo main-out; sleep 600")
      expect([out, err, status]).to eq(["#{name}\n", "", 0])

      list = JSON.parse(cli("--json", "ls").first)
      expect(list.find { |s| s["name"] == name }).to include("status" => "running", "labels" => { "team" => "qa" },
                                                             "detached" => true, "image" => rootfs)
      expect(cli("ps").first).to match(/^#{name}\s+running\s+#{Regexp.escape(rootfs)}/)

      # stdin with -i, status passed through
      expect(cli("exec", "-i", name, "--", "sh", "-c", "cat; exit 7", stdin: "hello\n")).to eq(["hello\n", "", 7])
      # without -i the command reads EOF, not our stdin
      expect(cli("exec", name, "cat", stdin: "ignored")).to eq(["", "", 0])
      # exec's own options
      expect(cli("exec", "-e", "X=1", "-w", "/tmp", "-u", "nobody", name, "sh", "-c", "echo $X; pwd; id -u"))
        .to eq(["1\n/tmp\n65534\n", "", 0])
      # failures: documented statuses, the error code on stderr
      out, err, status = cli("exec", name, "no-such-program")
      expect([out, status]).to eq(["", 127])
      expect(err).to start_with("microsandbox: exec-failed: ")
      out, err, status = cli("exec", "--timeout", "1", name, "sleep", "30")
      expect([out, status]).to eq(["", 124])
      expect(err).to start_with("microsandbox: exec-timeout: ")
      out, err, status = cli("--json", "exec", name, "sh", "-c", "echo ok; exit 2")
      expect([JSON.parse(out)["stdout"], err, status]).to eq(["ok\n", "", 2])

      doc = JSON.parse(cli("inspect", name).first)
      expect(doc.size).to eq(1)
      expect(doc[0]).to include("name" => name, "status" => "running")
      expect(doc[0]["vm"]).to include("vmm" => "qemu")
      expect(doc[0]["config"]).not_to have_key("env")
      expect(cli("inspect", name).first).not_to include("tok-#{name}") # env values may be secrets
      expect(cli("exec", name, "sh", "-c", "echo $TOKEN")).to eq(["tok-#{name}\n", "", 0])
      expect(cli("metrics", name).first).to match(/\ANAME +CPU +MEMORY +DISK-READ +DISK-WRITE +UPTIME\n#{name} +\d+\.\d%/)

      # an interactive shell on a terminal: the guest sees our size, then our resize
      output, status = cli_on_pty("shell", name) do |reader, writer, buf|
        wait_for_output(buf, /# /)
        writer.write("stty size\n")
        wait_for_output(buf, /30 100/)
        reader.winsize = [41, 123]
        # SIGWINCH is forwarded asynchronously: ask until the guest sees the new size.
        mark = buf.size
        resized = 20.times.any? do
          writer.write("stty size\n")
          wait_until(timeout: 3) { buf[mark..].include?("41 123\r\n") }
        end
        expect(resized).to be(true), "the guest never saw 41x123: #{buf[mark..].inspect}"
        writer.write("tty\n")
        wait_for_output(buf, %r{/dev/pts/\d+\r\n})
        writer.write("exit 5\n")
      end
      expect(status).to eq(5)
      expect(output).to include("41 123")

      # logs: stdout entries on stdout; -f follows until the sandbox stops
      out, = cli("logs", name)
      expect(out).to include("main-out\n", "hello\n")
      follower_in, follower_out, follower = Open3.popen2(RbConfig.ruby, "-I", lib, exe, "logs", "-f", "--tail", "1", name, "--source", "stdout")
      follower_in.close
      metrics_in, metrics_out, metrics_follower = Open3.popen2(RbConfig.ruby, "-I", lib, exe, "--json", "metrics", "-f",
                                                               "--interval", "0.5", name)
      metrics_in.close
      first_sample = Timeout.timeout(120) { metrics_out.gets } # one sample before the sandbox stops
      sleep 1
      expect(cli("exec", name, "echo", "while-following")).to eq(["while-following\n", "", 0])
      expect(cli("stop", name)).to eq(["#{name}\n", "", 0])
      expect(Timeout.timeout(60) { follower.value }.exitstatus).to eq(0)
      followed = follower_out.read
      expect(followed).to end_with("while-following\n")
      expect(followed).not_to include("main-out")
      expect(Timeout.timeout(60) { metrics_follower.value }.exitstatus).to eq(0) # ends when the sandbox stops
      samples = ([first_sample] + metrics_out.read.lines).map { |l| JSON.parse(l) }
      expect(samples).not_to be_empty
      expect(samples).to all(include("name" => name))
      expect(samples.first).to include("cpu_percent", "memory_bytes", "uptime_secs", "timestamp")
      expect(samples.first["memory_bytes"]).to be > (16 << 20)

      expect(JSON.parse(cli("inspect", name).first)[0]).to include("status" => "stopped")
      expect(cli("exec", name, "true")[2]).to eq(125)
      expect(cli("start", name)).to eq(["#{name}\n", "", 0])
      expect(cli("exec", name, "echo", "back")).to eq(["back\n", "", 0])
      out, err, status = cli("rm", name)
      expect([out, status]).to eq(["", 125])
      expect(err).to start_with("microsandbox: sandbox-still-running: #{name}: ")
      expect(cli("kill", name)).to eq(["#{name}\n", "", 0])
      expect(cli("rm", name)).to eq(["#{name}\n", "", 0])
      expect(processes_mentioning(sandbox_dir(name))).to be_empty
      expect(File.exist?(sandbox_dir(name))).to be(false)

      out, err, status = cli("--json", "exec", name, "true")
      expect([out, status]).to eq(["", 125])
      expect(JSON.parse(err)).to eq("error" => { "code" => "sandbox-not-found",
                                                 "message" => "no sandbox named #{name.inspect}", "exit_status" => 125 })
    end
  end

  describe "images" do
    before(:all) do
      @registry = MicrosandboxSpec::Registry.instance
      @ref = @registry.push_dir("cli/busybox", "1.0", MicrosandboxSpec::Rootfs.busybox_dir)
    end

    it "pull prints a line per finished layer when stderr is not a terminal; image ls/inspect/rm/prune" do
      out, err, status = cli("pull", "--insecure", @ref)
      expect(status).to eq(0)
      expect(out).to match(/\A#{Regexp.escape(@ref)} sha256:[0-9a-f]{64}\n\z/)
      expect(err).to match(/\A[0-9a-f]{12}  \d+\.\d MiB  done\n\z/)

      listed = JSON.parse(cli("--json", "image", "ls").first)
      expect(listed.map { |i| i["reference"] }).to include(@ref)
      expect(cli("image", "ls").first).to include(@ref)
      detail = JSON.parse(cli("image", "inspect", @ref).first)
      expect(detail["layers"].size).to eq(1)
      expect(detail["manifest_digest"]).to eq(out.split.last)

      expect(cli("image", "rm", @ref)).to eq(["#{@ref}\n", "", 0])
      expect(JSON.parse(cli("--json", "image", "ls").first).map { |i| i["reference"] }).not_to include(@ref)
      prune = JSON.parse(cli("--json", "image", "prune").first)
      expect(prune["bytes_reclaimed"]).to be_a(Integer)
      expect(prune.keys).to include("image_refs_removed", "manifests_removed", "layers_removed", "fsmeta_removed",
                                    "vmdk_removed")
      out, err, status = cli("image", "inspect", @ref)
      expect([out, status]).to eq(["", 125])
      expect(err).to start_with("microsandbox: image-not-found: ")
    end

    it "pull --json streams progress events, then the result" do
      out, err, status = cli("--json", "pull", "--insecure", @ref)
      expect([err, status]).to eq(["", 0])
      events = out.lines.map { |l| JSON.parse(l) }
      expect(events[0..-2]).to all(include("event" => "progress"))
      expect(events[-2]["done"]).to eq(events[-2]["total"])
      expect(events.last).to include("event" => "pulled", "reference" => @ref)
    end

    it "pull draws a progress bar per layer on a terminal" do
      cli("image", "rm", @ref)
      cli("image", "prune")
      output, status = cli_on_pty("pull", "--insecure", @ref) { |*| nil }
      expect(status).to eq(0)
      expect(output).to match(/[0-9a-f]{12}  \[#{'#' * 30}\] 100\.0%  \d+\.\d MiB \/ \d+\.\d MiB/)
    end
  end

  describe "volumes" do
    if Microsandbox.const_defined?(:Volume, false)
      it "volume create/ls/inspect/rm; run -v mounts a named volume or a host directory, --tmpfs a tmpfs" do
        vol = unique_name("clivol")
        expect(cli("volume", "create", "-l", "k=v", vol)).to eq(["#{vol}\n", "", 0])
        listed = JSON.parse(cli("--json", "volume", "ls").first).find { |v| v["name"] == vol }
        expect(listed).to include("kind" => "dir", "labels" => { "k" => "v" })
        out, err, status = cli("run", "--rm", "-v", "#{vol}:/data", rootfs, "--", "sh", "-c", "echo kept > /data/f; cat /data/f")
        expect([out, err, status]).to eq(["kept\n", "", 0])
        expect(Microsandbox::Volume.fs(vol).read("f")).to eq("kept\n")
        out, = cli("run", "--rm", "-v", "#{vol}:/data:ro", rootfs, "--", "sh", "-c", "echo x > /data/g || echo read-only")
        expect(out).to end_with("read-only\n")
        Dir.mktmpdir("cli-bind") do |host|
          File.write(File.join(host, "from-host"), "hi\n")
          out, err, status = cli("run", "--rm", "-v", "#{host}:/host:ro", "--tmpfs", "/scratch:16", rootfs, "--", "sh", "-c",
                                 "cat /host/from-host; touch /host/x 2>/dev/null || echo ro; mount | grep -c ' /scratch type tmpfs'")
          expect([out, err, status]).to eq(["hi\nro\n1\n", "", 0])
          expect(Dir.children(host)).to eq(["from-host"])
        end
        expect(JSON.parse(cli("volume", "inspect", vol).first)[0]).to include("name" => vol, "kind" => "dir")
        expect(cli("volume", "rm", vol)).to eq(["#{vol}\n", "", 0])
        expect(cli("volume", "inspect", vol)[2]).to eq(125)
      end
    else
      it "volume commands and -v are refused with the unsupported code while volumes do not exist" do
        out, err, status = cli("volume", "ls")
        expect([out, status]).to eq(["", 125])
        expect(err).to start_with("microsandbox: unsupported: named volumes")
        expect(cli("run", "-v", "data:/data", rootfs, "true")[1]).to start_with("microsandbox: unsupported: -v/--tmpfs need volumes")
      end
    end
    it "-v and --tmpfs take docker's forms" do
      expect(cli("run", "-v", "data", rootfs, "true")[1]).to include("-v takes SOURCE:/GUEST[:ro]")
      expect(cli("run", "--tmpfs", "tmp", rootfs, "true")[1]).to include("--tmpfs takes /GUEST[:SIZE_MIB]")
    end
  end

  describe "snapshots" do
    it "snapshot create/ls/inspect/verify/export/rm/import, and run --from-snapshot boots one" do
      base = unique_name("cli-snapbase")
      snap = unique_name("cli-snap")
      expect(cli("run", "--name", base, rootfs, "--", "sh", "-c", "echo from-base > /root/marker")).to eq(["", "", 0])
      out, err, status = cli("snapshot", "create", "--name", snap, "-l", "k=v", base)
      expect([err, status]).to eq(["", 0])
      expect(out).to match(/\A#{snap} sha256:[0-9a-f]{64}\n\z/)
      digest = out.split.last
      listed = JSON.parse(cli("--json", "snapshot", "ls").first).find { |s| s["name"] == snap }
      expect(listed).to include("digest" => digest, "source_sandbox" => base, "labels" => { "k" => "v" })
      expect(JSON.parse(cli("snapshot", "inspect", snap).first)[0]).to include("name" => snap, "digest" => digest)
      out, _, status = cli("snapshot", "verify", snap)
      expect(status).to eq(0)
      expect(out).to end_with(" #{digest}\n")

      expect(cli("run", "--rm", "--from-snapshot", snap, "--", "cat", "/root/marker")).to eq(["from-base\n", "", 0])

      Dir.mktmpdir("cli-snap-export") do |dir|
        tar = File.join(dir, "snap.tar")
        expect(cli("snapshot", "export", snap, tar)).to eq(["#{tar}\n", "", 0])
        expect(cli("snapshot", "rm", snap)).to eq(["#{snap}\n", "", 0])
        expect(cli("snapshot", "inspect", snap)[2]).to eq(125)
        out, err, status = cli("snapshot", "import", tar)
        expect([out, err, status]).to eq(["#{snap} #{digest}\n", "", 0])
      end
      expect(cli("snapshot", "rm", "-f", snap)).to eq(["#{snap}\n", "", 0])
      expect(cli("rm", base)).to eq(["#{base}\n", "", 0])
    end
  end

  describe "command-line errors (no VM)" do
    it "exits 2 with the usage on stderr" do
      out, err, status = cli("run", rootfs)
      expect([out, status]).to eq(["", 2])
      expect(err).to eq("microsandbox: usage: run: give a COMMAND, or -d to leave the sandbox running " \
                        "(see `microsandbox help run`)\n")
      expect(cli("frob")[1]).to start_with("microsandbox: usage: unknown command \"frob\"")
      expect(cli("run", "--memory", "lots", rootfs, "true")[2]).to eq(2)
      expect(cli("run", "-p", "80", rootfs, "true")[1]).to include("-p takes [ADDR:]HOST:GUEST[/tcp|/udp]")
      expect(cli("stop")[2]).to eq(2)
      out, _, status = cli("--help")
      expect(status).to eq(0)
      expect(out).to include("Exit status:", "doctor")
      expect(cli("help", "exec").first).to include("usage: microsandbox exec [OPTIONS] NAME [--] COMMAND [ARG...]")
      expect(cli("--version").first).to eq("microsandbox #{Microsandbox::VERSION} (runtime #{Microsandbox::RUNTIME_VERSION})\n")
    end

    if Microsandbox::Sandbox.method(:create).parameters.map(&:last).include?(:ports)
      it "-p publishes a guest port on the host's loopback" do
        port = TCPServer.open("127.0.0.1", 0) { |s| s.addr[1] }
        name = unique_name("cli-port")
        out, err, status = cli("run", "-d", "--name", name, "-p", "#{port}:8080", rootfs, "--",
                               "sh", "-c", "echo hello-port > /tmp/index.html; httpd -f -p 8080 -h /tmp")
        expect([out, err, status]).to eq(["#{name}\n", "", 0])
        body = nil
        served = wait_until(timeout: 60, interval: 0.5) do
          body = Net::HTTP.get(URI("http://127.0.0.1:#{port}/index.html"))
        rescue SystemCallError, IOError, Net::ReadTimeout, Net::OpenTimeout
          false
        end
        expect(served).to be_truthy
        expect(body).to eq("hello-port\n")
      ensure
        cli("rm", "-f", name) if name
      end
    else
      it "refuses -p with the unsupported code while published ports do not exist" do
        out, err, status = cli("run", "-p", "8080:80", rootfs, "true")
        expect([out, status]).to eq(["", 125])
        expect(err).to start_with("microsandbox: unsupported: -p needs published ports")
      end
    end
  end
end
