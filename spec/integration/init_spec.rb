# frozen_string_literal: true

require "fileutils"
require "tmpdir"

# init: — the agent hands PID 1 to a custom init after boot and goes on as its child.
RSpec.describe "custom init (init:)" do
  it "runs the init as PID 1 with its args and env; commands, streams, fs and stop work as before" do
    script = "echo $$ > /tmp/init-pid; echo $MARK > /tmp/init-mark; exec sleep 1000000"
    init = { cmd: "/bin/sh", args: ["-c", script], env: { "MARK" => 7 } }
    name = unique_name("init")
    Microsandbox::Sandbox.create(name, image: rootfs, init: init) do |sb|
      expect(wait_until(timeout: 30) { sb.fs.exists?("/tmp/init-mark") }).to be(true)
      expect(sb.fs.read_text("/tmp/init-pid")).to eq("1\n")
      expect(sb.fs.read_text("/tmp/init-mark")).to eq("7\n")
      expect(sb.exec("cat", ["/proc/1/comm"]).stdout).to eq("sleep\n")
      # The agent is PID 1's child now; commands still start, stream and end.
      agent = sb.shell("grep PPid /proc/$PPID/status").stdout
      expect(agent).to eq("PPid:\t1\n")
      expect(sb.exec_stream("sh", ["-c", "echo a; echo b >&2; exit 3"]).collect)
        .to have_attributes(stdout: "a\n", stderr: "b\n", exit_code: 3)
      # An orphan of a command comes back to the agent (child subreaper), not to the init.
      expect(sb.shell("sleep 0.2 & echo started").stdout).to eq("started\n")
    end
    expect(Microsandbox::Sandbox.get(name).last_stop).to have_attributes(status: :stopped, source: "stop")
    Microsandbox::Sandbox.remove(name)
  end

  it "\"auto\" picks the root's /sbin/init" do
    Dir.mktmpdir("msb-init-root") do |dir|
      root = File.join(dir, "root")
      FileUtils.cp_r(rootfs, root, preserve: true)
      File.write(File.join(root, "sbin/init"), "#!/bin/sh\necho $$ > /tmp/auto-init\nexec sleep 1000000\n")
      File.chmod(0o755, File.join(root, "sbin/init"))
      Microsandbox::Sandbox.create(unique_name("init-auto"), image: root, init: :auto) do |sb|
        expect(wait_until(timeout: 30) { sb.fs.exists?("/tmp/auto-init") }).to be(true)
        expect(sb.fs.read_text("/tmp/auto-init")).to eq("1\n")
        expect(sb.exec("cat", ["/proc/1/comm"]).stdout).to eq("sleep\n")
      end
    end
  end

  it "fails the boot when the init is missing, and refuses a relative path before anything starts" do
    expect { Microsandbox::Sandbox.create(unique_name("init-bad"), image: rootfs, init: "/no/such/init") }
      .to raise_error(Microsandbox::BootFailedError, %r{/no/such/init})
    expect { Microsandbox::Sandbox.create(unique_name("init-rel"), image: rootfs, init: "sbin/init") }
      .to raise_error(Microsandbox::InvalidConfigError, /absolute/)
  end

  it "refuses an init: and volumes: that the guest kernel command line cannot hold together, leaving nothing behind" do
    name = unique_name("init-long")
    # Each fits its own bound; together they pass the kernel's 2 KiB.
    volumes = (1..3).to_h { |i| ["/#{'m' * 180}#{i}", { tmpfs: true }] }
    expect { Microsandbox::Sandbox.create(name, image: rootfs, init: { cmd: "/bin/sh", args: ["-c", "x" * 650] }, volumes: volumes) }
      .to raise_error(Microsandbox::InvalidConfigError, /command line would be \d+ bytes.*init:.*volumes:/)
    expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(name)
    expect(File.exist?(File.join(Microsandbox.home, "sandboxes", name))).to be(false)
  end
end
