# frozen_string_literal: true

require "open3"
require "rbconfig"

# However a sandbox's VM or supervisor goes away, every later call fails at once with
# SandboxNotRunningError — never a hang until some timeout, never a ProtocolError.
RSpec.describe "calls on a sandbox whose VM is gone" do
  # Each call kind the gem offers on a sandbox, as [label, call].
  def call_kinds(sb)
    {
      "exec" => -> { sb.exec("echo", ["x"]) },
      "shell" => -> { sb.shell("echo x") },
      "exec_stream" => -> { sb.exec_stream("echo", ["x"]).collect },
      "fs.read" => -> { sb.fs.read("/etc/hostname") },
      "fs.write" => -> { sb.fs.write("/tmp/x", "x") },
      "fs.list" => -> { sb.fs.list("/") },
      "metrics" => -> { sb.metrics }
    }
  end

  def expect_fast_not_running(sb)
    call_kinds(sb).each do |label, call|
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      expect { call.call }.to raise_error(Microsandbox::SandboxNotRunningError), label
      elapsed = Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
      expect(elapsed).to be < 10, "#{label} took #{elapsed.round(1)} s"
    end
    expect(sb.running?).to be(false)
  end

  def with_sandbox(prefix)
    sb = Microsandbox::Sandbox.create(unique_name(prefix), image: rootfs)
    expect(sb.exec("echo", ["up"]).stdout).to eq("up\n")
    yield sb
  ensure
    sb&.kill
  end

  it "fails fast after the supervisor was SIGKILLed" do
    with_sandbox("death-sup") do |sb|
      Process.kill(:KILL, sb.info[:supervisor_pid])
      expect(wait_until(timeout: 15) { !pid_alive?(sb.info[:vmm_pid]) }).to be(true)
      expect_fast_not_running(sb)
    end
  end

  it "fails fast after QEMU was SIGKILLed" do
    with_sandbox("death-vmm") do |sb|
      Process.kill(:KILL, sb.info[:vmm_pid])
      expect(wait_until(timeout: 15) { !pid_alive?(sb.info[:supervisor_pid]) }).to be(true)
      expect_fast_not_running(sb)
    end
  end

  it "fails fast after the guest rebooted itself (the VM ends: QEMU runs with -no-reboot)" do
    with_sandbox("death-reboot") do |sb|
      begin
        sb.exec("reboot", ["-f"], timeout: 30)
      rescue Microsandbox::SandboxNotRunningError
        nil # the VM may end before the command's answer
      end
      expect(wait_until(timeout: 30) { !pid_alive?(sb.info[:supervisor_pid]) }).to be(true)
      expect_fast_not_running(sb)
    end
  end

  it "fails fast after the guest powered itself off" do
    with_sandbox("death-poweroff") do |sb|
      begin
        sb.exec("poweroff", ["-f"], timeout: 30)
      rescue Microsandbox::SandboxNotRunningError
        nil
      end
      expect(wait_until(timeout: 30) { !pid_alive?(sb.info[:supervisor_pid]) }).to be(true)
      expect_fast_not_running(sb)
    end
  end

  it "fails fast after another process stopped it, and an exec running meanwhile ends" do
    with_sandbox("death-other") do |sb|
      running = Thread.new do
        sb.exec("sleep", ["60"])
      rescue Microsandbox::Error => e
        e
      end
      sleep 1
      lib = File.expand_path("../../lib", __dir__)
      script = "require 'microsandbox'; Microsandbox::Sandbox.get(#{sb.name.inspect}).stop"
      _out, status = Open3.capture2e(RbConfig.ruby, "-I#{lib}", "-e", script)
      expect(status.success?).to be(true)
      expect(running.join(15)).not_to be_nil
      # The clean shutdown terminates it (SIGTERM: 143), or the VM is gone before it answers.
      outcome = running.value
      expect(outcome.is_a?(Microsandbox::SandboxNotRunningError) || outcome.exit_code == 143).to be(true), outcome.inspect
      expect_fast_not_running(sb)
    end
  end
end
