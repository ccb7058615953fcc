# frozen_string_literal: true

require "pathname"

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

  it "reads MICROSANDBOX_NO_AUTO_INSTALL as the reference gem does" do
    ENV.delete("MICROSANDBOX_NO_AUTO_INSTALL")
    expect(described_class.auto_install_disabled?).to be(false)
    %w[1 yes true anything].each do |v|
      ENV["MICROSANDBOX_NO_AUTO_INSTALL"] = v
      expect(described_class.auto_install_disabled?).to be(true), v
    end
    ["", "0", "false", "no", "NO", " False "].each do |v|
      ENV["MICROSANDBOX_NO_AUTO_INSTALL"] = v
      expect(described_class.auto_install_disabled?).to be(false), v.inspect
    end
  end

  it "reports the runtime version" do
    expect(Microsandbox::RUNTIME_VERSION).to eq("v#{Microsandbox::VERSION}")
    expect(described_class.runtime_version).to eq(Microsandbox::RUNTIME_VERSION)
  end

  it "refuses to set up another runtime version before touching anything" do
    ENV["MICROSANDBOX_HOME"] = dir = File.join(Dir.mktmpdir, "home")
    expect { described_class.setup(version: "v0.6.1") }
      .to raise_error(Microsandbox::UnsupportedError, /#{Regexp.escape(Microsandbox::RUNTIME_VERSION)}/)
    expect(File.exist?(dir)).to be(false)
  end

  it "accepts a runtime_path Pathname" do
    described_class.runtime_path = Pathname("/opt/msb")
    expect(described_class.runtime_path).to eq("/opt/msb")
  end

  it "keeps libkrunfw_path= as a set-once no-op" do
    described_class.instance_variable_set(:@libkrunfw_path, nil)
    described_class.libkrunfw_path = "/opt/libkrunfw.so"
    described_class.libkrunfw_path = "/other"
    expect(described_class.libkrunfw_path).to eq("/opt/libkrunfw.so")
  ensure
    described_class.instance_variable_set(:@libkrunfw_path, nil)
  end

  it "has the local backend only" do
    expect(described_class.default_backend_kind).to eq(:local)
    expect(described_class.set_default_backend("local")).to be_nil
    expect(described_class.set_default_backend(:local)).to be_nil
    expect(described_class.with_backend(:local) { 42 }).to eq(42)
    expect { described_class.set_default_backend(:cloud, url: "https://x", api_key: "sekrit") }
      .to raise_error(Microsandbox::UnsupportedError) { |e| expect(e.message).not_to include("sekrit") }
    expect { described_class.with_backend("cloud") { raise "not run" } }.to raise_error(Microsandbox::UnsupportedError)
    expect { described_class.set_default_backend(:mars) }.to raise_error(ArgumentError)
    expect { described_class.set_default_backend(:local, url: "https://x") }.to raise_error(ArgumentError)
    expect(described_class.default_backend_kind).to eq(:local)
  end

  it "reports an empty home as not installed" do
    ENV["MICROSANDBOX_HOME"] = Dir.mktmpdir
    expect(described_class.installed?).to be(false)
  end
end
