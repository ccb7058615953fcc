# frozen_string_literal: true

RSpec.describe Microsandbox do
  around do |ex|
    saved = ENV.to_h.slice("MSB_PATH", "MICROSANDBOX_HOME", "MICROSANDBOX_NO_AUTO_INSTALL")
    ex.run
  ensure
    %w[MSB_PATH MICROSANDBOX_HOME MICROSANDBOX_NO_AUTO_INSTALL].each { |k| ENV.delete(k) }
    ENV.update(saved)
    described_class.runtime_path = nil
  end

  it "resolves home from MICROSANDBOX_HOME, else ~/.microsandbox" do
    ENV.delete("MICROSANDBOX_HOME")
    expect(described_class.home).to eq(File.join(Dir.home, ".microsandbox"))
    ENV["MICROSANDBOX_HOME"] = "/tmp/msb-x"
    expect(described_class.home).to eq("/tmp/msb-x")
  end

  it "resolves runtime_path: MSB_PATH, then the override, then <home>/bin/msb" do
    ENV["MICROSANDBOX_HOME"] = "/tmp/msb-x"
    expect(described_class.runtime_path).to eq("/tmp/msb-x/bin/msb")
    described_class.runtime_path = "/opt/msb"
    expect(described_class.runtime_path).to eq("/opt/msb")
    ENV["MSB_PATH"] = "/env/msb"
    expect(described_class.runtime_path).to eq("/env/msb")
  end

  it "reads MICROSANDBOX_NO_AUTO_INSTALL" do
    ENV.delete("MICROSANDBOX_NO_AUTO_INSTALL")
    expect(described_class.auto_install_disabled?).to be(false)
    ENV["MICROSANDBOX_NO_AUTO_INSTALL"] = "1"
    expect(described_class.auto_install_disabled?).to be(true)
  end

  it "reports an empty home as not installed" do
    ENV["MICROSANDBOX_HOME"] = Dir.mktmpdir
    expect(described_class.installed?).to be(false)
  end
end
