# frozen_string_literal: true

RSpec.describe "logs" do
  it "records command output and the guest console, bounded and filterable" do
    name = unique_name("logs")
    sb = Microsandbox::Sandbox.create(name, image: rootfs)
    begin
      sb.shell("echo to-out; echo to-err >&2")
      entries = nil
      expect(wait_until(timeout: 5) do
        entries = sb.logs(sources: %w[stdout stderr])
        entries.map(&:text).join.include?("to-err")
      end).to be(true)
      expect(entries.find { |e| e.text.include?("to-out") }.source).to eq(:stdout)
      expect(entries.find { |e| e.text.include?("to-err") }.source).to eq(:stderr)
      expect(entries.last.timestamp).to be_a(Time)
      expect(sb.logs(tail: 1, sources: ["stdout"]).size).to eq(1)
      expect { sb.logs(sources: ["kernel"]) }.to raise_error(Microsandbox::InvalidConfigError, /log source/)

      streamed = []
      reader = Thread.new { sb.log_stream(follow: true, interval: 0.2).each { |e| streamed << e.text; break if e.text.include?("later") } }
      sleep 0.5
      sb.exec("echo", ["later"])
      expect(reader.join(10)).not_to be_nil
      expect(streamed.join).to include("later")
    ensure
      sb.stop
    end
    # Still readable once stopped.
    expect(Microsandbox::Sandbox.get(name).logs(sources: ["stdout"]).map(&:text).join).to include("to-out")
  end

  it "keeps every byte and decodes characters split across writes, in logs, exec output and events" do
    Microsandbox::Sandbox.create(unique_name("logutf"), image: rootfs) do |sb|
      # The sleeps make each printf its own chunk (the guest's pump reads as soon as data
      # arrives), so characters really are split between chunks.
      # 'é' split over two writes on stdout, '€' on stderr, an emoji in three writes, and
      # bytes that are not UTF-8 at all (\377, and \342\202 cut short by "z").
      script = [
        %q{printf 'caf\303'; sleep 0.5; printf '\251\n'},
        %q{printf 'x\342\202' >&2; sleep 0.5; printf '\254\n' >&2},
        %q{printf '\360'; sleep 0.5; printf '\237\230'; sleep 0.5; printf '\200!\377\342\202z\n'}
      ].join("; ")
      out = sb.exec("sh", ["-c", script])
      expect(out.stdout).to eq("café\n😀!\uFFFD\uFFFDz\n")
      expect(out.stdout_bytes).to eq("caf\xC3\xA9\n\xF0\x9F\x98\x80!\xFF\xE2\x82z\n".b)
      expect(out.stderr).to eq("x€\n")

      entries = nil
      expect(wait_until(timeout: 10) do
        entries = sb.logs(sources: %w[stdout stderr])
        entries.map(&:data).join.include?("z\n")
      end).to be(true)
      stdout = entries.select { |e| e.source == :stdout }
      stderr = entries.select { |e| e.source == :stderr }
      # The chunks stay separate entries; no byte is lost and the text is whole.
      expect(stdout.size).to be >= 2
      expect(stdout.map(&:data).join).to eq(out.stdout_bytes)
      expect(stdout.map(&:text).join).to eq("café\n😀!\uFFFD\uFFFDz\n")
      expect(stdout.first.text).to eq("caf")
      expect(stdout.first.data).to eq("caf\xC3".b)
      expect(stdout.first.data.encoding).to eq(Encoding::BINARY)
      expect(stderr.map(&:text).join).to eq("x€\n")
      expect(stderr.map(&:data).join).to eq("x\xE2\x82\xAC\n".b)
      expect(entries.map(&:text)).to all(satisfy(&:valid_encoding?))
      # The second half alone (tail) still decodes with the first.
      expect(sb.logs(tail: 1, sources: ["stderr"]).first.text).to eq("€\n")

      # Streamed events: decoded across events of the same stream.
      events = sb.exec_stream("sh", ["-c", script]).to_a
      expect(events.select(&:stdout?).map(&:text).join).to eq("café\n😀!\uFFFD\uFFFDz\n")
      expect(events.select(&:stderr?).map(&:text).join).to eq("x€\n")
      expect(events.select(&:stdout?).map(&:bytes).join).to eq(out.stdout_bytes)
    end
  end

  it "selects by time window, source group and tail (nil = all), and streams history then follows" do
    Microsandbox::Sandbox.create(unique_name("logq"), image: rootfs) do |sb|
      sb.shell("echo one; echo two >&2")
      expect(wait_until(timeout: 10) { sb.logs(sources: [:stderr]).any? }).to be(true)
      marker = Time.now
      sleep 0.05
      sb.shell("echo three")
      expect(wait_until(timeout: 10) { sb.logs(sources: %w[output]).map(&:text).join.include?("three") }).to be(true)

      output = sb.logs(sources: ["output"])
      expect(output.map(&:source).uniq.sort).to eq(%i[stderr stdout])
      expect(output.map(&:text).join).to eq("one\ntwo\nthree\n")
      expect(output.map(&:session_id)).to all(be_a(Integer))
      expect(output.first.session_id).not_to eq(output.last.session_id)
      all = sb.logs # tail: nil is everything kept, console included
      expect(all.size).to be >= output.size
      expect(all.map(&:source) - %i[system stdout stderr]).to eq([])
      expect(sb.logs(sources: ["all"]).size).to eq(all.size)
      expect(sb.logs(tail: 0)).to eq([])
      expect(sb.logs(since_ms: marker, sources: %w[output]).map(&:text)).to eq(["three\n"])
      expect(sb.logs(since_ms: (marker.to_r * 1000).floor, sources: [:stdout]).map(&:text)).to eq(["three\n"])
      expect(sb.logs(until_ms: marker, sources: ["output"]).map(&:text)).to eq(["one\n", "two\n"])
      expect { sb.logs(tail: -1) }.to raise_error(ArgumentError, /tail/)
      expect { sb.logs(since_ms: -5) }.to raise_error(ArgumentError, /since_ms/)
      expect { sb.logs(sources: ["kernel"]) }.to raise_error(Microsandbox::InvalidConfigError, /"output" or "all"/)

      # A LogStream replays history and ends at its end unless following.
      stream = sb.log_stream(sources: [:stdout])
      expect(stream).to be_a(Microsandbox::LogStream)
      expect(stream.map(&:text)).to eq(["one\n", "three\n"])
      first = output.first
      expect(sb.log_stream(sources: ["output"], from_cursor: first.cursor).map(&:text)).to eq(["two\n", "three\n"])
      expect(sb.log_stream(sources: ["output"], since_ms: marker).to_a.map(&:text)).to eq(["three\n"])
      expect { sb.log_stream(from_cursor: "bogus").to_a }.to raise_error(Microsandbox::InvalidConfigError, /cursor/)

      # Following: history first, then what is written later, until the sandbox stops.
      seen = Queue.new
      follower = Thread.new { sb.log_stream(sources: ["stdout"], follow: true, interval: 0.2).each { |e| seen << e.text } }
      expect(Timeout.timeout(20) { [seen.pop, seen.pop] }).to eq(["one\n", "three\n"])
      sb.shell("echo four")
      expect(Timeout.timeout(20) { seen.pop }).to eq("four\n")
      sb.stop
      expect(follower.join(20)).not_to be_nil
      expect(seen.size).to eq(0)
    end
  end
end
