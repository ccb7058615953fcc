# frozen_string_literal: true

RSpec.describe Microsandbox::ExecOutput do
  def output(**kw)
    described_class.new(**{ exit_code: 0, signal: nil, stdout: "", stderr: "" }.merge(kw))
  end

  it "reports success only for exit status 0" do
    expect(output.success?).to be(true)
    expect(output(exit_code: 3).success?).to be(false)
  end

  it "gives scrubbed UTF-8 text and the exact binary bytes" do
    o = output(stdout: "h\xC3\xA9".b, stderr: "a\xFFb".b)
    expect(o.stdout).to eq("hé")
    expect(o.stdout.encoding).to eq(Encoding::UTF_8)
    expect(o.stdout_bytes.encoding).to eq(Encoding::BINARY)
    expect(o.stderr_bytes).to eq("a\xFFb".b)
    expect(o.stderr).to eq("a\uFFFDb")
    expect(o.stderr.valid_encoding?).to be(true)
  end

  it "has the reference gem's failure? and to_s (stdout), and an ExitStatus" do
    expect(output(exit_code: 1).failure?).to be(true)
    expect(output.failure?).to be(false)
    expect(output(stdout: "hi\n").to_s).to eq("hi\n")
    expect("#{output(stdout: "x")}").to eq("x")
    expect(output(exit_code: nil, signal: 15).status).to eq(Microsandbox::ExitStatus.new(exit_code: 143, signal: 15))
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

RSpec.describe Microsandbox::ExitStatus do
  it "is a frozen value with success?/failure?" do
    ok = described_class.new(exit_code: 0)
    expect([ok.success?, ok.failure?, ok.signal]).to eq([true, false, nil])
    expect(ok).to be_frozen
    bad = described_class.new(exit_code: 137, signal: 9)
    expect([bad.success?, bad.failure?]).to eq([false, true])
    expect(bad.inspect).to include("exit_code=137", "signal=9")
    expect(described_class.new(exit_code: nil).success?).to be(false)
    expect(ok).to eq(described_class.new(exit_code: 0))
    expect(ok).not_to eq(bad)
  end
end

RSpec.describe Microsandbox::ExecEvent do
  it "answers to both this gem's and the reference gem's names" do
    out = described_class.new(:stdout, bytes: "ok\xFF".b)
    expect([out.type, out.kind, out.data, out.bytes, out.code, out.pid]).to eq([:stdout, :stdout, "ok\xFF".b, "ok\xFF".b, nil, nil])
    expect(out.text).to eq("ok\uFFFD")
    expect([out.stdout?, out.stderr?, out.exited?, out.started?, out.failed?, out.stdin_error?])
      .to eq([true, false, false, false, false, false])
    done = described_class.new(:exited, exit_code: 3)
    expect([done.type, done.code, done.exit_code, done.data, done.text, done.exited?]).to eq([:exited, 3, 3, nil, nil, true])
  end

  it "models the reference's :started, :failed and :stdin_error events" do
    started = described_class.new(:started, pid: 42)
    expect([started.started?, started.pid, started.code, started.data, started.text]).to eq([true, 42, nil, nil, nil])
    expect(started.inspect).to include("started pid=42")

    failed = described_class.new(:failed, message: "nope: No such file or directory", errno: 2)
    expect([failed.failed?, failed.code, failed.data, failed.text, failed.pid, failed.exit_code])
      .to eq([true, 2, "nope: No such file or directory", "nope: No such file or directory", nil, nil])
    expect(failed.data.encoding).to eq(Encoding::UTF_8)

    broken = described_class.new(:stdin_error, message: "bad \xFF".b, errno: 32)
    expect([broken.stdin_error?, broken.code, broken.text]).to eq([true, 32, "bad \uFFFD"])
    expect(broken.text).to be_valid_encoding
    expect(broken.inspect).to include("stdin_error", "code=32")
    expect(described_class.new(:stdin_error, message: "x").code).to be_nil
  end
end

RSpec.describe Microsandbox::ExecOutput do
  it "reports stdin bytes that did not reach the command, without failing" do
    out = described_class.new(exit_code: 0, signal: nil, stdout: "a", stderr: "", stdin_error: "5 of 6 bytes not delivered")
    expect([out.success?, out.stdin_error]).to eq([true, "5 of 6 bytes not delivered"])
    expect(out.inspect).to include('stdin_error="5 of 6 bytes not delivered"')
    clean = described_class.new(exit_code: 0, signal: nil, stdout: "", stderr: "")
    expect(clean.stdin_error).to be_nil
    expect(clean.inspect).not_to include("stdin_error")
  end
end
