# frozen_string_literal: true

require "fileutils"
require "securerandom"
require "tmpdir"
require_relative "../support/registry"

# `volumes:` on real VMs: bind mounts and dir volumes through virtio-fs (virtiofsd), disk
# volumes, quota'd dir volumes and disk images as virtio-blk, tmpfs; the flags; two
# sandboxes on one volume; data surviving stop, remove and kill -9; the errors.
RSpec.describe "volumes" do
  def mounts_of(sb, target)
    sb.shell("grep ' #{target} ' /proc/mounts").stdout
  end

  before(:all) do
    @tmp = Dir.mktmpdir("msb-volumes")
    @vols = []
  end

  after(:all) do
    @vols.each { |v| Microsandbox::Volume.remove(v) if Microsandbox::Volume.list.any? { |i| i.name == v } }
    FileUtils.rm_rf(@tmp)
  end

  def volume(kind: "dir", **opts)
    name = "vol-#{SecureRandom.hex(4)}"
    @vols << name
    Microsandbox::Volume.create(name, kind: kind, **opts)
  end

  it "mounts every kind with its flags, shares a dir volume between two sandboxes, and keeps the data" do
    host = File.join(@tmp, "bind")
    host_ro = File.join(@tmp, "bind-ro")
    FileUtils.mkdir_p([host, host_ro])
    File.write(File.join(host, "from-host.txt"), "hello guest")
    File.write(File.join(host_ro, "ro.txt"), "read only")
    shared = volume
    blk = volume(kind: "disk", size_mib: 32)
    quota = volume(quota_mib: 16)
    img = File.join(@tmp, "image.raw")
    File.open(img, "w") { |f| f.truncate(16 << 20) }
    system("mke2fs", "-q", "-F", "-t", "ext4", "-d", host_ro, img, exception: true)
    a = unique_name("vol-a")
    b = unique_name("vol-b")
    Microsandbox::Sandbox.create(a, image: rootfs, volumes: {
                                   "/bind" => { bind: host, stat_virtualization: :off, host_permissions: :mirror },
                                   "/bindro" => { bind: host_ro, ro: true },
                                   "/data" => { named: shared.name },
                                   "/t" => { tmpfs: true, size_mib: 8, noexec: true, nosuid: true, nodev: true },
                                   "/disk" => { named: blk.name },
                                   "/q" => { named: quota.name },
                                   "/img" => { disk: img, readonly: true }
                                 }) do |sb|
      # Bind mount, live both ways.
      expect(sb.fs.read_text("/bind/from-host.txt")).to eq("hello guest")
      sb.fs.write("/bind/from-guest.txt", "hello host")
      expect(File.read(File.join(host, "from-guest.txt"))).to eq("hello host")
      File.write(File.join(host, "later.txt"), "after boot")
      expect(sb.shell("cat /bind/later.txt").stdout).to eq("after boot")
      expect(mounts_of(sb, "/bind")).to include("virtiofs")

      # Ownership is the host's (stat_virtualization: :off, host_permissions: :mirror): a
      # file of another host user shows its uid and mode; guest root reads it, an
      # unprivileged guest user does not; guest chmod/chown change the host inode.
      other = File.join(host, "other-user.txt")
      File.write(other, "not yours")
      File.chown(12_345, 12_346, other)
      File.chmod(0o600, other)
      expect(sb.shell("stat -c '%u %g %a' /bind/other-user.txt").stdout).to eq("12345 12346 600\n")
      expect(sb.shell("cat /bind/other-user.txt").stdout).to eq("not yours")
      denied = sb.exec("cat", ["/bind/other-user.txt"], user: "1000:1000")
      expect([denied.exit_code, denied.stderr]).to match([1, /Permission denied/])
      private_dir = File.join(host, "other-dir")
      Dir.mkdir(private_dir, 0o700)
      File.write(File.join(private_dir, "f"), "x")
      File.chown(12_345, 12_345, private_dir)
      expect(sb.shell("ls /bind/other-dir").stdout).to eq("f\n")
      expect(sb.exec("ls", ["/bind/other-dir"], user: "1000:1000").stderr).to match(/Permission denied/)
      sb.shell("chmod 640 /bind/other-user.txt && chown 4242:4343 /bind/other-user.txt")
      st = File.stat(other)
      expect([st.uid, st.gid, st.mode & 0o777]).to eq([4242, 4343, 0o640])

      # Read-only bind: the guest cannot write (EROFS), the host file is untouched.
      r = sb.shell("echo x > /bindro/ro.txt")
      expect(r.exit_code).not_to eq(0)
      expect(r.stderr).to match(/Read-only file system/)
      expect(File.read(File.join(host_ro, "ro.txt"))).to eq("read only")
      expect(mounts_of(sb, "/bindro")).to match(/virtiofs ro[ ,]/)

      # tmpfs: its size, and noexec/nosuid/nodev.
      t = mounts_of(sb, "/t")
      expect(t).to start_with("tmpfs /t tmpfs")
      expect(t).to include("nosuid").and include("nodev").and include("noexec").and include("size=8192k")
      expect(sb.shell("printf '#!/bin/sh\\necho ran\\n' > /t/x.sh && chmod +x /t/x.sh && /t/x.sh").stderr)
        .to match(/Permission denied/)
      full = sb.shell("dd if=/dev/zero of=/t/fill bs=1M count=12")
      expect(full.stderr).to match(/No space left on device/)

      # Disk volume: ext4 of its size; the limit is ENOSPC.
      expect(mounts_of(sb, "/disk")).to include("ext4")
      expect(sb.shell("df -k /disk | tail -1 | awk '{print $2}'").stdout.to_i).to be_between(20_000, 33_000)
      sb.shell("echo on-disk > /disk/kept.txt && sync")
      expect(sb.shell("dd if=/dev/zero of=/disk/fill bs=1M count=40").stderr).to match(/No space left on device/)
      sb.shell("rm /disk/fill && sync")

      # Quota'd dir volume: ENOSPC at the quota.
      q = sb.shell("dd if=/dev/zero of=/q/fill bs=1M count=24")
      expect(q.stderr).to match(/No space left on device/)
      expect(sb.shell("du -sk /q/fill | cut -f1").stdout.to_i).to be < 16 * 1024

      # A raw image, read-only, with its content.
      expect(sb.fs.read_text("/img/ro.txt")).to eq("read only")
      expect(sb.shell("touch /img/new").stderr).to match(/Read-only file system/)

      # An image-backed volume attaches to one sandbox at a time; nothing of b is left.
      expect { Microsandbox::Sandbox.create(b, image: rootfs, volumes: { "/disk" => { named: blk.name } }) }
        .to raise_error(Microsandbox::VolumeInUseError, /attached to another running sandbox/)
      expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(b)

      # Volume.remove refuses a mounted volume, naming the sandbox.
      expect { Microsandbox::Volume.remove(shared.name) }.to raise_error(Microsandbox::VolumeInUseError, /#{a}/)

      # Two sandboxes on one dir volume.
      sb.fs.write("/data/a.txt", "from a")
      Microsandbox::Sandbox.create(b, image: rootfs, volumes: { "/data" => { named: shared.name } }) do |sb2|
        # A file the other sandbox wrote before is there at once.
        expect(sb2.fs.read_text("/data/a.txt")).to eq("from a")
        sb2.fs.write("/data/b.txt", "from b")
        expect(sb.shell("cat /data/b.txt").stdout).to eq("from b")
        # A change to a file the other side has cached shows within the cache timeout
        # (cache=auto: about one second for attributes).
        sb2.shell("echo more >> /data/a.txt")
        sleep 1.5
        expect(sb.shell("cat /data/a.txt").stdout).to eq("from amore\n")
        # kill -9 of everything of b: what it wrote is on the host already.
        sb2.fs.write("/data/before-kill.txt", "survives")
        pids = [sb2.info[:vmm_pid], sb2.info[:supervisor_pid]]
        pids.each { |pid| Process.kill(:KILL, pid) }
        expect(wait_until { pids.none? { |pid| pid_alive?(pid) } }).to be(true)
      end
      expect(shared.fs.read("before-kill.txt")).to eq("survives")
    end
    # Stopped and removed: the volumes and their data stay.
    [a, b].each { |n| Microsandbox::Sandbox.remove(n) }
    expect(Microsandbox::Volume.fs(shared.name).read_text("a.txt")).to eq("from amore\n")
    expect(Microsandbox::Volume.fs(shared.name).list.map(&:name)).to include("a.txt", "b.txt", "before-kill.txt")
    expect(File.read(File.join(host, "from-guest.txt"))).to eq("hello host")
    # The disk volume's file survived the stop: boot another sandbox on it.
    c = unique_name("vol-c")
    Microsandbox::Sandbox.create(c, image: rootfs, volumes: { "/disk" => { named: blk.name, ro: true } }) do |sb|
      expect(sb.fs.read_text("/disk/kept.txt")).to eq("on-disk\n")
    end
    # Sandbox.start mounts the volumes again (planned and locked afresh at every boot).
    Microsandbox::Sandbox.start(c) do |sb|
      expect(mounts_of(sb, "/disk")).to include("ext4 ro")
      expect(sb.fs.read_text("/disk/kept.txt")).to eq("on-disk\n")
    end
    Microsandbox::Sandbox.remove(c)
    # No virtiofsd is left running for these sandboxes.
    expect(processes_mentioning("virtiofsd --fd")).to eq([])
    Microsandbox::Volume.remove(shared.name)
    expect { Microsandbox::Volume.get(shared.name) }.to raise_error(Microsandbox::VolumeNotFoundError)
  end

  it "refuses bad mounts before any VM starts and leaves nothing behind" do
    file = File.join(@tmp, "a-file")
    File.write(file, "x")
    name = unique_name("vol-bad")
    {
      { "/v" => { named: "no-such-volume-#{SecureRandom.hex(3)}" } } => Microsandbox::VolumeNotFoundError,
      { "/v" => File.join(@tmp, "missing") } => Microsandbox::InvalidConfigError,
      { "/v" => file } => Microsandbox::InvalidConfigError,
      { "v" => @tmp } => Microsandbox::InvalidConfigError,
      { "/" => @tmp } => Microsandbox::InvalidConfigError,
      { "/proc/x" => @tmp } => Microsandbox::InvalidConfigError,
      { "/dev" => { tmpfs: true } } => Microsandbox::InvalidConfigError,
      { "/a" => { tmpfs: true }, "/a/b" => { tmpfs: true } } => Microsandbox::InvalidConfigError,
      { "/a" => { tmpfs: true, bind: @tmp } } => Microsandbox::InvalidConfigError,
      { "/a" => { tmpfs: true, size_mib: 100_000 } } => Microsandbox::InvalidConfigError,
      { "/a" => { disk: file, format: "qcow2" } } => Microsandbox::InvalidConfigError,
      { "/a" => { tmpfs: true, bogus: 1 } } => Microsandbox::InvalidConfigError,
      { "/a" => { tmpfs: true, ro: "yes" } } => TypeError,
      { "/a" => 42 } => TypeError
    }.each do |volumes, error|
      expect { Microsandbox::Sandbox.create(name, image: rootfs, volumes: volumes) }.to raise_error(error), volumes.inspect
    end
    expect { Microsandbox::Sandbox.create(name, image: rootfs, volumes: []) }.to raise_error(TypeError)
    expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(name)
    expect(File.exist?(sandbox_dir(name))).to be(false)
    expect(processes_mentioning(name)).to eq([])
  end

  # The seed README's "Named volumes" example, verbatim, with the public mirror replaced by
  # the suite's registry (as in readme_examples_spec.rb; "alpine:latest" is its busybox).
  it "runs the reference README's Named volumes example as written" do
    registry = MicrosandboxSpec::Registry.instance
    registry.push_dir("docker/library/alpine", "latest", MicrosandboxSpec::Rootfs.busybox_dir)
    readme = <<~'RUBY'
      Microsandbox::Volume.create("cache", kind: "disk", size_mib: 512)
      Microsandbox::Volume.list           # => [Microsandbox::VolumeInfo, ...]

      Microsandbox::Sandbox.create("with-vol", image: "public.ecr.aws/docker/library/alpine:latest",
                                   volumes: { "/data" => { named: "cache" } }) do |sb|
        sb.fs.write("/data/state.txt", "persisted")
      end

      Microsandbox::Volume.remove("cache")
    RUBY
    local = readme.gsub(%r{image: "public\.ecr\.aws/docker/library/([^"]+)"}) do
      %(image: "#{registry.host}/docker/library/#{Regexp.last_match(1)}", registry_insecure: true)
    end
    expect(Microsandbox::Volume.list.map(&:name)).not_to include("cache")
    begin
      TOPLEVEL_BINDING.dup.eval(local, "README")
      expect(Microsandbox::Volume.list.map(&:name)).not_to include("cache")
      expect(Microsandbox::Sandbox.get("with-vol").status).to eq(:stopped)
    ensure
      Microsandbox::Sandbox.remove("with-vol") if Microsandbox::Sandbox.list.any? { |s| s.name == "with-vol" }
      Microsandbox::Volume.remove("cache") if Microsandbox::Volume.list.any? { |v| v.name == "cache" }
    end
  end
end
