# frozen_string_literal: true

require "fileutils"
require "securerandom"
require "tmpdir"
require_relative "../support/registry"

# Snapshots on real VMs: the disk of a stopped sandbox saved, booted from (by name, digest
# and path), chained (parent digests), exported, removed, imported and booted again; a
# tampered or truncated artifact never boots; each error of the reference.
RSpec.describe "snapshots" do
  before(:all) { @tmp = Dir.mktmpdir("msb-snapshots") }

  after(:all) do
    Microsandbox::Snapshot.list.each { |s| s.remove(force: true) if s.name.to_s.start_with?("snap-") }
    FileUtils.rm_rf(@tmp)
  end

  def snap_name = "snap-#{SecureRandom.hex(4)}"

  it "saves a stopped sandbox and boots new sandboxes from it, through export and import" do
    a = unique_name("snap-src")
    first = snap_name
    Microsandbox::Sandbox.create(a, image: rootfs, env: { "FROM" => "source" }) do |sb|
      sb.shell("echo kept > /root/state && sync")
      expect { Microsandbox::Snapshot.create(a, name: first) }
        .to raise_error(Microsandbox::SnapshotSandboxRunningError) { |e| expect(e.code).to eq("snapshot-sandbox-running") }
    end
    info = Microsandbox::Snapshot.create(a, name: first, labels: { "stage" => "base" }, record_integrity: true)
    expect(info.digest).to match(/\Asha256:\h{64}\z/)
    expect([info.name, info.source_sandbox, info.format, info.fstype, info.parent_digest]).to eq([first, a, :raw, "ext4", nil])
    expect(info.labels).to eq("stage" => "base")
    expect(info.path).to eq(File.join(Microsandbox.home, "snapshots", first))
    expect(Microsandbox::Snapshot.get(info.digest).path).to eq(info.path)
    expect(Microsandbox::Snapshot.list.map(&:name)).to include(first)
    report = Microsandbox::Snapshot.verify(first)
    expect([report.status, report.verified?, report.algorithm]).to eq([:verified, true, "blake3"])
    expect(report.content_digest).to match(/\Ablake3:\h{64}\z/)
    expect { Microsandbox::Snapshot.create(a, name: first) }.to raise_error(Microsandbox::SnapshotAlreadyExistsError)
    expect { Microsandbox::Snapshot.get("snap-none") }.to raise_error(Microsandbox::SnapshotNotFoundError)

    # Boot from it: the disk and the inherited env come along; the new sandbox is its own.
    b = unique_name("snap-b")
    child = snap_name
    Microsandbox::Sandbox.create(b, from_snapshot: first) do |sb|
      expect(sb.shell("cat /root/state; echo $FROM").stdout).to eq("kept\nsource\n")
      sb.shell("echo second >> /root/state && sync")
    end
    child_info = Microsandbox::Sandbox.get(b).snapshot(child)
    expect(child_info.parent_digest).to eq(info.digest)
    # The source snapshot is unchanged, and the sandbox built on it keeps it from removal.
    expect { Microsandbox::Snapshot.remove(first) }.to raise_error(Microsandbox::InvalidConfigError, /#{b}/)

    # Export, remove everything, import, boot again.
    archive = File.join(@tmp, "child.tar")
    Microsandbox::Snapshot.export(child, archive)
    [a, b].each { |n| Microsandbox::Sandbox.remove(n) }
    Microsandbox::Snapshot.remove(first)
    Microsandbox::Snapshot.remove(child)
    expect(Microsandbox::Snapshot.list.map(&:name)).not_to include(first, child)
    imported = Microsandbox::Snapshot.import(archive)
    expect([imported.name, imported.digest, imported.parent_digest]).to eq([child, child_info.digest, info.digest])
    c = unique_name("snap-c")
    Microsandbox::Sandbox.create(c, from_snapshot: imported.digest) do |sb|
      expect(sb.fs.read_text("/root/state")).to eq("kept\nsecond\n")
    end
    Microsandbox::Sandbox.remove(c)
    imported.remove
  end

  it "never boots a truncated or modified artifact, and checks its arguments" do
    src = unique_name("snap-t")
    Microsandbox::Sandbox.create(src, image: rootfs) { |sb| sb.shell("echo x > /root/x && sync") }
    path = File.join(@tmp, "artifact")
    info = Microsandbox::Sandbox.get(src).snapshot_to(path)
    expect(info.path).to eq(path)
    expect(Microsandbox::Snapshot.list_dir(@tmp).map(&:digest)).to eq([info.digest])
    expect(Microsandbox::Snapshot.verify(path).status).to eq(:not_recorded)
    # The disk is sparse raw. Damage: one byte of data (the ext4 superblock at 1024,
    # always allocated), one byte in a hole, the last 4 KiB cut off. Flipping a byte back
    # repairs it — also in the hole, which is now allocated zeros: the content digest is
    # over the disk's content, not its allocation.
    disk = File.join(path, "disk.raw")
    size = File.size(disk)
    File.chmod(0o644, disk)
    name = unique_name("snap-bad")
    hole = File.open(disk) { |f| f.seek(size / 2, IO::SEEK_HOLE) }
    expect(hole).to be < size - 1
    flip = lambda do |at|
      File.open(disk, "r+b") { |f| f.pwrite((f.pread(1, at).getbyte(0) ^ 1).chr, at) }
    end
    [[-> { flip.(1024) }, -> { flip.(1024) }], [-> { flip.(hole) }, -> { flip.(hole) }],
     [-> { File.truncate(disk, size - 4096) }, nil]].each do |damage, repair|
      damage.call
      expect { Microsandbox::Snapshot.verify(path) }.to raise_error(Microsandbox::SnapshotIntegrityError)
      expect { Microsandbox::Sandbox.create(name, from_snapshot: path) }
        .to raise_error(Microsandbox::SnapshotIntegrityError) { |e| expect(e.code).to eq("snapshot-integrity") }
      expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(name)
      expect(File.exist?(sandbox_dir(name))).to be(false)
      next unless repair

      repair.call
      expect(Microsandbox::Snapshot.verify(path).status).to eq(:not_recorded)
    end
    manifest = File.join(path, "manifest.json")
    File.write(manifest, File.read(manifest).sub(src, "someone-else"))
    expect { Microsandbox::Snapshot.open(path) }.to raise_error(Microsandbox::SnapshotIntegrityError, /modified/)
    expect { Microsandbox::Sandbox.create(name, from_snapshot: path) }.to raise_error(Microsandbox::SnapshotIntegrityError)
    expect { Microsandbox::Sandbox.create(name, from_snapshot: "snap-none") }.to raise_error(Microsandbox::SnapshotNotFoundError)
    expect { Microsandbox::Sandbox.create(name, image: rootfs, from_snapshot: path) }.to raise_error(ArgumentError, /exclusive/)
    expect { Microsandbox::Sandbox.create(name) }.to raise_error(ArgumentError, /missing keyword: :image/)
    Microsandbox::Snapshot.remove(path)
    expect(File.exist?(path)).to be(false)
    Microsandbox::Sandbox.remove(src)
  end

  # The image's manifest digest is recorded; the snapshot boots without its image (the disk
  # is flattened and the manifest carries the image config), so it is never pulled.
  it "records the image, boots without it, and keeps an index that reindex rebuilds" do
    registry = MicrosandboxSpec::Registry.instance
    ref = registry.push_dir("team/snap-image", "1.0", rootfs, env: ["FROM_IMAGE=yes", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
                                                              workdir: "/etc")
    src = unique_name("snap-img")
    Microsandbox::Sandbox.create(src, image: ref, registry_insecure: true) { |sb| sb.shell("echo img > /root/mark && sync") }
    image = Microsandbox::Image.get(ref)
    info = Microsandbox::Snapshot.create(src, name: snap_name)
    expect([info.image_ref, info.image_manifest_digest]).to eq([image.reference, image.manifest_digest])
    Microsandbox::Sandbox.remove(src)
    Microsandbox::Image.remove(ref)
    pulls = registry.requests("GET", "/v2/team/snap-image/manifests")
    Microsandbox::Sandbox.create(unique_name("snap-noimg"), from_snapshot: info.name, pull_policy: :never) do |sb|
      expect(sb.shell("cat /root/mark; echo $FROM_IMAGE; pwd").stdout).to eq("img\nyes\n/etc\n")
    end
    expect(registry.requests("GET", "/v2/team/snap-image/manifests")).to eq(pulls)

    # The index: an artifact copied in by hand is unknown until reindex; one deleted by
    # hand stays listed until reindex drops it; an artifact made at a path is indexed.
    home_snaps = File.join(Microsandbox.home, "snapshots")
    copy = File.join(home_snaps, snap_name)
    FileUtils.cp_r(info.path, copy)
    expect(Microsandbox::Snapshot.list.map(&:path)).not_to include(copy)
    count = Microsandbox::Snapshot.reindex
    expect(Microsandbox::Snapshot.list.map(&:path)).to include(copy, info.path)
    expect(count).to eq(Microsandbox::Snapshot.list.size)
    elsewhere = File.join(@tmp, "indexed")
    FileUtils.cp_r(info.path, elsewhere)
    expect(Microsandbox::Snapshot.reindex(@tmp)).to eq(count + 1)
    expect(Microsandbox::Snapshot.list.map(&:path)).to include(elsewhere)
    FileUtils.rm_rf([copy, elsewhere])
    expect(Microsandbox::Snapshot.reindex).to eq(count - 1)
    expect(Microsandbox::Snapshot.list.map(&:path)).not_to include(copy, elsewhere)
    expect { Microsandbox::Snapshot.reindex(File.join(@tmp, "none")) }.to raise_error(Microsandbox::Error)
  end
end
