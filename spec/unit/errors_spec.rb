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

  it "has a stdin-broken error that is a StdinClosedError (and so an ExecFailedError)" do
    e = described_class.build("stdin-broken", "the command closed its stdin")
    expect(e).to be_a(Microsandbox::StdinBrokenError).and be_a(Microsandbox::StdinClosedError)
    expect(e).to be_a(Microsandbox::ExecFailedError)
    expect(e.code).to eq("stdin-broken")
  end

  it "falls back to the base class for an unknown code, keeping the code" do
    e = described_class.build("brand-new", "x")
    expect(e.class).to eq(described_class)
    expect(e.code).to eq("brand-new")
  end

  it "has the reference gem's base code and a class-level code on every class" do
    expect(described_class.code).to eq("microsandbox-error")
    expect(described_class.new("x").code).to eq("microsandbox-error")
    Microsandbox::ERRORS_BY_CODE.each { |code, klass| expect(klass.code).to eq(code) }
  end

  it "defines every error class of the reference gem with its code" do
    {
      "InvalidConfigError" => "invalid-config", "SandboxNotFoundError" => "sandbox-not-found",
      "SandboxNotRunningError" => "sandbox-not-running", "SandboxAlreadyExistsError" => "sandbox-already-exists",
      "SandboxStillRunningError" => "sandbox-still-running", "ExecTimeoutError" => "exec-timeout",
      "ExecFailedError" => "exec-failed", "FilesystemError" => "filesystem-error",
      "PathNotFoundError" => "path-not-found", "VolumeNotFoundError" => "volume-not-found",
      "VolumeAlreadyExistsError" => "volume-already-exists", "ImageNotFoundError" => "image-not-found",
      "ImageInUseError" => "image-in-use", "ImagePullFailedError" => "image-pull-failed",
      "SnapshotNotFoundError" => "snapshot-not-found", "SnapshotAlreadyExistsError" => "snapshot-already-exists",
      "SnapshotSandboxRunningError" => "snapshot-sandbox-running",
      "SnapshotImageMissingError" => "snapshot-image-missing", "SnapshotIntegrityError" => "snapshot-integrity",
      "NetworkPolicyError" => "network-policy-error", "SecretViolationError" => "secret-violation",
      "TlsError" => "tls-error", "IoError" => "io-error", "MetricsDisabledError" => "metrics-disabled",
      "MetricsUnavailableError" => "metrics-unavailable", "UnsupportedOperationError" => "unsupported-operation",
      "CloudHttpError" => "cloud-http", "UnsupportedError" => "unsupported"
    }.each do |name, code|
      klass = Microsandbox.const_get(name)
      expect(klass.ancestors).to include(described_class), name
      expect(klass.code).to eq(code), name
      expect(described_class.build(code, "m")).to be_a(klass)
    end
  end

  it "keeps this gem's names as compatible supersets" do
    expect(Microsandbox::HostIOError).to equal(Microsandbox::IoError)
    expect(Microsandbox::PathNotFoundError.ancestors).to include(Microsandbox::FilesystemError)
    [Microsandbox::RegistryError, Microsandbox::RegistryAuthError, Microsandbox::PlatformNotFoundError].each do |k|
      expect(k.ancestors).to include(Microsandbox::ImagePullFailedError)
    end
  end

  it "is a StandardError so plain rescue catches it" do
    expect(Microsandbox::ExecFailedError.ancestors).to include(StandardError)
  end
end
