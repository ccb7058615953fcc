# frozen_string_literal: true

# No write to a streaming command's stdin vanishes: what cannot reach the command raises.
RSpec.describe "exec_stream stdin" do
  before(:all) { @sb = Microsandbox::Sandbox.create(unique_name("stdin"), image: rootfs) }
  after(:all) { @sb&.kill }

  let(:sb) { @sb }

  it "delivers writes with stdin: :pipe, then refuses writes after close" do
    h = sb.exec_stream("cat", stdin: :pipe)
    h.stdin.write("x\n")
    h.stdin.close
    expect { h.stdin.write("lost") }.to raise_error(Microsandbox::StdinClosedError, /already closed/)
    expect(h.collect.stdout).to eq("x\n")
  end

  it "raises on a write after the command finished" do
    h = sb.exec_stream("true", stdin: :pipe)
    expect(h.collect.exit_code).to eq(0)
    expect { h.stdin.write("late") }.to raise_error(Microsandbox::StdinClosedError, /finished/)
  end

  it "runs the 0.5.7 README's streaming example as written (no stdin: given)" do
    h = sb.exec_stream("cat", [])
    h.stdin.write("x\n")
    h.stdin.close
    expect(h.collect.stdout).to eq("x\n")
  end

  it "closes a default stdin at the first read, so a reader ends and later writes raise" do
    expect(sb.exec_stream("cat", []).collect.stdout).to eq("")
    h = sb.exec_stream("sh", ["-c", "cat; echo done"])
    h.stdin.write("a")
    expect(h.each.find(&:stdout?).text).to eq("a")
    expect { h.stdin.write("late") }.to raise_error(Microsandbox::StdinClosedError)
    expect(h.collect.stdout).to eq("done\n")
    expect(sb.exec_stream("sh", ["-c", "read x; echo got $x"]).tap { |t| t.stdin << "v\n" }.collect.stdout).to eq("got v\n")
  end

  it "takes the reference's stdin modes and refuses the others" do
    expect(sb.exec("cat", stdin: :null).stdout).to eq("")
    expect(sb.exec("cat", stdin: "in").stdout).to eq("in")
    expect { sb.exec("cat", stdin: :pipe) }.to raise_error(ArgumentError, /exec_stream/)
    expect { sb.exec("cat", stdin: :bogus) }.to raise_error(ArgumentError)
    expect { sb.exec_stream("cat", stdin: :bogus) }.to raise_error(ArgumentError)
  end

  it "raises instead of dropping writes to a command started without a stdin pipe" do
    [sb.exec_stream("cat", stdin: :null), sb.exec_stream("cat", stdin: "fed")].each do |h|
      expect { h.stdin.write("x\n") }.to raise_error(Microsandbox::StdinClosedError, /stdin: :pipe/)
      expect { h.stdin.write("x\n") }.to raise_error(Microsandbox::ExecFailedError)
      h.stdin.close # idempotent, never raises
    end
    expect(sb.exec_stream("cat", stdin: "fed").collect.stdout).to eq("fed")
  end

  # Bytes the command cannot take (issue 8): reported, never dropped in silence.
  describe "bytes a command does not take" do
    let(:mib) { Random.new(8).bytes(1 << 20) }

    def elapsed
      t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      value = yield
      [value, Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0]
    end

    it "exec with a String stdin: head -c1 of 1 MiB returns at once and says how much was not delivered" do
      out, secs = elapsed { sb.exec("head", ["-c1"], stdin: mib) }
      expect(secs).to be < 60
      expect([out.exit_code, out.stdout_bytes]).to eq([0, mib[0]])
      expect(out.stdin_error).to match(/of the 1048576 bytes written to stdin.* not delivered/)
      expect(out.inspect).to include("stdin_error=")

      full = sb.exec("cat", stdin: mib)
      expect(full.stdout_bytes).to eq(mib)
      expect(full.stdin_error).to be_nil
      expect(sb.exec("true").stdin_error).to be_nil
    end

    it "exec_stream: head -c1 with a 1 MiB write yields a :stdin_error event, then later writes raise" do
      h = sb.exec_stream("head", ["-c1"], stdin: :pipe)
      begin
        h.stdin.write(mib)
      rescue Microsandbox::StdinBrokenError => e
        # head may end, and the guest report it, while the rest of the MiB is still queued.
        expect(e.message).to match(/closed its stdin.*stop writing/)
      end
      events, secs = elapsed { h.to_a }
      expect(secs).to be < 60
      expect(events.map(&:type).first).to eq(:started)
      expect(events.select(&:stdout?).map(&:bytes).join).to eq(mib[0])
      errors = events.select(&:stdin_error?)
      expect(errors.size).to eq(1)
      # Counted when the guest reported it: the bytes accepted by then.
      expect(errors.first.data).to match(/of the \d+ bytes written to stdin.* not delivered/)
      expect(errors.first.text).to eq(errors.first.data)
      # EPIPE when the guest's write failed first, nil when head had ended before.
      expect([32, nil]).to include(errors.first.code)
      expect(events.last).to be_exited
      expect(events.last.exit_code).to eq(0)
      expect(events.index(errors.first)).to be < events.size - 1
      expect { h.stdin.write("more") }.to raise_error(Microsandbox::StdinClosedError)
    end

    it "EPIPE: a command that closed its stdin gets a :stdin_error (code 32), then StdinBrokenError on writes" do
      # The command outlives the write by seconds (even under load), so the guest's write
      # fails with EPIPE rather than finding the command gone.
      h = sb.exec_stream("sh", ["-c", "exec 0<&-; echo closed; sleep 5; echo done"], stdin: :pipe)
      expect(h.each.find(&:stdout?).text).to eq("closed\n")
      h.stdin.write("lost bytes")
      err = h.each.find { |ev| ev.stdin_error? || ev.exited? }
      expect(err).to be_stdin_error
      expect(err.code).to eq(32)
      expect(err.data).to match(/closed its stdin \(broken pipe\) after 0 bytes.*10 of the 10 bytes/)
      expect { h.stdin.write("x") }.to raise_error(Microsandbox::StdinBrokenError, /closed its stdin.*stop writing/) { |e|
        expect(e.code).to eq("stdin-broken")
        expect(e).to be_a(Microsandbox::StdinClosedError)
      }
      h.stdin.close # never raises
      out = h.collect
      expect([out.stdout, out.exit_code, out.stdin_error]).to eq(["done\n", 0, nil]) # reported once, in the event
      expect { h.stdin.write("x") }.to raise_error(Microsandbox::StdinBrokenError)
    end

    it "a normal close is no error: cat gets every byte and no :stdin_error is yielded" do
      h = sb.exec_stream("cat", stdin: :pipe)
      (0...mib.bytesize).step(300_000) { |at| h.stdin.write(mib.byteslice(at, 300_000)) }
      h.stdin.close
      events = h.to_a
      expect(events.none?(&:stdin_error?)).to be(true)
      expect(events.select(&:stdout?).map(&:bytes).join).to eq(mib)
      expect(events.last.exit_code).to eq(0)
      expect { h.stdin.write("x") }.to raise_error(Microsandbox::StdinClosedError, /already closed|finished/)
    end

    it "a command that exits without reading: undelivered bytes are reported, later writes raise" do
      h = sb.exec_stream("sleep", ["2"], stdin: :pipe)
      begin
        h.stdin.write(mib)
      rescue Microsandbox::StdinBrokenError
        nil # sleep ended while part of the MiB was still queued (a loaded host)
      end
      events = h.to_a
      err = events.find(&:stdin_error?)
      expect(err).not_to be_nil
      expect(err.data).to match(/not delivered/)
      expect(events.last).to be_exited
      expect { h.stdin.write("late") }.to raise_error(Microsandbox::StdinClosedError)

      streamed = sb.exec_stream("head", ["-c1"], stdin: mib).to_a
      expect(streamed.count(&:stdin_error?)).to eq(1)
      expect(streamed.last.exit_code).to eq(0)
      expect(sb.exec_stream("head", ["-c1"], stdin: mib).collect.stdin_error).to match(/not delivered/)
    end
  end
end
