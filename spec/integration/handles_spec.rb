# frozen_string_literal: true

require "rbconfig"

# The reference gem's handle model: Sandbox.get/list/list_with return SandboxHandles
# (SandboxInfo is the same class) that control a sandbox from any process, and every
# stop says how the run ended.
RSpec.describe "sandbox handles and how runs end" do
  let(:lib) { File.expand_path("../../lib", __dir__) }

  it "returns controllable handles from get, list and list_with, and reports a clean stop" do
    name = unique_name("handle")
    sb = Microsandbox::Sandbox.create(name, image: rootfs, labels: { "suite" => "handles", tier: 2 }, env: { "SECRET" => "s3" })
    h = Microsandbox::Sandbox.get(name)
    expect(Microsandbox::SandboxInfo).to equal(Microsandbox::SandboxHandle)
    expect(h).to be_a(Microsandbox::SandboxHandle)
    expect(h.status).to eq(:running)
    expect([h.running?, h.stopped?, h.crashed?]).to eq([true, false, false])
    expect(h.created_at).to be_a(Time)
    expect(h.updated_at).to be >= h.created_at
    expect(h.labels).to eq("suite" => "handles", "tier" => "2")
    expect(h.config["cpus"]).to eq(1)
    expect(JSON.parse(h.config_json)).to eq(h.config)
    expect(h.config_json).not_to include("s3")
    expect(h.last_stop).to be_nil
    expect(Microsandbox::Sandbox.list_with.map(&:name)).to include(name)
    listed = Microsandbox::Sandbox.list_with(labels: { "suite" => "handles" })
    expect(listed.map(&:name)).to eq([name])
    expect(listed.first).to be_a(Microsandbox::SandboxHandle)
    # The filter coerces as create did (to_s of keys and values), so the Hash given to
    # create finds the sandbox again.
    expect(Microsandbox::Sandbox.list_with(labels: { suite: :handles, tier: 2 }).map(&:name)).to eq([name])
    expect(h.exec("echo", ["via-handle"]).stdout).to eq("via-handle\n") # forwarded to a live Sandbox

    listed.first.stop_with_timeout(10)
    result = sb.wait_until_stopped(timeout: 30)
    expect(result).to be_a(Microsandbox::SandboxStopResult)
    expect([result.status, result.source, result.exit_code, result.signal]).to eq([:stopped, "stop", 0, nil])
    expect([result.stopped?, result.crashed?]).to eq([true, false])
    expect(result.observed_at).to be_within(60).of(Time.now)
    again = Microsandbox::Sandbox.get(name)
    expect([again.status, again.stopped?]).to eq([:stopped, true])
    expect(again.last_stop.source).to eq("stop")
    expect(h.status).to eq(:running) # a handle's status is a snapshot
  ensure
    sb&.kill
  end

  it "kills from another process with kill_with_timeout and reports the kill" do
    name = unique_name("hkill")
    sb = Microsandbox::Sandbox.create(name, image: rootfs)
    vmm = sb.info[:vmm_pid]
    out = IO.popen([RbConfig.ruby, "-I#{lib}", "-e", <<~RUBY], err: File::NULL, &:read)
      require "microsandbox"
      h = Microsandbox::Sandbox.get(#{name.inspect})
      p h.kill_with_timeout(10)
      p Microsandbox::Sandbox.get(#{name.inspect}).status
    RUBY
    expect(out.lines.map(&:strip)).to eq(["nil", ":stopped"])
    expect(pid_alive?(vmm)).to be(false)
    result = sb.wait_until_stopped(timeout: 10)
    expect([result.status, result.source, result.signal]).to eq([:stopped, "kill", 9])
    status = sb.wait
    expect(status).to be_a(Microsandbox::ExitStatus)
    expect([status.exit_code, status.signal, status.success?, status.failure?]).to eq([137, 9, false, true])
  end

  it "reports a VM that died on its own as crashed" do
    name = unique_name("crash")
    sb = Microsandbox::Sandbox.create(name, image: rootfs)
    Process.kill(:KILL, sb.info[:vmm_pid]) # QEMU dies without being asked
    result = sb.wait_until_stopped(timeout: 30)
    expect([result.status, result.source, result.signal]).to eq([:crashed, "vm-exited", 9])
    expect([result.crashed?, result.stopped?]).to eq([true, false])
    expect(sb.status).to eq(:crashed)
    h = Microsandbox::Sandbox.get(name)
    expect([h.status, h.crashed?, h.running?]).to eq([:crashed, true, false])
    # A new run clears it.
    Microsandbox::Sandbox.start(name) do |again|
      expect(again.status).to eq(:running)
      expect(again.stop_and_wait.success?).to be(true)
      expect(again.status).to eq(:stopped)
    end
  end

  it "drains, reports :draining to every process while it does, then waits for the end" do
    name = unique_name("hdrain")
    sb = Microsandbox::Sandbox.create(name, image: rootfs)
    # A command that holds the drain open until it gets a line on stdin.
    cmd = sb.exec_stream("sh", ["-c", "echo started; read line; echo \"got $line\""], stdin: :pipe)
    first = cmd.each { |ev| break ev if ev.stdout? }
    expect(first.text).to eq("started\n")
    expect(Microsandbox::Sandbox.get(name).status).to eq(:running)

    expect(sb.drain).to be_nil
    expect([sb.status, sb.running?]).to eq([:draining, true])
    h = Microsandbox::Sandbox.get(name)
    expect([h.status, h.running?, h.draining?, h.stopped?]).to eq([:draining, true, true, false])
    out = IO.popen([RbConfig.ruby, "-I#{lib}", "-e", <<~RUBY], err: File::NULL, &:read)
      require "microsandbox"
      h = Microsandbox::Sandbox.get(#{name.inspect})
      listed = Microsandbox::Sandbox.list.find { |x| x.name == h.name }
      puts [h.status, listed.status, h.sandbox.status].join(" ")
    RUBY
    expect(out.strip).to eq("draining draining draining")

    cmd.stdin.write("go\n")
    cmd.stdin.close
    expect(cmd.collect.stdout).to eq("got go\n")
    status = sb.wait
    expect([status.exit_code, status.success?]).to eq([0, true])
    expect(sb.last_stop.source).to eq("drain")
    expect(sb.status).to eq(:stopped)
    expect(Microsandbox::Sandbox.get(name).status).to eq(:stopped)
  end

  it "stops a detached sandbox when the create block returns" do
    name = unique_name("blockdet")
    vmm = Microsandbox::Sandbox.create(name, image: rootfs, detached: true) { |sb| sb.info[:vmm_pid] }
    expect(pid_alive?(vmm)).to be(false)
    expect(Microsandbox::Sandbox.get(name).status).to eq(:stopped)
  end

  it "takes names of up to 128 bytes with spaces, non-ASCII and Symbols, kept out of paths" do
    base = "my box é #{SecureRandom.hex(4)}"
    long = base + ("x" * (128 - base.bytesize))
    expect(long.bytesize).to eq(128)
    Microsandbox::Sandbox.create(long, image: rootfs) do |sb|
      expect(sb.name).to eq(long)
      expect(sb.shell("hostname").stdout.strip).to match(/\Amy-box-[a-z0-9-]+\z/)
      expect(Microsandbox::Sandbox.get(long).name).to eq(long)
      expect(Microsandbox::Sandbox.list.map(&:name)).to include(long)
      expect(Dir.children(File.join(Microsandbox.home, "sandboxes"))).not_to include(long)
    end
    sym = :"sym-#{SecureRandom.hex(4)}"
    Microsandbox::Sandbox.create(sym, image: rootfs) { |sb| expect(sb.name).to eq(sym.to_s) }
    Microsandbox::Sandbox.remove(long)
    Microsandbox::Sandbox.remove(sym)
    expect { Microsandbox::Sandbox.get(long) }.to raise_error(Microsandbox::SandboxNotFoundError)
  end
end
