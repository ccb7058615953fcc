# frozen_string_literal: true

RSpec.describe Microsandbox::ExecOutput do
  def output(**kw)
    described_class.new(**{ exit_code: 0, signal: nil, stdout: "", stderr: "" }.merge(kw))
  end

  it "reports success only for exit status 0" do
    expect(output.success?).to be(true)
    expect(output(exit_code: 3).success?).to be(false)
  end

  it "gives UTF-8 text and binary bytes" do
    o = output(stdout: "h\xC3\xA9".b, stderr: "\xFF".b)
    expect(o.stdout).to eq("hé")
    expect(o.stdout.encoding).to eq(Encoding::UTF_8)
    expect(o.stdout_bytes.encoding).to eq(Encoding::BINARY)
    expect(o.stderr_bytes).to eq("\xFF".b)
    # Invalid bytes are U+FFFD in the text only; the bytes keep them.
    expect(o.stderr).to eq("\uFFFD")
    expect(o.stderr.valid_encoding?).to be(true)
  end

  it "maps death by signal to 128 + signal" do
    o = output(exit_code: nil, signal: 9)
    expect(o.exit_code).to eq(137)
    expect(o.signal).to eq(9)
    expect(o.success?).to be(false)
  end

  it "has a short inspect and a hash form" do
    expect(output(stdout: "abc").inspect).to include("exit_code=0", "stdout=3B")
    expect(output(stdout: "abc").to_h).to include(exit_code: 0, stdout: "abc")
  end
end
