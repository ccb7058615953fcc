# frozen_string_literal: true

require "rbconfig"

# ephemeral: true — nothing is left once the sandbox has stopped, however it stopped.
RSpec.describe "ephemeral sandboxes" do
  it "keeps nothing after a stop: the handle still says how it ended, lookups no longer find it, the name is free" do
    name = unique_name("eph")
    sb = Microsandbox::Sandbox.create(name, image: rootfs, ephemeral: true)
    begin
      expect(sb.shell("echo hi").stdout).to eq("hi\n")
      expect(Microsandbox::Sandbox.get(name).status).to eq(:running)
      expect(Microsandbox::Sandbox.list.map(&:name)).to include(name)
    ensure
      status = sb.stop_and_wait
    end
    expect(status.success?).to be(true)
    expect(sb.last_stop).to have_attributes(status: :stopped, source: "stop")
    # The supervisor deleted the run's data (root disk, logs) as it exited.
    expect(Dir.children(sandbox_dir(name))).to eq(["stop.json"])
    expect { Microsandbox::Sandbox.get(name) }.to raise_error(Microsandbox::SandboxNotFoundError)
    expect(File.exist?(sandbox_dir(name))).to be(false)
    expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(name)
    expect { Microsandbox::Sandbox.remove(name) }.to raise_error(Microsandbox::SandboxNotFoundError)
    expect { Microsandbox::Sandbox.start(name) }.to raise_error(Microsandbox::SandboxNotFoundError)
    # Without ephemeral:, the same name is an ordinary sandbox again.
    Microsandbox::Sandbox.create(name, image: rootfs) { |again| expect(again.exec("true").success?).to be(true) }
    expect(Microsandbox::Sandbox.get(name).status).to eq(:stopped)
    Microsandbox::Sandbox.remove(name)
  end

  it "is removed when its owner process dies without stopping it" do
    name = unique_name("ephdie")
    lib = File.expand_path("../../lib", __dir__)
    script = <<~RUBY
      $LOAD_PATH.unshift(#{lib.inspect})
      require "microsandbox"
      Microsandbox::Sandbox.create(#{name.inspect}, image: #{rootfs.inspect}, ephemeral: true)
      puts "up"
      $stdout.flush
      Process.kill(:KILL, Process.pid)
    RUBY
    out = IO.popen([RbConfig.ruby, "-e", script], &:read)
    expect(out).to eq("up\n")
    expect(wait_until(timeout: 30) { !Microsandbox::Sandbox.list.map(&:name).include?(name) }).to be(true)
    expect(File.exist?(sandbox_dir(name))).to be(false)
    expect(processes_mentioning(sandbox_dir(name))).to be_empty
  end
end
