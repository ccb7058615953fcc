# frozen_string_literal: true

require_relative "../support/registry"

RSpec.describe "registry images" do
  before(:all) do
    @registry = MicrosandboxSpec::Registry.instance
    @ref = @registry.push_dir("team/busybox", "1.0", MicrosandboxSpec::Rootfs.busybox_dir,
                              env: ["FROM_IMAGE=yes", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"], workdir: "/etc")
  end

  let(:ref) { @ref }
  let(:insecure) { { registry_insecure: true } }

  it "pulls with per-layer progress, then boots the image with its config applied" do
    events = []
    result = Microsandbox::Image.pull(ref, pull_policy: :always, **insecure) { |p| events << p }
    expect(result[:manifest_digest]).to start_with("sha256:")
    expect(events).not_to be_empty
    expect(events.last.done).to eq(events.last.total)

    before_create = Time.now - 0.001 # last_used_at has millisecond resolution
    Microsandbox::Sandbox.create(unique_name("img"), image: ref, env: { "MINE" => "1" }, **insecure) do |sb|
      expect(sb.shell("echo $FROM_IMAGE $MINE; pwd").stdout).to eq("yes 1\n/etc\n")
      expect(sb.exec("ls", ["/bin/busybox"]).success?).to be(true)
      # Creating a sandbox from the image marks it used.
      expect(Microsandbox::Image.get(ref).last_used_at).to be_between(before_create, Time.now)
    end
  end

  it "shares one read-only root between sandboxes, each with its own copy-on-write layer" do
    Microsandbox::Sandbox.create(unique_name("cow-a"), image: ref, **insecure) do |a|
      Microsandbox::Sandbox.create(unique_name("cow-b"), image: ref, **insecure) do |b|
        a.shell("echo a > /root/only-a")
        expect(b.exec("cat", ["/root/only-a"]).success?).to be(false)
        info = Microsandbox::Image.get(ref)
        expect(info.in_use_by).to include(a.name, b.name)
        expect { Microsandbox::Image.remove(ref) }.to raise_error(Microsandbox::ImageInUseError, /#{a.name}/) { |e|
          expect(e.code).to eq("image-in-use")
        }
      end
    end
  end

  it "create_with_progress: progress in the reference gem's event shape, then #sandbox boots it" do
    name = unique_name("progress")
    session = Microsandbox::Sandbox.create_with_progress(name, image: ref, pull_policy: "always", **insecure)
    expect(session).to be_a(Microsandbox::PullSession)
    events = session.to_a
    expect(events).not_to be_empty
    expect(events.map { |ev| ev["kind"] }.uniq).to eq(["layer_download_progress"])
    last = events.last
    expect(last["downloaded_bytes"]).to eq(last["total_bytes"])
    expect(last["digest"]).to start_with("sha256:")
    expect(last.to_event.keys).to eq(%w[kind digest downloaded_bytes total_bytes])
    sb = session.sandbox
    expect(sb).to be_a(Microsandbox::Sandbox)
    expect(session.sandbox).to equal(sb)
    expect(sb.shell("echo $FROM_IMAGE").stdout).to eq("yes\n")
  ensure
    sb&.stop
  end

  it "takes the reference gem's pull_policy spelling if-missing" do
    result = Microsandbox::Image.pull(ref, pull_policy: "if-missing", **insecure)
    expect(result[:manifest_digest]).to start_with("sha256:")
  end

  it "lists and inspects stored images, with the reference gem's fields" do
    Microsandbox::Image.pull(ref, **insecure)
    info = Microsandbox::Image.list.find { |i| i.reference == ref }
    expect(info).not_to be_nil
    expect([info.layer_count, info.os, info.architecture]).to eq([1, "linux", "amd64"])
    expect(info.size_bytes).to eq(info.content_bytes).and be > 0
    expect(info.created_at).to be_a(Time).and be <= info.pulled_at + 1
    detail = Microsandbox::Image.inspect(ref)
    expect(detail.layers.size).to eq(1)
    expect(detail.config["working_dir"]).to eq("/etc")
    expect(detail.handle).to be_an_instance_of(Microsandbox::ImageInfo)
    expect([detail.handle.reference, detail.handle.layer_count]).to eq([ref, 1])
  end

  it "raises ImageNotFoundError for unknown tags and for pull_policy never" do
    expect { Microsandbox::Sandbox.create(unique_name, image: "#{@registry.host}/team/busybox:nope", **insecure) }
      .to raise_error(Microsandbox::ImageNotFoundError)
    expect { Microsandbox::Image.pull("#{@registry.host}/never/pulled:1", pull_policy: :never) }
      .to raise_error(Microsandbox::ImageNotFoundError)
  end

  it "raises RegistryError for an unreachable registry and leaves nothing behind" do
    name = unique_name("unreach")
    expect { Microsandbox::Sandbox.create(name, image: "127.0.0.1:1/x/y:1", **insecure) }
      .to raise_error(Microsandbox::RegistryError) { |e| expect(e.code).to eq("registry-error") }
    expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(name)
  end

  it "rejects an unknown pull_policy" do
    expect { Microsandbox::Image.pull(ref, pull_policy: :sometimes) }
      .to raise_error(Microsandbox::InvalidConfigError, /pull_policy/)
  end
end
