# frozen_string_literal: true

require "rbconfig"
require "open3"

RSpec.describe "sandbox lifecycle" do
  it "block form returns the block value and stops the VM afterwards" do
    name = unique_name("block")
    pids = nil
    value = Microsandbox::Sandbox.create(name, image: rootfs) do |sb|
      pids = [sb.info[:vmm_pid], sb.info[:supervisor_pid]]
      expect(pids).to all(satisfy { |p| pid_alive?(p) })
      # Where the boot went (µs): each clock's marks in order, the guest's ending at Ready.
      phases = sb.info[:boot_phases].to_h
      %w[engine supervisor guest].each do |clock|
        marks = phases.select { |k, _| k.start_with?("#{clock}.") }.values
        expect(marks).not_to be_empty
        expect(marks).to eq(marks.sort)
      end
      expect(phases.keys).to include("engine.disk_built", "supervisor.qemu_spawned", "guest.init", "guest.modules", "guest.ready")
      expect(phases["guest.ready"]).to be > phases["guest.init"]
      :the_value
    end
    expect(value).to eq(:the_value)
    expect(pids).to all(satisfy { |p| !pid_alive?(p) })
    expect(Microsandbox::Sandbox.get(name).status).to eq(:stopped)
  end

  it "block form stops the VM when the block raises" do
    vmm = nil
    expect do
      Microsandbox::Sandbox.create(unique_name("raise"), image: rootfs) do |sb|
        vmm = sb.info[:vmm_pid]
        raise "boom"
      end
    end.to raise_error(RuntimeError, "boom")
    expect(wait_until(timeout: 5) { !pid_alive?(vmm) }).to be(true)
  end

  it "manual form: stop, then exec raises SandboxNotRunningError; kill is idempotent" do
    sb = Microsandbox::Sandbox.create(unique_name("manual"), image: rootfs)
    begin
      expect(sb.running?).to be(true)
      expect(sb.stop(timeout: 10)).to be_nil
      expect(sb.running?).to be(false)
      expect { sb.exec("true") }.to raise_error(Microsandbox::SandboxNotRunningError, /not running/)
      expect(sb.kill).to be_nil
    ensure
      sb.kill
    end
  end

  it "a clean stop keeps data written in the guest until the end (sync on shutdown)" do
    sb = Microsandbox::Sandbox.create(unique_name("kill"), image: rootfs)
    vmm = sb.info[:vmm_pid]
    sb.kill
    expect(wait_until(timeout: 5) { !pid_alive?(vmm) }).to be(true)
    expect { sb.shell("true") }.to raise_error(Microsandbox::SandboxNotRunningError)
  end

  it "gives each sandbox a private copy of the root directory" do
    marker = "/etc/written-by-guest"
    Microsandbox::Sandbox.create(unique_name("iso-a"), image: rootfs) do |a|
      Microsandbox::Sandbox.create(unique_name("iso-b"), image: rootfs) do |b|
        expect(a.shell("echo a > #{marker} && cat #{marker}").stdout).to eq("a\n")
        expect(b.exec("cat", [marker]).exit_code).not_to eq(0)
        expect(a.shell("rm /bin/ls && echo gone").stdout).to eq("gone\n")
        expect(b.exec("ls", ["/"]).success?).to be(true)
      end
    end
    expect(File.exist?(File.join(rootfs, marker))).to be(false)
    expect(File.symlink?(File.join(rootfs, "bin/ls"))).to be(true)
  end

  it "refuses a second running sandbox with the same name" do
    name = unique_name("dup")
    Microsandbox::Sandbox.create(name, image: rootfs) do |sb|
      expect { Microsandbox::Sandbox.create(name, image: rootfs) }
        .to raise_error(Microsandbox::SandboxAlreadyExistsError) { |e| expect(e.code).to eq("sandbox-already-exists") }
      expect(sb.exec("true").success?).to be(true)
    end
  end

  it "dies with its owner process, even on kill -9: no orphaned QEMU or supervisor" do
    name = unique_name("orphan")
    script = <<~RUBY
      require "microsandbox"
      sb = Microsandbox::Sandbox.create(#{name.inspect}, image: #{rootfs.inspect})
      puts [sb.info[:vmm_pid], sb.info[:supervisor_pid]].join(" ")
      $stdout.flush
      sleep
    RUBY
    lib = File.expand_path("../../lib", __dir__)
    Open3.popen2(RbConfig.ruby, "-I#{lib}", "-e", script) do |_in, out, wait|
      line = Timeout.timeout(120) { out.gets }
      expect(line).not_to be_nil
      vmm, supervisor = line.split.map(&:to_i)
      expect(pid_alive?(vmm) && pid_alive?(supervisor)).to be(true)
      Process.kill(:KILL, wait.pid)
      wait.value
      expect(wait_until(timeout: 15) { !pid_alive?(vmm) && !pid_alive?(supervisor) }).to be(true)
      # The state is reconciled on the next call: nothing is shown running.
      expect(Microsandbox::Sandbox.list.find { |i| i.name == name }.status).to eq(:stopped)
    end
  end

  it "never lets a forked child stop its parent's VM" do
    Microsandbox::Sandbox.create(unique_name("fork"), image: rootfs) do |sb|
      pid = fork do
        sb.stop
        sb.kill
        exit!(0)
      end
      Process.wait(pid)
      expect(sb.exec("echo", ["parent still owns it"]).stdout).to eq("parent still owns it\n")
    end
  end
end
