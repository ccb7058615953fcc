# frozen_string_literal: true

require "digest"
require "fileutils"
require "open3"

# Disk-image roots: an ext4 image made here with `mkfs.ext4 -d` from the test root
# filesystem, converted to qcow2 and vmdk with qemu-img, each booted read-only through an
# overlay (the image's bytes never change).
RSpec.describe "disk-image roots" do
  before(:all) do
    @dir = Dir.mktmpdir("msb-disk-image")
    tree = File.join(@dir, "tree")
    FileUtils.cp_r(MicrosandboxSpec::Rootfs.busybox_dir, tree, preserve: true)
    File.write(File.join(tree, "marker"), "from the disk image\n")
    run = lambda do |*cmd|
      out, status = Open3.capture2e(*cmd)
      raise "#{cmd.join(' ')} failed: #{out}" unless status.success?
    end
    @images = { "raw" => File.join(@dir, "root.raw") }
    run.call("mkfs.ext4", "-q", "-d", tree, @images["raw"], "64M")
    %w[qcow2 vmdk].each do |fmt|
      @images[fmt] = File.join(@dir, "root.#{fmt}")
      run.call("qemu-img", "convert", "-f", "raw", "-O", fmt, @images["raw"], @images[fmt])
    end
    @ext2 = File.join(@dir, "root-ext2.RAW") # the extension is matched in any case
    run.call("mkfs.ext2", "-q", "-d", tree, @ext2, "64M")
  end

  after(:all) { FileUtils.rm_rf(@dir) if @dir }

  def digest(path) = Digest::SHA256.file(path).hexdigest

  %w[raw qcow2 vmdk].each do |fmt|
    it "boots a .#{fmt} image; the guest writes to an overlay, never to the image" do
      image = @images[fmt]
      before = digest(image)
      Microsandbox::Sandbox.create(unique_name("disk-#{fmt}"), image: image) do |sb|
        expect(sb.exec("cat", ["/marker"]).stdout).to eq("from the disk image\n")
        expect(sb.shell("echo written > /new-file && cat /new-file && grep ' / ' /proc/mounts").stdout)
          .to start_with("written\n").and match(%r{^\S+ / ext4 rw}) # the overlay is writable
        expect(sb.fs.read_text("/new-file")).to eq("written\n")
      end
      expect(digest(image)).to eq(before)
    end
  end

  it "takes fstype:, keeps the sandbox's writes across start, and several sandboxes share one image" do
    name = unique_name("disk-ext2")
    Microsandbox::Sandbox.create(name, image: @ext2, fstype: "ext2") do |sb|
      sb.fs.write("/kept", "across boots")
      Microsandbox::Sandbox.create(unique_name("disk-twin"), image: @ext2) do |twin|
        expect(twin.fs.exists?("/kept")).to be(false) # its own overlay
      end
    end
    Microsandbox::Sandbox.start(name) { |sb| expect(sb.fs.read_text("/kept")).to eq("across boots") }
    Microsandbox::Sandbox.remove(name)
  end

  it "refuses missing files, filesystems the guest cannot mount and unreadable images with typed errors" do
    create = ->(image, **opts) { Microsandbox::Sandbox.create(unique_name("disk-bad"), image: image, **opts) }
    expect { create.call(File.join(@dir, "missing.qcow2")) }.to raise_error(Microsandbox::ImageNotFoundError, /does not exist/)
    expect { create.call(@images["raw"], fstype: "xfs") }.to raise_error(Microsandbox::UnsupportedError, /xfs.*ext4/)
    zeros = File.join(@dir, "zeros.raw")
    File.binwrite(zeros, "\0" * (1 << 20))
    expect { create.call(zeros) }.to raise_error(Microsandbox::UnsupportedError, /not ext2\/3\/4/)
    expect { create.call(zeros, fstype: "ext4") }.to raise_error(Microsandbox::InvalidConfigError, /no ext4 filesystem/)
    fake = File.join(@dir, "fake.qcow2") # raw bytes behind a qcow2 name
    FileUtils.cp(@images["raw"], fake)
    expect { create.call(fake) }.to raise_error(Microsandbox::InvalidConfigError, /not a readable qcow2 image/)
    expect(Microsandbox::Sandbox.list.map(&:name).grep(/\Adisk-bad-/)).to be_empty
  end
end
