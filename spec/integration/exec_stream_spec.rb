# frozen_string_literal: true

RSpec.describe "Sandbox#exec_stream in a real VM" do
  before(:all) { @sb = Microsandbox::Sandbox.create(unique_name("stream"), image: rootfs) }
  after(:all) { @sb&.kill }

  let(:sb) { @sb }

  it "delivers output while the command still runs" do
    handle = sb.shell_stream("echo first; sleep 3; echo second")
    t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    first = handle.find(&:stdout?)
    elapsed = Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0
    expect(first.text).to eq("first\n")
    expect(elapsed).to be < 2.5
    handle.close
  end

  it "is Enumerable over events ending with exited, and collects into ExecOutput" do
    events = sb.shell_stream("echo out; echo err >&2; exit 4").to_a
    expect(events.last).to be_exited
    expect(events.last.exit_code).to eq(4)
    expect(events.select(&:stdout?).map(&:text).join).to eq("out\n")
    expect(events.select(&:stderr?).map(&:text).join).to eq("err\n")

    out = sb.exec_stream("printf", ["abc"]).collect
    expect(out).to be_a(Microsandbox::ExecOutput)
    expect([out.stdout, out.exit_code]).to eq(["abc", 0])
  end

  it "returns an Enumerator without a block" do
    handle = sb.exec_stream("echo", ["x"])
    expect(handle.each).to be_a(Enumerator)
    handle.close
  end

  it "takes interactive stdin through a pipe" do
    handle = sb.exec_stream("cat", stdin: :pipe)
    handle.stdin.write("hello ")
    handle.stdin << "world"
    handle.stdin.close
    expect(handle.collect.stdout).to eq("hello world")
  end

  it "signals and kills the running command" do
    handle = sb.exec_stream("sleep", ["30"])
    handle.signal(15)
    last = handle.to_a.last
    expect(last.signal).to eq(15)
    handle = sb.exec_stream("sleep", ["30"])
    handle.kill
    expect(handle.to_a.last.exit_code).to eq(137)
    expect { handle.signal(15) }.to raise_error(Microsandbox::ExecFailedError, /finished/)
  end

  it "kills the command when iteration stops early" do
    marker = "/tmp/stream-#{rand(1 << 30)}"
    sb.shell_stream("touch #{marker}; while true; do echo tick; sleep 0.1; done").each do |ev|
      break if ev.stdout?
    end
    expect(wait_until(timeout: 5) { !sb.shell("ps | grep -v grep | grep -q 'touch #{marker}'").success? }).to be(true)
    expect(wait_until(timeout: 5) { !sb.shell("ps").stdout.include?("while true") }).to be(true)
  end

  it "raises typed errors through the stream" do
    expect { sb.exec_stream("no-such-binary").to_a }.to raise_error(Microsandbox::ExecFailedError)
    expect { sb.exec_stream("sleep", ["30"], timeout: 1).to_a }.to raise_error(Microsandbox::ExecTimeoutError)
  end
end
