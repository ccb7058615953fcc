# frozen_string_literal: true

require_relative "../support/registry"

RSpec.describe "the main process (image Entrypoint/Cmd, entrypoint:)" do
  before(:all) do
    @registry = MicrosandboxSpec::Registry.instance
    @ref = @registry.push_dir(
      "team/busybox-main", "1.0", MicrosandboxSpec::Rootfs.busybox_dir,
      env: ["FROM_IMAGE=yes", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"], workdir: "/etc",
      # Entrypoint + Cmd combine (Docker semantics); `cat` proves stdin is at EOF.
      entrypoint: ["/bin/sh", "-c"],
      cmd: ["cat; echo main-ran $FROM_IMAGE $(pwd); echo main-err >&2; exit 3"]
    )
  end

  let(:insecure) { { registry_insecure: true } }

  def log_text(sb, sources)
    sb.logs(sources: sources).map(&:text).join("\n")
  end

  it "runs the image's Entrypoint + Cmd after boot with the image config, output and exit in the logs" do
    name = unique_name("main")
    Microsandbox::Sandbox.create(name, image: @ref, **insecure) do |sb|
      expect(wait_until(timeout: 20) { log_text(sb, ["system"]).include?("exited with code 3") }).to be(true)
      expect(log_text(sb, ["stdout"])).to include("main-ran yes /etc")
      expect(log_text(sb, ["stderr"])).to include("main-err")
      # Its exit does not stop the sandbox.
      expect(sb.exec("true").success?).to be(true)
      sb.stop
      # Sandbox.start boots it again, main process included.
      Microsandbox::Sandbox.start(name) do |again|
        expect(wait_until(timeout: 20) { log_text(again, ["stdout"]).scan("main-ran").size == 2 }).to be(true)
      end
    end
  end

  it "entrypoint: replaces the image's Entrypoint and drops its Cmd; [] runs nothing" do
    Microsandbox::Sandbox.create(unique_name("main-ovr"), image: @ref,
                                 entrypoint: ["/bin/sh", "-c", "echo overridden > /tmp/marker; echo ovr-out"],
                                 **insecure) do |sb|
      expect(wait_until(timeout: 20) { sb.fs.exists?("/tmp/marker") }).to be(true)
      expect(wait_until(timeout: 10) { log_text(sb, ["stdout"]).include?("ovr-out") }).to be(true)
      expect(log_text(sb, %w[stdout stderr])).not_to include("main-ran")
    end

    Microsandbox::Sandbox.create(unique_name("main-none"), image: @ref, entrypoint: [], **insecure) do |sb|
      expect(sb.exec("true").success?).to be(true)
      expect(log_text(sb, %w[stdout system])).not_to include("main process")
    end
  end

  it "runs an entrypoint for a local root directory too, and records a program that cannot start" do
    Microsandbox::Sandbox.create(unique_name("main-dir"), image: rootfs, entrypoint: ["/no/such/program"]) do |sb|
      expect(wait_until(timeout: 20) { log_text(sb, ["system"]).include?("could not start") }).to be(true)
      expect(sb.exec("true").success?).to be(true)
    end
  end

  it "rejects a bad entrypoint before starting anything" do
    name = unique_name("main-bad")
    expect { Microsandbox::Sandbox.create(name, image: rootfs, entrypoint: "/bin/app") }
      .to raise_error(TypeError, /entrypoint/)
    expect { Microsandbox::Sandbox.create(name, image: rootfs, entrypoint: ["/bin/a\0pp"]) }
      .to raise_error(Microsandbox::InvalidConfigError, /entrypoint/)
    expect { Microsandbox::Sandbox.create(name, image: rootfs, entrypoint: [""]) }
      .to raise_error(Microsandbox::InvalidConfigError, /entrypoint/)
    expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(name)
    expect(File.exist?(sandbox_dir(name))).to be(false)
  end
end
