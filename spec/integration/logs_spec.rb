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
      expect(entries.find { |e| e.text.include?("to-out") }.source).to eq("stdout")
      expect(entries.find { |e| e.text.include?("to-err") }.source).to eq("stderr")
      expect(entries.last.timestamp).to be_a(Time)
      expect(sb.logs(tail: 1, sources: ["stdout"]).size).to eq(1)
      expect { sb.logs(sources: ["kernel"]) }.to raise_error(Microsandbox::InvalidConfigError, /log source/)

      streamed = []
      reader = Thread.new { sb.log_stream(interval: 0.2).each { |e| streamed << e.text; break if e.text.include?("later") } }
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
end
