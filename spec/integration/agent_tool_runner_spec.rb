# frozen_string_literal: true

require "open3"
require_relative "../../examples/agent/tool_runner"

# examples/agent: the code-interpreter tool on a real sandbox (busybox sh cells).
RSpec.describe "examples/agent ToolRunner" do
  before(:all) { @runner = ToolRunner.new(image: MicrosandboxSpec::Rootfs.busybox_dir, max_output: 4096, name: "agent-#{SecureRandom.hex(4)}") }
  after(:all) { @runner&.close }

  it "streams a cell's output as it comes and returns its result; files persist between cells" do
    streamed = []
    result = @runner.run("echo one; echo two >&2; echo 7 > /work/seven; exit 3") { |stream, text| streamed << [stream, text] }
    expect(result.to_h).to eq(exit_code: 3, stdout: "one\n", stderr: "two\n", timed_out: false, truncated: false)
    expect(streamed.map(&:first).uniq.sort).to eq(%i[stderr stdout])
    expect(streamed.select { |s, _| s == :stdout }.map(&:last).join).to eq("one\n")
    expect(@runner.run("cat /work/seven; ls /work").stdout).to eq("7\ncell-1.sh\ncell-2.sh\nseven\n")
  end

  it "stops a cell at its timeout and the sandbox carries on" do
    t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    result = @runner.run("while :; do :; done", timeout: 2)
    expect(result.timed_out).to be(true)
    expect(result.exit_code).to be_nil
    expect(result.to_observation).to include("[timed out]")
    expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0).to be < 30
    expect(@runner.run("echo alive").stdout).to eq("alive\n")
  end

  it "caps a flooding cell's output at max_output and kills it" do
    result = @runner.run("yes 0123456789")
    expect(result.truncated).to be(true)
    expect(result.stdout.bytesize).to eq(4096)
    expect(result.stdout).to start_with("0123456789\n0123456789\n")
    expect(@runner.sandbox.shell("pgrep yes || echo none").stdout).to eq("none\n")
  end

  it "runs without a network under the default policy" do
    result = @runner.run("ls /sys/class/net; wget -q -T 3 -O- http://203.0.113.10/ || echo refused")
    expect(result.stdout).to eq("lo\nrefused\n")
  end

  it "the scripted loop runs end to end and leaves no sandbox" do
    before = Microsandbox::Sandbox.list.map(&:name)
    out, err, status = Open3.capture3({ "SANDBOX_IMAGE" => MicrosandboxSpec::Rootfs.busybox_dir }, RbConfig.ruby, "-I",
                                      File.expand_path("../../lib", __dir__), File.expand_path("../../examples/agent/loop.rb", __dir__))
    expect([err, status.exitstatus]).to eq(["", 0])
    expect(out).to include("-> 42 [exit code 0]", "-> [timed out]", "-> spam spam spam [output truncated]", "-> no network [exit code 0]",
                           "final: the answer is in /work/answer.txt")
    expect(Microsandbox::Sandbox.list.map(&:name)).to match_array(before)
  end
end
