# frozen_string_literal: true

RSpec.describe Microsandbox::Error do
  it "gives every class a unique kebab-case code" do
    codes = Microsandbox::ERRORS_BY_CODE.keys
    expect(codes.uniq.size).to eq(codes.size)
    expect(codes).to all(match(/\A[a-z]+(-[a-z]+)*\z/))
  end

  it "covers the reference gem's documented codes" do
    expect(Microsandbox::ERRORS_BY_CODE.keys).to include(
      "invalid-config", "sandbox-not-found", "sandbox-already-exists", "sandbox-still-running",
      "exec-timeout", "exec-failed", "filesystem-error", "image-not-found",
      "metrics-disabled", "metrics-unavailable"
    )
  end

  it "builds the subclass for a native code and keeps the message" do
    e = described_class.build("exec-timeout", "too slow")
    expect(e).to be_a(Microsandbox::ExecTimeoutError)
    expect(e).to be_a(described_class)
    expect(e.code).to eq("exec-timeout")
    expect(e.message).to eq("too slow")
  end

  it "falls back to the base class for an unknown code, keeping the code" do
    e = described_class.build("brand-new", "x")
    expect(e.class).to eq(described_class)
    expect(e.code).to eq("brand-new")
  end

  it "is a StandardError so plain rescue catches it" do
    expect(Microsandbox::ExecFailedError.ancestors).to include(StandardError)
  end
end
