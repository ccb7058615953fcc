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

  it "leaves the rest of the stream for collect after a partial each (single pass, command keeps running)" do
    handle = sb.shell_stream("echo one; sleep 1; echo two; echo three >&2; exit 3")
    first = nil
    handle.each do |ev|
      first = ev
      break if ev.stdout?
    end
    expect(first.text).to eq("one\n")
    expect(handle).not_to be_done
    out = handle.collect
    expect([out.stdout, out.stderr, out.exit_code]).to eq(["two\n", "three\n", 3])
    expect(handle.to_a).to eq([])
  end

  it "keeps the exit status (or the start failure) for collect and wait after each read the whole stream" do
    handle = sb.shell_stream("echo done; exit 5")
    expect(handle.map(&:type)).to eq(%i[started stdout exited])
    out = handle.collect
    expect([out.stdout, out.exit_code, out.success?]).to eq(["", 5, false])
    expect(handle.wait.exit_code).to eq(5)

    ok = sb.exec_stream("true")
    ok.each { |_| nil }
    expect(ok.collect).to have_attributes(exit_code: 0, success?: true)

    missing = sb.exec_stream("no-such-binary")
    expect(missing.to_a.map(&:type)).to eq([:failed])
    expect { missing.collect }.to raise_error(Microsandbox::ExecFailedError, /no-such-binary/)
    expect { missing.wait }.to raise_error(Microsandbox::ExecFailedError, /no-such-binary/)
  end

  it "has an id, waits for an ExitStatus, and uses the reference gem's event names" do
    handle = sb.shell_stream("printf 'a\\377'; exit 2")
    other = sb.exec_stream("true")
    expect(handle.id).to be_a(String)
    expect(handle.id).not_to eq(other.id)
    expect(other.wait).to eq(Microsandbox::ExitStatus.new(exit_code: 0))
    events = handle.to_a
    out = events.find(&:stdout?)
    expect([out.type, out.data, out.text, out.code, out.pid]).to eq([:stdout, "a\xFF".b, "a\uFFFD", nil, nil])
    expect(out.text.valid_encoding?).to be(true)
    last = events.last
    expect([last.type, last.code, last.data, last.text]).to eq([:exited, 2, nil, nil])
    expect(events.first).to be_started
    expect(events.map(&:type)).to eq(%i[started stdout exited])
    expect(events.map { |e| [e.failed?, e.stdin_error?] }.uniq).to eq([[false, false]])
    status = sb.shell_stream("kill -9 $$").wait
    expect([status.exit_code, status.signal, status.success?, status.failure?]).to eq([137, 9, false, true])
  end

  it "takes timeout: 0 as a deadline already passed and refuses a negative one" do
    expect { sb.exec("touch", ["/tmp/zero-timeout"], timeout: 0) }.to raise_error(Microsandbox::ExecTimeoutError, /timeout: 0/)
    expect { sb.shell_stream("touch /tmp/zero-timeout", timeout: 0) }.to raise_error(Microsandbox::ExecTimeoutError)
    expect(sb.fs.exists?("/tmp/zero-timeout")).to be(false)
    expect { sb.exec("true", timeout: -1) }.to raise_error(ArgumentError, /timeout/)
    expect { sb.exec("true", timeout: Float::NAN) }.to raise_error(ArgumentError, /timeout/)
    expect(sb.exec("true", timeout: Float::INFINITY).exit_code).to eq(0)
    expect(sb.exec("echo", ["x"], timeout: 30)).to have_attributes(stdout: "x\n", to_s: "x\n", failure?: false)
  end

  it "kills the command when the handle is closed after a partial each" do
    marker = "/tmp/stream-#{rand(1 << 30)}"
    handle = sb.shell_stream("touch #{marker}; while true; do echo tick; sleep 0.1; done")
    handle.each do |ev|
      break if ev.stdout?
    end
    handle.close
    expect(wait_until(timeout: 5) { !sb.shell("ps | grep -v grep | grep -q 'touch #{marker}'").success? }).to be(true)
    expect(wait_until(timeout: 5) { !sb.shell("ps").stdout.include?("while true") }).to be(true)
  end

  it "raises typed errors through the stream" do
    expect { sb.exec_stream("no-such-binary").collect }.to raise_error(Microsandbox::ExecFailedError, /no-such-binary/)
    expect { sb.exec_stream("no-such-binary").wait }.to raise_error(Microsandbox::ExecFailedError)
    expect { sb.exec_stream("sleep", ["30"], timeout: 1).to_a }.to raise_error(Microsandbox::ExecTimeoutError)
  end

  it "starts with a :started event carrying the guest pid" do
    events = sb.shell_stream("echo $$; echo err >&2").to_a
    started = events.first
    expect([started.type, started.started?, started.data, started.text, started.code]).to eq([:started, true, nil, nil, nil])
    expect(started.pid).to be_an(Integer).and(be > 1)
    expect(events.find(&:stdout?).text).to eq("#{started.pid}\n")
    expect(events.map(&:type).values_at(0, -1)).to eq(%i[started exited])
    expect(events.count(&:started?)).to eq(1)
    expect(started.inspect).to include("started pid=#{started.pid}")
  end

  it "yields one :failed event (errno and reason) for a command that cannot start; exec still raises" do
    missing = sb.exec_stream("no-such-binary").to_a
    expect(missing.size).to eq(1)
    failed = missing.first
    expect([failed.type, failed.failed?, failed.started?, failed.code]).to eq([:failed, true, false, 2])
    expect(failed.data).to match(/no-such-binary/)
    expect(failed.text).to eq(failed.data)
    expect(failed.pid).to be_nil

    sb.fs.write("/tmp/not-executable", "#!/bin/sh\necho no\n")
    denied = sb.exec_stream("/tmp/not-executable").to_a
    expect(denied.map(&:type)).to eq([:failed])
    expect(denied.first.code).to eq(13)
    expect(denied.first.data).to match(/not-executable/)

    handle = sb.exec_stream("/tmp/not-executable")
    expect(handle.each.to_a.map(&:type)).to eq([:failed])
    expect(handle).to be_done
    expect(handle.exit_code).to be_nil

    expect { sb.exec("no-such-binary") }.to raise_error(Microsandbox::ExecFailedError, /no-such-binary/)
    expect { sb.exec("/tmp/not-executable") }.to raise_error(Microsandbox::ExecFailedError, /not-executable/)
  end
end
