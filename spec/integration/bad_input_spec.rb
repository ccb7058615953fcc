# frozen_string_literal: true

RSpec.describe "bad input to Sandbox.create" do
  def no_leftovers(name)
    expect(File.exist?(sandbox_dir(name))).to be(false)
    expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(name)
    expect(processes_mentioning(sandbox_dir(name))).to be_empty
  end

  it "rejects invalid names (empty, over 128 bytes, control characters)" do
    ["", "x" * 129, "é" * 65, "a\nb", "a\0b", "a\tb"].each do |bad|
      expect { Microsandbox::Sandbox.create(bad, image: rootfs) }
        .to raise_error(Microsandbox::InvalidConfigError, /invalid sandbox name/)
    end
  end

  it "raises ImageNotFoundError for a missing root directory" do
    name = unique_name("noimg")
    expect { Microsandbox::Sandbox.create(name, image: "/nonexistent/rootfs") }
      .to raise_error(Microsandbox::ImageNotFoundError, %r{/nonexistent/rootfs}) { |e| expect(e.code).to eq("image-not-found") }
    no_leftovers(name)
  end

  it "rejects a file given as image" do
    expect { Microsandbox::Sandbox.create(unique_name, image: "/bin/busybox") }
      .to raise_error(Microsandbox::InvalidConfigError, /not a directory/)
  end

  it "rejects out-of-range cpus and memory" do
    name = unique_name("range")
    expect { Microsandbox::Sandbox.create(name, image: rootfs, cpus: 0) }
      .to raise_error(Microsandbox::InvalidConfigError, /cpus/)
    expect { Microsandbox::Sandbox.create(name, image: rootfs, memory: 16) }
      .to raise_error(Microsandbox::InvalidConfigError, /memory/)
    expect { Microsandbox::Sandbox.create(name, image: rootfs, memory: 1 << 40) }
      .to raise_error(Microsandbox::InvalidConfigError, /memory/)
    no_leftovers(name)
  end

  it "rejects an invalid hostname" do
    expect { Microsandbox::Sandbox.create(unique_name, image: rootfs, hostname: "bad host") }
      .to raise_error(Microsandbox::InvalidConfigError, /hostname/)
  end

  it "rejects a relative workdir and NUL bytes in env" do
    expect { Microsandbox::Sandbox.create(unique_name, image: rootfs, workdir: "app") }
      .to raise_error(Microsandbox::InvalidConfigError, /absolute/)
    expect { Microsandbox::Sandbox.create(unique_name, image: rootfs, env: { "A" => "x\0y" }) }
      .to raise_error(Microsandbox::InvalidConfigError, /NUL/)
  end

  it "rejects an unknown or unavailable accelerator" do
    expect { Microsandbox::Sandbox.create(unique_name, image: rootfs, accel: "warp") }
      .to raise_error(Microsandbox::InvalidConfigError, /unknown accelerator/)
    expect { Microsandbox::Sandbox.create(unique_name, image: rootfs, accel: "hvf") }
      .to raise_error(Microsandbox::InvalidConfigError, /macOS/)
  end

  it "boots with a forced accelerator and reports it" do
    Microsandbox::Sandbox.create(unique_name("tcg"), image: rootfs, accel: "tcg") do |sb|
      expect(sb.info[:accel]).to eq("tcg")
    end
  end

  it "reports a boot that misses its deadline as BootFailedError and leaves nothing behind" do
    name = unique_name("slowboot")
    expect { Microsandbox::Sandbox.create(name, image: rootfs, boot_timeout: 0.5) }
      .to raise_error(Microsandbox::BootFailedError, /did not become ready/) { |e| expect(e.code).to eq("boot-failed") }
    no_leftovers(name)
  end

  it "boots an empty root directory; running a missing program raises ExecFailedError" do
    empty = Dir.mktmpdir("empty-rootfs")
    name = unique_name("empty")
    Microsandbox::Sandbox.create(name, image: empty) do |sb|
      expect { sb.exec("/bin/sh") }.to raise_error(Microsandbox::ExecFailedError)
    end
    Microsandbox::Sandbox.remove(name)
    no_leftovers(name)
  ensure
    FileUtils.rm_rf(empty) if empty
  end

  it "raises RuntimeUnavailableError when the runtime is missing and auto-install is off" do
    home = Dir.mktmpdir("msb-home")
    script = <<~RUBY
      require "microsandbox"
      begin
        Microsandbox::Sandbox.create("x", image: #{rootfs.inspect})
      rescue Microsandbox::Error => e
        puts e.class, e.code, e.message
      end
    RUBY
    lib = File.expand_path("../../lib", __dir__)
    env = { "MICROSANDBOX_HOME" => home, "MICROSANDBOX_NO_AUTO_INSTALL" => "1" }
    out = IO.popen(env, [RbConfig.ruby, "-I#{lib}", "-e", script], &:read)
    cls, code, message = out.lines.map(&:strip)
    expect(cls).to eq("Microsandbox::RuntimeUnavailableError")
    expect(code).to eq("runtime-error")
    expect(message).to include("Microsandbox.install")
  ensure
    FileUtils.rm_rf(home) if home
  end
end
