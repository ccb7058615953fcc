# frozen_string_literal: true

require "fileutils"

# Volume, VolumeInfo and VolumeFs on the host: no VM is booted. Each example gets its own
# MICROSANDBOX_HOME so nothing leaks between them.
RSpec.describe Microsandbox::Volume do
  around do |ex|
    Dir.mktmpdir("msb-vol") do |home|
      old = ENV["MICROSANDBOX_HOME"]
      ENV["MICROSANDBOX_HOME"] = home
      @home = home
      ex.run
    ensure
      ENV["MICROSANDBOX_HOME"] = old
    end
  end

  it "creates, gets, lists and removes dir volumes with labels" do
    info = described_class.create("cache", labels: { "team" => "a", "n" => 1 })
    expect(info).to be_a(Microsandbox::VolumeInfo)
    expect([info.name, info.kind, info.quota_mib, info.capacity_bytes]).to eq(["cache", :dir, nil, nil])
    expect(info.labels).to eq("team" => "a", "n" => "1")
    expect(info.created_at).to be_within(60).of(Time.now)
    expect(info.path).to eq(File.join(@home, "volumes", "cache", "data"))
    expect(File.directory?(info.path)).to be(true)
    described_class.create("b-vol")
    expect(described_class.list.map(&:name)).to eq(%w[b-vol cache])
    expect(described_class.get("cache").labels).to eq(info.labels)
    expect(described_class.remove("cache")).to be_nil
    expect { described_class.get("cache") }.to raise_error(Microsandbox::VolumeNotFoundError, /no volume named "cache"/)
    expect { described_class.remove("cache") }.to raise_error(Microsandbox::VolumeNotFoundError)
    expect(described_class.list.map(&:name)).to eq(%w[b-vol])
  end

  it "stores a dir volume with quota_mib as an ext4 image of that size (the quota), without host-side files" do
    info = described_class.create("q", quota_mib: 16)
    expect([info.kind, info.quota_mib, info.capacity_bytes]).to eq([:dir, 16, 16 << 20])
    expect(File.size(info.path)).to eq(16 << 20)
    expect { info.fs.list("/") }.to raise_error(Microsandbox::UnsupportedOperationError, /quota_mib/)
  end

  it "formats disk volumes as sparse ext4 images of the given size" do
    info = described_class.create("disk1", kind: "disk", size_mib: 32)
    expect([info.kind, info.disk_format, info.disk_fstype, info.size_mib]).to eq([:disk, "raw", "ext4", 32])
    expect(File.size(info.path)).to eq(32 << 20)
    expect(info.capacity_bytes).to eq(32 << 20)
    expect(info.used_bytes).to be < (32 << 20)
    expect(`blkid -o value -s TYPE #{info.path}`.strip).to eq("ext4") if system("which blkid >/dev/null")
    expect { info.fs.read("x") }.to raise_error(Microsandbox::UnsupportedOperationError, /disk volume/)
  end

  it "refuses a name clash with VolumeAlreadyExistsError and keeps the first volume" do
    described_class.create("dup", labels: { "first" => "yes" })
    expect { described_class.create("dup", kind: "disk", size_mib: 16) }
      .to raise_error(Microsandbox::VolumeAlreadyExistsError) { |e| expect(e.code).to eq("volume-already-exists") }
    expect(described_class.get("dup").labels).to eq("first" => "yes")
  end

  it "refuses bad input before creating anything" do
    [
      [["../x"], Microsandbox::InvalidConfigError],
      [[""], Microsandbox::InvalidConfigError],
      [["a b"], Microsandbox::InvalidConfigError],
      [["ok", { kind: "tape" }], Microsandbox::InvalidConfigError],
      [["ok", { kind: "disk" }], Microsandbox::InvalidConfigError],
      [["ok", { kind: "disk", size_mib: 16, quota_mib: 8 }], Microsandbox::InvalidConfigError],
      [["ok", { size_mib: 16 }], Microsandbox::InvalidConfigError],
      [["ok", { quota_mib: 0 }], Microsandbox::InvalidConfigError],
      [["ok", { size_mib: "16", kind: "disk" }], TypeError],
      [[1], TypeError]
    ].each do |(args, err)|
      name, kw = args
      expect { described_class.create(name, **(kw || {})) }.to raise_error(err), args.inspect
    end
    expect(described_class.list).to eq([])
    expect(Dir.exist?(File.join(@home, "volumes")) ? Dir.children(File.join(@home, "volumes")) : []).to eq([])
  end

  describe Microsandbox::VolumeFs do
    let(:vol) { Microsandbox::Volume.create("files") }
    let(:fs) { vol.fs }
    let(:outside) { File.join(@home, "outside") }

    before do
      FileUtils.mkdir_p(outside)
      File.write(File.join(outside, "secret"), "host secret")
    end

    it "reads, writes, lists, copies, renames, stats and removes inside the volume" do
      expect(fs.mkdir("/a/b")).to be_nil
      expect(fs.write("a/b/c.txt", "hi \xFF".b)).to be_nil
      expect(fs.read("/a/b/c.txt")).to eq("hi \xFF".b)
      expect { fs.read_text("a/b/c.txt") }.to raise_error(Microsandbox::FilesystemError, /not valid UTF-8.*use read/)
      fs.write("a/b/t.txt", "café\n")
      expect(fs.read_text("a/b/t.txt")).to eq("café\n")
      expect(fs.read_text("a/b/t.txt").encoding).to eq(Encoding::UTF_8)
      expect(File.binread(File.join(vol.path, "a/b/c.txt"))).to eq("hi \xFF".b)
      fs.copy("a/b/c.txt", "copy.txt")
      fs.rename("copy.txt", "moved.txt")
      expect(fs.exists?("moved.txt")).to be(true)
      expect(fs.exists?("copy.txt")).to be(false)
      entries = fs.list("/")
      expect(entries.map(&:name)).to eq(%w[a moved.txt])
      expect(entries.map(&:kind)).to eq(%i[directory file])
      expect(entries.last.path).to eq("/moved.txt")
      st = fs.stat("moved.txt")
      expect([st.kind, st.size]).to eq([:file, 4])
      expect(st.mtime).to be_a(Time)
      fs.remove_file("moved.txt")
      fs.remove_dir("a")
      expect(fs.list("")).to eq([])
      expect { fs.read("nope") }.to raise_error(Microsandbox::PathNotFoundError)
      expect { fs.write("x", 1) }.to raise_error(TypeError)
      expect { fs.read("a\0b") }.to raise_error(Microsandbox::InvalidConfigError)
      expect { Microsandbox::Volume.fs("missing") }.to raise_error(Microsandbox::VolumeNotFoundError)
    end

    it "never leaves the volume through .., absolute paths or planted symlinks" do
      File.symlink(File.join(outside, "secret"), File.join(vol.path, "abs"))
      File.symlink("../../../outside/secret", File.join(vol.path, "rel"))
      File.symlink("../../../outside", File.join(vol.path, "dirlink"))
      File.symlink("../../../outside/not-yet", File.join(vol.path, "dangling"))
      expect { fs.read("../../../outside/secret") }.to raise_error(Microsandbox::FilesystemError, /outside the volume/)
      expect { fs.read(File.join(outside, "secret")) }.to raise_error(Microsandbox::FilesystemError)
      %w[abs rel dirlink/secret].each do |p|
        expect { fs.read(p) }.to raise_error(Microsandbox::FilesystemError, /outside the volume/), p
      end
      expect { fs.write("dangling", "x") }.to raise_error(Microsandbox::FilesystemError)
      expect { fs.write("dirlink/new", "x") }.to raise_error(Microsandbox::FilesystemError)
      expect { fs.list("dirlink") }.to raise_error(Microsandbox::FilesystemError)
      expect(Dir.children(outside)).to eq(["secret"])
      expect(File.read(File.join(outside, "secret"))).to eq("host secret")
      expect(fs.stat("abs").kind).to eq(:symlink)
    end
  end

  describe Microsandbox::Volume::Mounts do
    it "takes the reference's options: words and the policies virtiofsd has, and says why it refuses the others" do
      m = described_class.coerce("/a" => { bind: "/h", options: %w[ro noexec rw], stat_virtualization: :off,
                                           host_permissions: "mirror" })
      expect(m.first.slice("readonly", "noexec", "nosuid", "nodev")).to eq("readonly" => true, "noexec" => true,
                                                                              "nosuid" => false, "nodev" => false)
      expect(described_class.coerce("/n" => { named: "v", options: [:nosuid, "nodev"] }).first.values_at("nosuid", "nodev"))
        .to eq([true, true])
      [[{ bind: "/h", stat_virtualization: :strict }, Microsandbox::UnsupportedError, /overlay.*virtiofsd/],
       [{ bind: "/h", stat_virtualization: :relaxed }, Microsandbox::UnsupportedError, /stat_virtualization: :off/],
       [{ named: "v", host_permissions: :private }, Microsandbox::UnsupportedError, /host_permissions: :mirror/],
       [{ bind: "/h", stat_virtualization: :loose }, Microsandbox::InvalidConfigError, /not one of :off, :strict, :relaxed/],
       [{ tmpfs: true, host_permissions: :mirror }, Microsandbox::InvalidConfigError, /bind: and named: mounts only/],
       [{ disk: "/d.raw", stat_virtualization: :off }, Microsandbox::InvalidConfigError, /bind: and named:/],
       [{ bind: "/h", options: %w[ro sync] }, Microsandbox::InvalidConfigError, /unknown word "sync"/],
       [{ bind: "/h", options: "ro" }, TypeError, /Array of words/]].each do |spec, err, msg|
        expect { described_class.coerce("/a" => spec) }.to raise_error(err, msg), spec.inspect
      end
    end
  end
end
