# frozen_string_literal: true

require "rbconfig"

# Sandbox#pause / #resume: the VM is saved to disk and its memory freed; resuming brings
# back its processes and memory, also from another process.
RSpec.describe "pausing and resuming sandboxes" do
  let(:lib) { File.expand_path("../../lib", __dir__) }

  it "saves a running sandbox with its processes, frees its VM, and resumes it where it was" do
    name = unique_name("pause")
    sb = Microsandbox::Sandbox.create(name, image: rootfs, memory: 256,
                                            entrypoint: ["/bin/sh", "-c", "echo started >> /root/main.log; " \
                                                         "while [ ! -f /root/go ]; do sleep 0.2; done; " \
                                                         "head -c 3000000 /dev/zero; touch /root/done; exec sleep 1000"])
    begin
      pid = sb.shell("sleep 1000 > /dev/null 2>&1 & echo $!").stdout.strip
      expect(pid).to match(/\A\d+\z/)
      sb.shell("echo on-disk > /root/f")
      up_before = sb.shell("cut -d' ' -f1 /proc/uptime").stdout.to_f
      vmm = sb.info[:vmm_pid]
      machine_id = sb.shell("cat /etc/machine-id").stdout
      expect(machine_id).to match(/\A\h{32}\n\z/)

      sb.pause
      expect(sb).not_to be_running
      expect(pid_alive?(vmm)).to be(false) # the guest's memory is freed
      state = File.join(sandbox_dir(name), "paused.state")
      expect(File.size(state)).to be > 1_000_000
      expect(File.stat(state).mode & 0o777).to eq(0o600)
      expect(sb.status).to eq(:paused)
      expect(Microsandbox::Sandbox.get(name)).to have_attributes(status: :paused, paused?: true, stopped?: true)
      expect(Microsandbox::Sandbox.get(name).last_stop.source).to eq("pause")

      sb.resume
      expect(sb.info[:start]).to eq("resumed")
      expect(sb.shell("kill -0 #{pid} && echo alive").stdout).to eq("alive\n") # same process, not a reboot
      expect(sb.shell("cut -d' ' -f1 /proc/uptime").stdout.to_f).to be >= up_before
      expect(sb.shell("cat /root/f").stdout).to eq("on-disk\n")
      expect(sb.shell("cat /etc/machine-id").stdout).to eq(machine_id) # the same sandbox keeps its id
      expect(sb.shell("cat /root/main.log").stdout).to eq("started\n") # the main process was not started again
      # Its output now goes to no client, yet it must not block once its flow window fills.
      sb.shell("touch /root/go")
      expect(wait_until(timeout: 60) { sb.shell("test -f /root/done").exit_code.zero? }).to be(true)
      expect(sb.shell("date +%s").stdout.to_i).to be_within(30).of(Time.now.to_i)
      expect(File.exist?(state)).to be(false)
    ensure
      sb.kill
      Microsandbox::Sandbox.remove(name)
    end
  end

  it "resumes a paused detached sandbox from another process" do
    name = unique_name("pause-det")
    Microsandbox::Sandbox.create(name, image: rootfs, memory: 256, detached: true) do |sb|
      sb.shell("echo 42 > /tmp/mem-marker; sleep 1000 > /dev/null 2>&1 &")
      sb.pause
    end
    out = IO.popen([RbConfig.ruby, "-I#{lib}", "-e", <<~RUBY], err: File::NULL, &:read)
      require "microsandbox"
      Microsandbox::Sandbox.start(#{name.inspect}) do |sb|
        puts sb.info[:start]
        puts sb.shell("cat /tmp/mem-marker; pgrep -c sleep || ps | grep -c 'sleep 1000'").stdout
      end
    RUBY
    lines = out.lines.map(&:strip)
    expect(lines.first).to eq("resumed")
    expect(lines[1]).to eq("42")
    expect(lines[2].to_i).to be >= 1
  ensure
    Microsandbox::Sandbox.remove(name) if Microsandbox::Sandbox.list.any? { |s| s.name == name && !s.running? }
  end

  it "boots cold with a system log entry when the paused state is damaged" do
    name = unique_name("pause-bad")
    Microsandbox::Sandbox.create(name, image: rootfs, memory: 256) do |sb|
      sb.shell("echo kept > /root/f && sync") # a cold boot sees the disk, not the page cache
      sb.pause
    end
    state = File.join(sandbox_dir(name), "paused.state")
    File.truncate(state, File.size(state) - 4096)
    Microsandbox::Sandbox.start(name) do |sb|
      expect(sb.info[:start]).to eq("booted")
      expect(sb.shell("cat /root/f").stdout).to eq("kept\n")
      expect(sb.logs(sources: ["system"]).map(&:text).join).to include("the paused state cannot be resumed")
    end
    expect(File.exist?(state)).to be(false)
    expect { Microsandbox::Sandbox.get(name).sandbox.pause }.to raise_error(Microsandbox::SandboxNotRunningError)
  ensure
    Microsandbox::Sandbox.remove(name)
  end
end
