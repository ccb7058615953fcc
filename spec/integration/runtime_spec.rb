# frozen_string_literal: true

require "rbconfig"

RSpec.describe "runtime provisioning" do
  it "installs into a fresh home idempotently and reports installed?" do
    home = Dir.mktmpdir("msb-install")
    deb = Dir[File.join(Microsandbox.home, "cache", "linux-image-*.deb")].max
    expect(deb).not_to be_nil, "the suite's own install should have cached the kernel package"
    script = <<~RUBY
      require "microsandbox"
      before = Microsandbox.installed?
      t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      Microsandbox.install
      first = Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0
      t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      Microsandbox.install
      second = Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0
      puts [before, Microsandbox.installed?, first, second].join(" ")
    RUBY
    lib = File.expand_path("../../lib", __dir__)
    env = { "MICROSANDBOX_HOME" => home, "MICROSANDBOX_KERNEL_DEB" => deb }
    out = IO.popen(env, [RbConfig.ruby, "-I#{lib}", "-e", script], err: File::NULL, &:read)
    before, after, _first, second = out.split
    expect(before).to eq("false")
    expect(after).to eq("true")
    expect(second.to_f).to be < 1.0
    %w[runtime/vmlinux runtime/initramfs.cpio runtime/manifest.json bin/msb].each do |f|
      expect(File.exist?(File.join(home, f))).to be(true), "#{f} missing"
    end
  ensure
    FileUtils.rm_rf(home) if home
  end

  it "names what to install when the kernel package cannot be found" do
    home = Dir.mktmpdir("msb-nokernel")
    env = { "MICROSANDBOX_HOME" => home, "MICROSANDBOX_KERNEL_DEB" => "/nonexistent/linux-image.deb" }
    lib = File.expand_path("../../lib", __dir__)
    script = 'require "microsandbox"; begin; Microsandbox.install; rescue Microsandbox::Error => e; puts e.class; puts e.message; end'
    out = IO.popen(env, [RbConfig.ruby, "-I#{lib}", "-e", script], err: File::NULL, &:read)
    expect(out).to include("Microsandbox::RuntimeUnavailableError", "linux-image-cloud-amd64")
  ensure
    FileUtils.rm_rf(home) if home
  end
end
